"""Layers beyond a stage's memory budget, kept on disk and read back for every step (--offload-dir): the same tokens
as holding every layer, each read a span in the step's trace, and the stage within its budget."""
from __future__ import annotations

import asyncio
import io
import pickle
import re

import psutil
import pytest
import torch

from bench.otlp_receiver import OTLPReceiver
from engine.model.attention import build_metadata
from engine.model.checkpoint import validate
from engine.model.config import ModelConfig
from engine.model.packed_weights import PackedPart, pack_objects, unpack_objects, write_part
from engine.model.stage_model import StageModel
from engine.model.weight_formats import FORMATS
from http_calls import greedy_texts
from server_process import running_server
from tiny_models import write_checkpoint

MODEL = "tiny"
PRODUCTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("six"), "llama", layers=6)


@pytest.fixture(scope="module")
def bf16_layers(tmp_path_factory):
    """Eight bf16 layers of 7.6 MB each: big enough that what a stage holds shows in its resident memory."""
    return write_checkpoint(tmp_path_factory.mktemp("wide"), "llama", layers=8, hidden=512, intermediate=2048,
                            heads=8, kv_heads=2, dtype="bfloat16")


def forwards(model: StageModel, cfg: ModelConfig, steps: int = 3, fail_at: int | None = None) -> list[torch.Tensor]:
    """Logits of a 7-token prompt, several times over (each pass reads the streamed layers again); fail_at: the pass
    whose layer 2 raises, as a step that fails part-way would."""
    kv = torch.zeros(len(model.layers), 2, 4, 16, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32)
    meta = build_metadata(16, list(range(7)), [], [], [(0, 7, 0, [0])], torch.device("cpu"))
    out = []
    for step in range(steps):
        def on_layer(i, step=step):
            if step == fail_at and i == 2:
                raise RuntimeError("a step that fails part-way")

        try:
            hidden = model.forward(torch.arange(3, 10), torch.arange(7), meta, kv, on_layer)
        except RuntimeError:
            continue
        out.append(model.logits(hidden[-1:]))
    return out


@pytest.mark.parametrize("fmt,tier", [(None, "disk"), ("q4_k", "disk"), (None, "host")])
def test_streamed_layers_compute_what_resident_ones_do(six_layers, tmp_path, fmt, tier):
    """From disk, or (the host tier a GPU stage streams from, run here on the CPU) from host memory."""
    cfg = ModelConfig.from_dir(six_layers)
    formats = {f"model.layers.{i}.{p}.weight": fmt for i in range(6) for p in PRODUCTS} if fmt else None

    def model(streamed):
        return StageModel(cfg, validate(six_layers, cfg), range(6), True, True, torch.float32, torch.device("cpu"),
                          64, formats=formats, streamed=streamed, offload=tmp_path, tier=tier)

    resident = forwards(model([]), cfg)
    streaming = model([1, 3, 4, 5])
    assert [lay.products is None for lay in streaming.layers] == [False, True, False, True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(resident, forwards(streaming, cfg)))
    # A pass that fails part-way hands back the layers it did not reach: the next starts at the first again.
    after_failure = forwards(streaming, cfg, steps=3, fail_at=1)
    assert len(after_failure) == 2 and all(torch.equal(resident[0], b) for b in after_failure)
    fetches = streaming.stream.drain_fetches()
    assert [f.layer for f in fetches[:4]] == [1, 3, 4, 5]
    assert all(f.tier == tier and f.nbytes > 0 and f.end_ns >= f.start_ns for f in fetches)
    assert streaming.weight_bytes < model([]).weight_bytes
    assert not list(tmp_path.iterdir())  # the file is unlinked from the start: nothing is left behind
    streaming.stream.close()


def test_a_mixture_of_experts_streams_its_experts_with_its_layer(tmp_path):
    """A layer's experts and router are part of what a streamed layer brings in: a mixture of experts (with a shared
    expert) computes from disk what it computes resident."""
    model_dir = write_checkpoint(tmp_path / "moe", "qwen2_moe", layers=4)
    cfg = ModelConfig.from_dir(model_dir)

    def model(streamed):
        return StageModel(cfg, validate(model_dir, cfg), range(4), True, True, torch.float32, torch.device("cpu"), 64,
                          streamed=streamed, offload=tmp_path)

    streaming = model([1, 2])
    assert all(torch.equal(a, b) for a, b in zip(forwards(model([]), cfg), forwards(streaming, cfg)))
    assert [f.layer for f in streaming.stream.drain_fetches()[:2]] == [1, 2]
    streaming.stream.close()


