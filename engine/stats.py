"""What the engine tells its callers about itself: what it is (EngineInfo, fixed at start-up) and how it is doing
(EngineStats, a snapshot the engine's thread takes and hands over, so readers never touch its live state)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.placement.devices import tier_name


@dataclass(slots=True, frozen=True)
class StageInfo:
    index: int
    device: str  # cpu, cuda:1, ...
    label: str  # the device as people name it ("NVIDIA A100-SXM4-80GB", "CPU, 4 threads")
    kind: str  # cpu | cuda
    host: str
    threads: int | None
    layers: tuple[int, int]  # [start, end)
    pid: int | None  # the stage's process where it runs on this host, else None
    streamed_layers: tuple[int, ...] = ()  # brought in from its tier every step; the others stay in its memory
    host_experts: tuple[int, ...] = ()  # layers whose routed experts stay in host memory, run by the host's CPU
    probe_note: str | None = None  # when and under what load its device was measured (engine.placement.probe_note)

    @property
    def streamed_from(self) -> str:
        """How its streamed layers come in, for people: a CPU stage reads them from disk, a GPU stage copies them
        from host memory."""
        return {"disk": "read from disk", "host": "copied from host memory"}[tier_name(self.kind)]


@dataclass(slots=True, frozen=True)
class EngineInfo:
    architecture: str
    num_layers: int
    dtype: str  # activations
    weight_dtype: str
    kv_dtype: str
    num_blocks: int
    block_size: int
    max_model_len: int
    plan_batch_size: int  # the micro-batch the planner balanced the stages for
    plan_context_len: int
    stages: tuple[StageInfo, ...]
    layer_formats: tuple[str, ...] = ()  # per layer, what its products run at: "q4_k", "q4_k+q6_k", "bfloat16"
    head_format: str = ""  # the LM head's


@dataclass(slots=True, frozen=True)
class StageLoad:
    """One stage's compute so far (from the timings each step brings back)."""

    busy_s: float = 0.0
    steps: int = 0
    seqs: int = 0  # sequences over all steps (their mean is the stage's batch size)


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    spans_dropped: dict[str, int] = field(default_factory=dict)  # per process: "server", "stage 0", ...
    stages: tuple[StageLoad, ...] = ()
    # A mixture of experts: tokens routed to each expert of each layer so far (a read-only [layers, experts] int64
    # array); no rows for a dense model. Dense layers of a mixture have a row of zeros.
    expert_tokens: Any = ()
