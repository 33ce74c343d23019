"""The two grammar libraries structured outputs could be built on, side by side on the default model's vocabulary.

    pip install -e '.[bench]' && python -m bench.grammar_libraries

For llguidance (what engine.model.grammar uses) and xgrammar, in this one run: the vocabulary's set-up, the
compile time of two JSON schemas, the mask time per token over a valid answer to each (mean and worst), and what
each does with schema keywords it cannot enforce (refuse by name, or accept and ignore). Then llguidance's cost
of one decode step's masks for 32 rows walking a schema with random allowed tokens, on one thread, as the last
stage's worker computes them.
"""
from __future__ import annotations

import json
import random
import time

import torch

from engine.model.checkpoint import checkpoint_tokenizer
from engine.model.default_model import default_model
from engine.model.grammar import JSON_OPTIONS, build_tokenizer, json_schema_grammar

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
CHOICE = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "number"}},
          "required": ["color", "n"], "additionalProperties": False}
ANSWERS = {"person": (PERSON, {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"],
                               "address": {"city": "London", "zip": "12345"}}),
           "enum": (CHOICE, {"color": "green", "n": 3.5})}
UNENFORCEABLE = [{"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                 {"type": "string", "pattern": "(?=a)b"}, {"type": "object", "dependentRequired": {"a": ["b"]}},
                 {"not": {"type": "string"}}]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    import llguidance
    import llguidance.torch as llg_torch

    torch.set_num_threads(1)
    tok = checkpoint_tokenizer(default_model())
    vocab = 49152
    eos = sorted(tok.eos_token_ids)
    llg_tok, s = timed(lambda: build_tokenizer(tok.to_json(), vocab, frozenset(eos)))
    print(f"llguidance {getattr(llguidance, '__version__', '?')}: vocabulary set-up {s:.2f} s")
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        xgr = None
        print("xgrammar: not installed (pip install -e '.[bench]')")
    if xgr is not None:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok._tok)
        (info, compiler), s = timed(lambda: (i := xgr.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab, stop_token_ids=eos), xgr.GrammarCompiler(i, max_threads=1)))
        from importlib.metadata import version

        print(f"xgrammar {version('xgrammar')}: vocabulary set-up {s:.2f} s")
    separators = (JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"])
    for name, (schema, answer) in ANSWERS.items():
        ids = tok.encode(json.dumps(answer, separators=separators), add_special_tokens=False) + [eos[0]]
        m, s = timed(lambda: llguidance.LLMatcher(llg_tok, json_schema_grammar(schema), log_level=0))
        mask = llg_torch.allocate_token_bitmask(1, vocab)
        times = []
        for i in ids:
            _, t = timed(lambda: llg_torch.fill_next_token_bitmask(m, mask, 0))
            times.append(t)
            assert m.consume_token(i), m.get_error()
        print(f"  {name}: llguidance compile {s * 1e3:.1f} ms, mask mean {sum(times) / len(times) * 1e6:.0f} us, "
              f"worst {max(times) * 1e6:.0f} us over {len(ids)} tokens")
        if xgr is not None:
            cg, s = timed(lambda: compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                               separators=separators))
            xm, bm, times = xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, vocab), []
            for i in ids:
                _, t = timed(lambda: xm.fill_next_token_bitmask(bm))
                times.append(t)
                assert xm.accept_token(i)
            print(f"  {name}: xgrammar   compile {s * 1e3:.1f} ms, mask mean {sum(times) / len(times) * 1e6:.0f} us, "
                  f"worst {max(times) * 1e6:.0f} us over {len(ids)} tokens")
    print("schema keywords a grammar cannot enforce:")
    for schema in UNENFORCEABLE:
        why = llguidance.LLMatcher.validate_grammar(json_schema_grammar(schema), llg_tok)
        line = f"  {json.dumps(schema)}: llguidance {'refuses: ' + ' '.join(why.split())[:90] if why else 'accepts'}"
        if xgr is not None:
            try:
                compiler.compile_json_schema(json.dumps(schema))
                line += "; xgrammar accepts"
            except Exception as e:  # noqa: BLE001 -- whatever it raises is its refusal
                line += f"; xgrammar refuses: {' '.join(str(e).split())[:90]}"
        print(line)
    # One step's masks for 32 rows, each walking the schema by random allowed tokens, as one worker thread fills them.
    rows, steps, rng = 32, 60, random.Random(0)
    base = llguidance.LLMatcher(llg_tok, json_schema_grammar(PERSON), log_level=0)
    matchers = [base.deep_copy() for _ in range(rows)]
    bitmask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
    bits = torch.arange(32, dtype=torch.int32)
    fill = 0.0
    for _ in range(steps):
        for i, m in enumerate(matchers):
            if not m.is_stopped():
                _, t = timed(lambda: llg_torch.fill_next_token_bitmask(m, bitmask, i))
                fill += t
                allowed = ((bitmask[i].unsqueeze(-1) >> bits) & 1).view(-1)[:vocab].nonzero().view(-1).tolist()
                m.consume_token(rng.choice(allowed))
    print(f"llguidance, {rows} rows: {fill / steps * 1e3:.2f} ms of masks per step (mean of {steps} steps)")
    print("rerun: python -m bench.grammar_libraries")


if __name__ == "__main__":
    main()