def test_experts_kept_on_the_host_compute_what_they_compute_beside_their_layer(tmp_path):
    """A GPU stage's experts kept in host memory, run by the host's CPU (here the stage is on the CPU too, so the
    rows' trip out and back is a no-op): a prompt and a single token compute the same logits, the load is counted,
    the stage's own weights shrink by the experts, and a layer that streams or has no experts is refused."""
    model_dir = write_checkpoint(tmp_path / "moe", "qwen2_moe", layers=4)
    cfg = ModelConfig.from_dir(model_dir)

    def model(host_experts=(), streamed=()):
        return StageModel(cfg, validate(model_dir, cfg), range(4), True, True, torch.float32, torch.device("cpu"), 64,
                          streamed=streamed, offload=tmp_path, host_experts=host_experts,
                          host_dtypes=(torch.float32, torch.float32))

    beside, hosted = model(), model([1, 3])
    assert forwards(beside, cfg, steps=1)[0].equal(forwards(hosted, cfg, steps=1)[0])
    meta = build_metadata(16, [0], [], [], [(0, 1, 0, [0])], torch.device("cpu"))
    kv = torch.zeros(4, 2, 4, 16, cfg.num_kv_heads, cfg.head_dim)
    one = [m.logits(m.forward(torch.tensor([5]), torch.tensor([0]), meta, kv.clone())) for m in (beside, hosted)]
    assert one[0].equal(one[1])
    load = hosted.take_expert_load()
    assert load.sum() == (7 + 1) * 4 * cfg.experts_per_token and load.equal(beside.take_expert_load())
    expert_bytes = 4 * cfg.num_experts * 3 * cfg.hidden_size * cfg.expert_intermediate_size
    assert beside.weight_bytes - hosted.weight_bytes == 2 * expert_bytes
    for bad in (dict(host_experts=[1], streamed=[1]), dict(host_experts=[7])):
        with pytest.raises(ValueError, match="cannot keep their experts on the host"):
            model(**bad)


def test_a_packed_part_names_only_the_engines_types(tmp_path):
    from engine.model.linear import QuantLinear
    from engine.model.quantized import quantize, pack

    weight = torch.randn(64, 64)
    linear = QuantLinear(pack(quantize(weight, FORMATS["q8_0"])), torch.randn(64), torch.float32)
    part, tensors = pack_objects(linear)
    write_part(tmp_path / "part.bin", part, tensors)
    back = unpack_objects(part, torch.from_file(str(tmp_path / "part.bin"), size=part.nbytes, dtype=torch.uint8))
    x = torch.randn(5, 64)
    assert torch.equal(back(x), linear(x)) and back.weight.fmt is FORMATS["q8_0"]
    # A part whose pickle names anything else is refused before it is called.
    evil = io.BytesIO()
    pickle.dump(print, evil)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        unpack_objects(PackedPart(evil.getvalue(), (), 0), torch.empty(0, dtype=torch.uint8))


async def greedy(url: str) -> list[str]:
    return await greedy_texts(url, MODEL)


FLAGS = ("--served-model-name", MODEL, "--max-model-len", "256", "--threads-per-stage", "1")


def test_served_with_layers_read_from_disk_the_tokens_are_the_same_and_each_read_is_traced(six_layers, tmp_path):
    with running_server(six_layers, *FLAGS) as s:
        want = asyncio.run(greedy(s.url))
    offload = tmp_path / "offload"
    for devices in ("cpu=1200KiB", "cpu=700KiB,cpu=1000KiB"):
        with OTLPReceiver() as rx, running_server(six_layers, *FLAGS, "--devices", devices, "--offload-dir",
                                                  str(offload), "--trace-detail", "step",
                                                  "--otlp-traces-endpoint", rx.endpoint,
                                                  env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as s:
            assert asyncio.run(greedy(s.url)) == want
            banner = s.output()
            rx.wait_for(lambda spans: any(x.name.startswith("fetch layer") for x in spans), 30)
        streamed = [int(n) for n in re.findall(r"\((\d+) read from disk each step\)", banner)]
        assert streamed and sum(streamed) >= 3, banner
        fetches = [x for x in rx.spans() if x.name.startswith("fetch layer")]
        forwards = {x.span_id: x for x in rx.spans() if x.name.endswith("forward")}
        for f in fetches:
            assert f.attributes["strata.fetch.tier"] == "disk" and f.attributes["strata.fetch.bytes"] > 0
            assert f.attributes["strata.fetch.bandwidth_bytes_per_s"] > 0
            assert isinstance(f.attributes["strata.fetch.overlapped_compute"], bool)
            assert f.parent_span_id in forwards
        assert not list(offload.iterdir())


def test_a_stage_that_streams_keeps_to_its_budget(bf16_layers):
    """The stage's resident memory, less what the same stage process holds with no weights of its own to speak of
    (one layer), stays within the budget plus 48 MiB of slack (activations, the allocator's pools, the packing of the
    layer being loaded)."""
    def stage_rss(devices: str, *extra: str) -> int:
        with running_server(bf16_layers, *FLAGS, "--devices", devices, "--num-kv-blocks", "16", *extra) as s:
            asyncio.run(greedy(s.url))
            (stage,) = psutil.Process(s.proc.pid).children()
            return stage.memory_info().rss

    cfg = ModelConfig.from_dir(bf16_layers)
    layer = cfg.layer_weight_bytes(2)  # bf16
    budget = 3 * layer  # of 8 layers' weights: a third and a bit
    base = stage_rss("cpu", "--layers", "8")  # every layer in memory
    held = 8 * layer
    streamed = stage_rss(f"cpu={budget}", "--offload-dir", str(bf16_layers / "offload"))
    runtime = base - held  # the interpreter, torch, the kernels and the embedding
    assert streamed - runtime <= budget + (48 << 20), (streamed, base, budget)
    assert streamed < base - 3 * layer  # it really let go of what it streams
