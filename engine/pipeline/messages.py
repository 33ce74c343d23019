"""The pipeline's wire: the greeting, its version, and the control messages between the driver and its stages.

Messages are pickled, so they name their classes by module: moving or changing one is a new WIRE_VERSION.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from telemetry.tracing import TraceSettings

DRIVER_RANK = 0
# How long the server waits for its stages to join, and a worker for its server, unless told otherwise.
RENDEZVOUS_TIMEOUT_S = 120.0
# The first message each way, before any other: the messages below change between releases, and a worker of
# another release is told so in words rather than failing on a message it cannot read. Bump the version whenever
# a message class changes.
GREETING = "strata pipeline"
WIRE_VERSION = 13


class VersionMismatch(Exception):
    pass


def greeting_error(answer: object, who: str) -> str | None:
    """What is wrong with a greeting that is not ours, in words; None when it is ours."""
    if answer == (GREETING, WIRE_VERSION):
        return None
    if isinstance(answer, tuple) and len(answer) == 2 and answer[0] == GREETING:
        return (f"{who} speaks pipeline protocol {answer[1]} and this process {WIRE_VERSION}: run the same Strata "
                "release on every host")
    return f"{who} is not a Strata pipeline of this release (it greeted with {answer!r:.60})"


@dataclass(slots=True)
class DescribeDevice:
    """The driver's first message: what the stage's device is worth for this model (before any plan)."""

    dtype: str  # requested: auto or a dtype name
    checkpoint_dtype: str
    memory_fraction: float  # share of free memory a stage may use when its device has no budget
    weight_format: str | None = None  # the quantized format most layer products run at, whose speed is probed
    offload_dir: str | None = None  # where a CPU stage may keep layers it reads each step; its bandwidth is probed
    format_choices: tuple[str, ...] = ()  # quantized formats the planner may choose per layer; their products are probed
    cpu_offload_bytes: int = 0  # on a GPU: how much of its layers it may keep in host memory; the copy rate is probed
    # A mixture of experts: on a GPU with host memory to keep experts in, the host CPU's rates are probed too.
    has_experts: bool = False
    reprobe: bool = False  # measure the device afresh, not from the cache


@dataclass(slots=True)
class StageSpec:
    """What the driver tells a stage to serve, once the plan is made."""

    stage_index: int
    num_stages: int
    ring: list[int]  # ranks in stage order, the driver first
    cuda_ranks: list[int]  # ranks whose stage is on a CUDA device (their links carry tensors over NCCL)
    model_dir: str
    layers: tuple[int, int]  # [start, end)
    dtype: str  # activations; the KV cache's follows from it and weight_dtype (engine.placement.kv_cache_dtype)
    weight_dtype: str
    input_dtype: str  # of the activations that arrive from the previous stage
    block_size: int
    max_model_len: int
    kv_cache_memory: int | None  # bytes for this stage's KV; None: what the device budget leaves, or a share of free memory
    kv_cache_fraction: float
    max_kv_tokens: int  # more KV than this is never needed (max_num_seqs x max_model_len)
    max_step_tokens: int  # the most tokens one step carries (the scheduler's budget)
    max_num_seqs: int  # the most sequences one step samples
    inline_bytes: int = 0  # room for activations in the frames of CPU links between stages (engine.pipeline.transport)
    trace: TraceSettings | None = None
    cuda_graphs: bool = False  # on a GPU, decode steps replay CUDA graphs (engine.pipeline.decode_graphs)
    # Weights that run at another format than weight_dtype (engine.model.weight_formats.tensor_formats).
    formats: dict[str, str] = field(default_factory=dict)
    # The tokens generation stops at (engine.model.checkpoint.stop_token_ids): what min_tokens bans, and what a
    # finished grammar allows, on the last stage.
    stop_token_ids: frozenset[int] = frozenset()
    # Layers whose products the stage keeps in a file in offload_dir and reads back for every step.
    streamed_layers: tuple[int, ...] = ()
    offload_dir: str | None = None
    # Mixture-of-experts layers whose routed experts the stage keeps in host memory, run by the host's CPU at
    # host_dtypes (compute, weights).
    host_experts: tuple[int, ...] = ()
    host_dtypes: tuple[str, str] | None = None
    # Where the served tokenizer is, where it is not the checkpoint's (--tokenizer): grammar masks are built from it.
    tokenizer_dir: str | None = None


@dataclass(slots=True)
class StageReady:
    stage_index: int
    capacity_blocks: int
    bytes_per_block: int
    device_name: str
    error: str | None = None


@dataclass(slots=True)
class Allocate:
    num_blocks: int


class Shutdown:
    pass


@dataclass(slots=True)
class Failed:
    """A stage's answer when it cannot do what it was asked (one line for the user)."""

    error: str
