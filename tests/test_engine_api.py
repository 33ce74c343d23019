"""The offline API end to end: sampling options, stop conditions, abort, text."""
from __future__ import annotations

import math

import pytest

from batching import SamplingParams
from engine import LLM


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, num_kv_blocks=96, max_model_len=512) as llm:
        yield llm


def test_seed_gives_same_output_whatever_else_is_in_the_batch(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate("hello there", p)[0].token_ids
    crowd = llm.generate(
        ["other prompt", "hello there", "a third, longer prompt about foxes and dogs"],
        [SamplingParams(max_tokens=20, temperature=0.7, ignore_eos=True), p, SamplingParams(max_tokens=5, temperature=1.3)],
    )[1].token_ids
    assert alone == crowd
    other_seed = llm.generate("hello there", SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone


def test_text_prompt_and_text_output(llm):
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")


def test_stop_string_truncates_text(llm):
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = llm.generate("Pack my box", greedy)[0]
    assert len(full.text) > 6
    stop = full.text[4:7]
    first = full.text.find(stop)
    out = llm.generate("Pack my box", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:first]
    kept = llm.generate("Pack my box", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop],
                                                      include_stop_str_in_output=True))[0]
    assert kept.text == full.text[: first + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = llm.generate([5, 6, 7], greedy)[0].token_ids
    target = full[3]
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full[: full.index(target) + 1]
    late = llm.generate([5, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                  stop_token_ids=[target], min_tokens=full.index(target) + 1))[0]
    assert target not in late.token_ids[: full.index(target) + 1]


def test_logprobs_are_normalised_and_ranked(llm):
    out = llm.generate("hello", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert math.isclose(lp.logprob, lp.top[0][1], abs_tol=1e-5)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-5


def test_abort_frees_blocks_at_once(llm):
    eng = llm.engine
    ids = [eng.add_request([3] * 40, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)) for _ in range(3)]
    eng.step()
    eng.step()
    assert eng.scheduler.blocks.num_used_blocks > 0
    for i in ids:
        assert eng.abort_request(i)
    assert eng.scheduler.blocks.num_used_blocks == 0
    while eng.has_unfinished() or eng.scheduler.in_flight:
        eng.step()
    # The engine keeps serving after the aborts.
    assert len(llm.generate("still here", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].token_ids) == 4


def test_bad_sampling_params_are_refused():
    from batching import ParamError

    for kwargs, param in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                          ({"logprobs": 50}, "logprobs"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens")]:
        with pytest.raises(ParamError) as e:
            SamplingParams(**kwargs)
        assert e.value.param == param


def test_an_llm_left_open_closes_at_exit_and_its_stages_leave_quietly(llama_dir):
    """A script that never calls close(): the stages are told to leave at interpreter exit, rather than finding
    their link broken and saying so."""
    import subprocess
    import sys

    script = ("import sys\nfrom engine import LLM, SamplingParams\n"
              f"llm = LLM({str(llama_dir)!r}, num_kv_blocks=64, max_model_len=256)\n"
              "print(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(eval(out.stdout.strip().splitlines()[-1])) == 2
    assert "pipeline closed" not in out.stderr and "Connection closed" not in out.stderr, out.stderr
