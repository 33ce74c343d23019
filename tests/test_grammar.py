"""Constrained decoding in the engine: a grammar's rows follow it whatever the model prefers, one that fails fails
its own request alone, and the gateway's compiler refuses what the library cannot enforce, by name."""
from __future__ import annotations

import json

import pytest

from batching.sampling_params import SamplingParams
from engine import LLM
from engine.model.grammar import GrammarCompiler, GrammarError, json_schema_grammar

CHOICE = {"enum": ["yes", "no", "maybe"]}
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, max_model_len=128) as llm:
        yield llm


def test_a_random_model_follows_its_grammar_greedy_and_sampled(llm):
    """The tiny model's weights are random: only the grammar makes its output JSON."""
    params = [SamplingParams(max_tokens=60, temperature=t, seed=s, grammar=json_schema_grammar(schema))
              for schema in (CHOICE, NUMBERS) for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    outs = llm.generate(["the quick brown fox"] * len(params), params)
    for out, p in zip(outs, params):
        assert out.finish_reason == "stop" and out.error is None, out
        value = json.loads(out.text)
        if p.grammar == params[0].grammar:
            assert value in CHOICE["enum"]
        else:
            assert 2 <= len(value) <= 4 and all(0 <= v <= 9 for v in value)


def test_a_grammar_that_fails_fails_its_own_request_alone(llm):
    bad = SamplingParams(max_tokens=8, temperature=0.0, grammar="start: /(/")  # Lark that does not compile
    good = SamplingParams(max_tokens=8, temperature=0.0, grammar=json_schema_grammar(CHOICE))
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate(["hello there"] * 3, [bad, good, plain])
    assert outs[0].error is not None and "grammar" in outs[0].error
    assert outs[1].error is None and json.loads(outs[1].text) in CHOICE["enum"]
    assert outs[2].error is None and len(outs[2].token_ids) == 8
    (again,) = llm.generate("hello there", good)  # the engine carries on
    assert again.error is None


def test_the_compiler_refuses_what_cannot_be_enforced_by_name(llm):
    tok = llm.tokenizer
    compiler = GrammarCompiler(tok.to_json(), llm.engine.model_config.vocab_size, llm.engine.eos_token_ids)
    assert compiler.check(json_schema_grammar(CHOICE))
    for schema, named in (({"type": "array", "uniqueItems": True}, "uniqueItems"), ({"not": {"type": "string"}}, "not"),
                          ({"type": "string", "pattern": "(?=a)b"}, "look-around")):
        with pytest.raises(GrammarError, match=named):
            compiler.check(json_schema_grammar(schema))
        with pytest.raises(GrammarError, match=named):  # the refusal is cached, not forgotten
            compiler.check(json_schema_grammar(schema))
