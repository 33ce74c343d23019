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
