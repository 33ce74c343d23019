"""Greedy output of the engine equals transformers' generate, token for token."""
from __future__ import annotations

import json
import random

import pytest

from batching import SamplingParams
from engine import LLM
from engine.kernels import amx_gemm, half_gemm
from tiny_models import hf_greedy, write_checkpoint

GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompts(lengths, vocab=512, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(llama_dir):
    prompts = random_prompts([1, 3, 7, 15, 16, 17, 33, 64, 95, 130])
    return prompts, hf_greedy(llama_dir, prompts, 24)


def test_continuous_batch_matches_reference(llama_dir, reference):
    prompts, ref = reference
    # A small token budget mixes prefill chunks and decodes in the same steps.
    with LLM(llama_dir, max_num_batched_tokens=48, num_kv_blocks=128) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
        assert [o.token_ids for o in outs] == ref
        assert all(o.finish_reason == "length" for o in outs)
        assert llm.engine.scheduler.blocks.num_used_blocks == 0


def test_chunked_prefill_of_prompt_longer_than_budget(llama_dir, reference):
    prompts, ref = reference
    long_prompt, long_ref = prompts[-1], ref[-1]
    with LLM(llama_dir, max_num_batched_tokens=16, num_kv_blocks=64) as llm:
        outs = llm.generate([long_prompt, prompts[2]], SamplingParams(max_tokens=24, **GREEDY))
    assert outs[0].token_ids == long_ref
    assert outs[1].token_ids == ref[2]


def test_prefix_cache_hits_match_reference(llama_dir):
    shared = random_prompts([48], seed=7)[0]
    prompts = [shared + tail for tail in random_prompts([5, 9, 20], seed=8)]
    ref = hf_greedy(llama_dir, prompts, 12)
    with LLM(llama_dir, num_kv_blocks=64) as llm:
        first = llm.generate(prompts[0], SamplingParams(max_tokens=12, **GREEDY))[0]
        assert first.num_cached_tokens == 0
        rest = llm.generate(prompts[1:], SamplingParams(max_tokens=12, **GREEDY))
        # Three full 16-token blocks of the shared prefix come from the cache.
        assert [o.num_cached_tokens for o in rest] == [48, 48]
        assert [first.token_ids] + [o.token_ids for o in rest] == ref
        # Same prompt again: everything but the last token is cached.
        again = llm.generate(prompts[2], SamplingParams(max_tokens=12, **GREEDY))[0]
        assert again.num_cached_tokens == (len(prompts[2]) - 1) // 16 * 16
        assert again.token_ids == ref[2]


def test_preemption_under_small_kv_cache_matches_reference(llama_dir, reference):
    prompts, ref = reference
    # 14 blocks of 16 tokens cannot hold all ten sequences at once.
    with LLM(llama_dir, num_kv_blocks=14, max_model_len=200, enable_prefix_caching=False) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.blocks.num_used_blocks == 0
    assert [o.token_ids for o in outs] == ref


@pytest.mark.parametrize("family", ["qwen2"])  # the families beyond: tests/test_families.py
def test_other_families_match_reference(tmp_path, family):
    model_dir = write_checkpoint(tmp_path, family)
    prompts = random_prompts([2, 11, 40, 70], seed=3)
    ref = hf_greedy(model_dir, prompts, 16)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, **GREEDY))
    assert [o.token_ids for o in outs] == ref


def test_sharded_checkpoint_matches_reference(tmp_path):
    model_dir = write_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    prompts = random_prompts([5, 30], seed=4)
    ref = hf_greedy(model_dir, prompts, 10)
    with LLM(model_dir, num_kv_blocks=32, max_model_len=256) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))
    assert [o.token_ids for o in outs] == ref


def clear_kernel_caches() -> None:
    """Product kernels load once per process: forget them, so that STRATA_CPU_KERNELS is read afresh."""
    half_gemm._library.cache_clear()
    amx_gemm._library.cache_clear()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "torch"])
def test_half_precision_checkpoints_serve(tmp_path, monkeypatch, dtype, kernel):
    """Half-precision weights under fp32 activations (`auto` on a CPU) run on the fastest product the CPU has
    (engine.model.linear), on the engine's kernel where it builds, else on torch's."""
    monkeypatch.setenv("STRATA_CPU_KERNELS", "1" if kernel else "0")
    clear_kernel_caches()
    model_dir = write_checkpoint(tmp_path, "qwen2", dtype=dtype)  # tied embeddings, q/k/v biases
    prompts = random_prompts([6, 20], seed=5)
    ref = hf_greedy(model_dir, prompts, 8, dtype="float32")
    # In the checkpoint's own precision, in fp32, and as `auto` picks: on one stage (a tied LM head may also serve
    # embeddings) and on two.
    outputs = {}
    try:
        for compute, devices in ((dtype, "cpu"), ("float32", "cpu"), ("auto", "cpu"), ("auto", "cpu,cpu")):
            with LLM(model_dir, dtype=compute, devices=devices, threads=1, num_kv_blocks=32, max_model_len=256) as llm:
                outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
            outputs[compute, devices] = [o.token_ids for o in outs]
            assert all(len(o.token_ids) == 8 for o in outs)
            if compute == "float32":
                # The same weights upcast: identical to the fp32 reference.
                assert [o.token_ids for o in outs] == ref
            else:
                # Rounding differs from fp32, but the first greedy token of a peaked model agrees.
                assert [o.token_ids[0] for o in outs] == [r[0] for r in ref]
    finally:
        clear_kernel_caches()
    assert outputs["auto", "cpu,cpu"] == outputs["auto", "cpu"]

def test_decodes_on_the_gpu_kernel_match_reference(llama_dir, reference, monkeypatch, tmp_path):
    """The Triton decode kernel a GPU stage uses, run by Triton's interpreter in the stage process (the CPU's own
    kernels off, so it takes every decode): the same greedy tokens as transformers."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("STRATA_CPU_KERNELS", "0")
    # Figures for the planner, so that the device probe does not time attention on the interpreted kernel.
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"cpu": {"matmul_flops": 5e10, "mem_bandwidth": 1.5e10, "op_overhead_s": 2e-6}}))
    monkeypatch.setenv("STRATA_DEVICE_PROFILE", str(profile))
    prompts, ref = reference
    with LLM(llama_dir, dtype="float32", num_kv_blocks=128, max_num_batched_tokens=64) as llm:
        outs = llm.generate(prompts[:6], SamplingParams(max_tokens=24, **GREEDY))
        assert [o.token_ids for o in outs] == ref[:6]
