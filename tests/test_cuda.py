"""The GPU path, where a CUDA device is present (skipped elsewhere): greedy output on a GPU and across a GPU and
a CPU stage equals transformers', steps are timed on the device, the KV cache leaves room for the largest step,
loading a stage onto a GPU holds its weights and little else, and grammars are enforced there."""
from __future__ import annotations

import pytest
import torch

from batching import SamplingParams
from engine import LLM
from tiny_models import hf_greedy, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3], [7] * 20, list(range(40, 90)), [5]]


@pytest.fixture(scope="module")
def reference(llama_dir):
    return hf_greedy(llama_dir, PROMPTS, 16)


@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_greedy_on_a_gpu_equals_transformers(llama_dir, reference, eager):
    with LLM(llama_dir, devices="cuda:0", dtype="float32", num_kv_blocks=64, enforce_eager=eager) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


@pytest.mark.parametrize("devices, layers", [("cuda:0,cpu", None), ("cpu,cuda:0", None), ("cuda:0,cpu", "1,2"),
                                             ("cpu,cuda:0", "2,1")])
def test_a_gpu_stage_and_a_cpu_stage_equal_one_stage(llama_dir, reference, devices, layers):
    with LLM(llama_dir, devices=devices, layers=layers, dtype="float32", threads=1, num_kv_blocks=64) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_a_step_is_timed_on_the_device_not_at_its_launch():
    from engine.pipeline.step_clock import StepClock

    device = torch.device("cuda:0")
    clock = StepClock(device, layers=True)
    torch.cuda._sleep(200_000_000)  # a kernel that spins about a tenth of a second
    clock.mark(0)
    clock.finish()
    launched = clock.start_ns
    assert clock.seconds() > 0.02
    (layer, end), = clock.layer_ends_ns()
    assert layer == 0 and launched < end <= clock.end_ns()


def test_the_kv_cache_leaves_room_for_the_largest_step(llama_dir):
    from engine.pipeline.messages import StageSpec
    from engine.pipeline.runner import StageRunner

    spec = StageSpec(stage_index=0, num_stages=1, ring=[0, 1], cuda_ranks=[1], model_dir=str(llama_dir),
                     layers=(0, 3), dtype="float32", weight_dtype="float32", input_dtype="float32", block_size=16,
                     max_model_len=1024, kv_cache_memory=None, kv_cache_fraction=0.5, max_kv_tokens=1 << 30,
                     max_step_tokens=2048, max_num_seqs=256)
    runner = StageRunner(spec, "cuda:0")
    peak = runner.step_peak_bytes()
    assert peak >= 256 * runner.cfg.vocab_size * 4  # the last stage's logits at least
    torch.cuda.empty_cache()  # as capacity_blocks does before it reads what is free
    free, _ = torch.cuda.mem_get_info()
    assert runner.capacity_blocks() * runner.bytes_per_block <= free * 0.5 - peak + runner.bytes_per_block


def test_loading_onto_a_gpu_holds_its_weights_and_one_tensor_more(tmp_path):
    from engine.model.checkpoint import validate
    from engine.model.config import ModelConfig
    from engine.model.stage_model import StageModel

    model_dir = write_checkpoint(tmp_path, "llama", hidden=1024, layers=4, heads=8, kv_heads=2, intermediate=2816,
                                 dtype="bfloat16")
    cfg = ModelConfig.from_dir(model_dir)
    device = torch.device("cuda:0")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model = StageModel(cfg, validate(model_dir, cfg), range(cfg.num_layers), True, True, torch.bfloat16, device,
                       256, torch.bfloat16, wide_copy=False)
    peak = torch.cuda.max_memory_allocated(device) - before
    assert peak <= 1.15 * model.weight_bytes + (32 << 20)


def test_the_probe_measures_the_gpu_it_names():
    from engine.placement import DeviceRequest
    from engine.placement.probe import describe_device

    info = describe_device(DeviceRequest("cuda:0"), "bfloat16", None)
    assert info.name == "cuda:0" and info.label == torch.cuda.get_device_name(0)
    assert info.matmul_flops > 1e12 and info.mem_bandwidth > 1e11


