"""Limits the engine enforces: the context length, one engine per process."""
from __future__ import annotations

import pytest

from batching import SamplingParams
from engine import LLM


def test_max_model_len_caps_generation(llama_dir):
    with LLM(llama_dir, num_kv_blocks=8, max_model_len=40) as small:
        out = small.generate([1] * 30, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 10
        with pytest.raises(ValueError, match="prompt has 40 tokens"):
            small.generate([1] * 40)


def test_second_engine_in_one_process_is_refused_clearly(llama_dir):
    with LLM(llama_dir, num_kv_blocks=8, max_model_len=64):
        with pytest.raises(RuntimeError, match="one engine per process"):
            LLM(llama_dir, num_kv_blocks=8, max_model_len=64)


def test_stage_that_dies_before_joining_fails_start_up_at_once(llama_dir, monkeypatch):
    import sys
    import time

    from engine.pipeline import driver

    monkeypatch.setattr(driver, "STAGE_COMMAND", [sys.executable, "-c", "import sys; sys.exit(3)"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="stage process 1 exited with code 3 before joining"):
        LLM(llama_dir, num_kv_blocks=8, max_model_len=64)
    assert time.monotonic() - t0 < 30  # not the rendezvous timeout
    # The process can start a healthy engine afterwards.
    monkeypatch.undo()
    with LLM(llama_dir, num_kv_blocks=8, max_model_len=64) as llm:
        assert len(llm.generate([1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0].token_ids) == 2


def test_a_gpu_named_twice_is_refused_before_anything_starts(llama_dir):
    from engine.llm_engine import EngineConfig

    with pytest.raises(ValueError, match="name a GPU twice"):
        EngineConfig(model=str(llama_dir), devices="cuda:0,cpu,cuda:0")
    assert EngineConfig(model=str(llama_dir), devices="cpu,cpu").devices == "cpu,cpu"


def test_engine_config_keeps_its_fields_as_given():
    """What the fields mean is read through properties; the config itself is never rewritten."""
    from engine.llm_engine import EngineConfig

    c = EngineConfig(model="m", dtype="bf16", layers="2,1", kv_cache_memory="1GiB", devices="cpu,cpu")
    assert (c.dtype, c.layers, c.kv_cache_memory, c.max_num_batched_tokens) == ("bf16", "2,1", "1GiB", None)
    assert (c.dtype_request, c.layer_counts, c.kv_cache_bytes, c.step_token_budget) == ("bfloat16", [2, 1], 2**30, 512)
    with pytest.raises(ValueError, match="layers"):
        EngineConfig(model="m", layers="two")
    with pytest.raises(ValueError, match="size"):
        EngineConfig(model="m", kv_cache_memory="lots")