def test_a_grammar_is_enforced_on_a_gpu_as_on_the_cpu(llama_dir):
    """The last stage on a GPU masks its grammar rows there (the bitmask crosses from the host each step)."""
    import json

    from engine.model.grammar import json_schema_grammar

    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}
    params = [SamplingParams(max_tokens=40, temperature=t, seed=s, grammar=json_schema_grammar(schema))
              for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    outs = {}
    for devices in ("cuda:0", "cpu"):
        with LLM(llama_dir, devices=devices, dtype="float32", threads=1, num_kv_blocks=64) as llm:
            outs[devices] = [o.text for o in llm.generate(["the quick brown fox"] * 3, params)]
    for text in outs["cuda:0"]:
        assert json.loads(text) and set(json.loads(text)) <= {"a", "b"}
    assert outs["cuda:0"][0] == outs["cpu"][0]  # greedy


def test_layers_copied_in_from_host_memory_compute_what_resident_ones_do(tmp_path):
    """A GPU budget that holds half the weights, with --cpu-offload-gb: the planner keeps the rest in pinned host
    memory, copied in every step on a stream of its own, and greedy output equals the resident run's."""
    model = write_checkpoint(tmp_path, "llama", layers=6, hidden=256, intermediate=1024, heads=8, kv_heads=2)
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    kv = 256 * 6 * 2 * 64 * 4  # max_model_len tokens of every layer's K and V, fp32
    options = dict(dtype="float32", max_model_len=256, num_kv_blocks=16)
    with LLM(model, devices="cuda:0", **options) as llm:
        want = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM(model, devices=f"cuda:0={weights // 2 + 2 * kv}", cpu_offload_gb=1.0, **options) as llm:
        (stage,) = llm.engine.plan.stages
        assert stage.streamed_layers, "the budget was meant to leave layers in host memory"
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want


def test_experts_the_gpu_cannot_hold_run_on_the_host_cpu_and_greedy_output_equals_transformers(tmp_path):
    """A Qwen3-MoE whose GPU budget holds its attention but not all of its experts, with --cpu-offload-gb: the
    planner keeps the other layers' routed experts in host memory, run by the host's CPU, and greedy output equals
    transformers'."""
    model = write_checkpoint(tmp_path, "qwen3_moe", layers=4, hidden=256, heads=8, kv_heads=2)
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    kv = 256 * 4 * 2 * 2 * 32 * 4  # max_model_len tokens of every layer's K and V, fp32
    with LLM(model, devices=f"cuda:0={weights // 2 + 2 * kv}", cpu_offload_gb=1.0, dtype="float32",
             max_model_len=256, num_kv_blocks=16) as llm:
        (stage,) = llm.engine.plan.stages
        assert stage.host_experts and not stage.streamed_layers, "the budget was meant to leave experts on the host"
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == hf_greedy(model, PROMPTS, 16)


def test_a_gpus_plain_experts_go_through_the_grouped_gemm_and_greedy_output_equals_transformers(tmp_path):
    """bf16 experts on a GPU are stacked for torch's grouped GEMM where the probe says it runs there (Hopper), and
    compute what one product per expert computes, and what experts on the host CPU (fp32 over bf16 weights) compute;
    greedy output at fp32 equals transformers'."""
    from engine.model.attention import build_metadata
    from engine.model.checkpoint import validate
    from engine.model.config import ModelConfig
    from engine.model.stage_model import StageModel
    from engine.placement import DeviceRequest
    from engine.placement.probe import describe_device

    model = write_checkpoint(tmp_path, "qwen3_moe", layers=3, hidden=256, heads=8, kv_heads=2)
    cfg = ModelConfig.from_dir(model)
    gpu = torch.device("cuda:0")

    def stage(**kw):
        return StageModel(cfg, validate(model, cfg), range(3), True, True, torch.bfloat16, gpu, 64, **kw)

    grouped, per_expert = stage(), stage()
    for layer in per_expert.layers[1:]:
        layer.products.experts.stacked = None
    hosted = stage(host_experts=[1, 2], host_dtypes=(torch.float32, torch.bfloat16))
    runs = describe_device(DeviceRequest("cuda:0"), "bfloat16", None).grouped_gemm
    assert [layer.products.experts.stacked is not None for layer in grouped.layers[1:]] == [runs, runs]
    meta = build_metadata(16, list(range(7)), [], [], [(0, 7, 0, [0])], gpu)
    logits = []
    for m in (grouped, per_expert, hosted):
        kv = torch.zeros(3, 2, 4, 16, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16, device=gpu)
        logits.append(m.logits(m.forward(torch.arange(3, 10, device=gpu), torch.arange(7, device=gpu), meta, kv)))
    torch.testing.assert_close(logits[0], logits[1], rtol=0.05, atol=0.05)
    torch.testing.assert_close(logits[0], logits[2], rtol=0.05, atol=0.05)
    with LLM(model, devices="cuda:0", dtype="float32", num_kv_blocks=64) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == hf_greedy(model, PROMPTS, 16)
