"""Constrained decoding: grammars a request's output must follow, and the token masks that enforce them.

A grammar is llguidance's: a JSON schema, or a Lark grammar (tool calls), turned into one string. That string is
all a request carries (batching.SamplingParams.grammar), so it crosses to the last pipeline stage as cheaply as a
stop string does. The gateway compiles and checks it off the event loop, caching by grammar (GrammarCompiler), so
a grammar the library cannot enforce is refused with a 400 before the request is queued. The last stage keeps one
compiled matcher per grammar and gives each sequence a copy (GrammarMasks); each step it computes the masks of the
rows that have one while the forward pass runs, and the sampler sets what they forbid to -inf.

llguidance rather than xgrammar: it refuses by name a schema keyword it cannot enforce (uniqueItems, not,
dependentRequired, look-around in a pattern) where xgrammar ignores it and lets invalid output through; it has no
compile step worth caching across processes (about 1 ms for a schema, against xgrammar's several) and no
dependencies. Its masks cost more per token (tens of microseconds against a few), which is why they are computed
in parallel over rows and overlapped with the forward pass.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tokenization.tool_calls import JSON_OPTIONS

# Grammars kept compiled, by their text; one longer than _CACHED_GRAMMAR_CHARS (a client's schema can be as large as
# a request body) is compiled each time it comes rather than held.
_CACHED_GRAMMARS = 64
_CACHED_GRAMMAR_CHARS = 64 << 10


class GrammarError(ValueError):
    """A grammar that cannot be compiled or enforced; the message says why."""


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """The grammar of JSON text that validates against `schema`."""
    import llguidance

    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)


def build_tokenizer(tokenizer_json: str, vocab_size: int, eos_token_ids: frozenset[int]):
    """llguidance's view of the vocabulary: each token's bytes, and the tokens a finished grammar ends with (the
    engine's stop set). Rows past the tokenizer's vocabulary (padding in the embedding) are never allowed."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        if len(key) > _CACHED_GRAMMAR_CHARS:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class GrammarCompiler:
    """Checks grammars against the model's vocabulary, once per grammar. Thread-safe; `check` may take milliseconds
    (a schema with thousands of rules, longer), so callers run it off the event loop."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._source = (tokenizer_json, vocab_size, eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()
        self._checked = _LRU(_CACHED_GRAMMARS)  # grammar -> "" (enforceable) or why not

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = build_tokenizer(*self._source)
            return self._tokenizer

    def check(self, grammar: str) -> str:
        """The grammar, once llguidance has compiled it against this vocabulary; GrammarError says why not."""
        import llguidance

        with self._lock:
            why = self._checked.get(grammar)
        if why is None:
            tokenizer = self._llg_tokenizer()
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            why = _reason(messages[0]) if failed else ""
            with self._lock:
                self._checked.put(grammar, why)
        if why:
            raise GrammarError(why)
        return grammar


def _reason(message: str) -> str:
    """llguidance's error, without the parser state and grammar dump it appends."""
    return message.split("\n<state>")[0].strip()


class GrammarMasks:
    """The last stage's grammar state: a compiled matcher per grammar (copied for each sequence), and each step's
    masks, computed on a worker thread while the forward pass runs (llguidance drops the GIL)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: frozenset[int], threads: int = 1) -> None:
        """threads: of llguidance's own pool, computing a step's masks together; 1, the worker thread alone. Its
        idle threads spin a while before they sleep: on a CPU stage they would take cores from the forward pass, so
        only a GPU stage, whose host cores wait on the device, is given more."""
        self.threads = threads
        self.eos_token_ids = sorted(eos_token_ids)
        self._source = (tokenizer_json, vocab_size, eos_token_ids)
        self._tokenizer = None
        self._executor = None  # llguidance's, over rows
        self._compiled = _LRU(_CACHED_GRAMMARS)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="strata-grammar")
        self._words = (vocab_size + 31) // 32
        self._eos_row = None  # [words] int32: only the stop tokens

    def start(self, rows: list) -> "PendingMasks":
        """Begin the masks of `rows` (SamplingRows with a grammar). The worker thread calls llguidance alone, which
        writes through a pointer: a thread that ran torch ops would get an OpenMP team of its own, whose spinning
        threads take the cores from the forward pass's."""
        import torch

        bitmask = torch.full((len(rows), self._words), -1, dtype=torch.int32)
        if self._eos_row is None:
            self._eos_row = torch.zeros(self._words, dtype=torch.int32)
            for e in self.eos_token_ids:
                self._eos_row[e // 32] |= _bit(e % 32)
        future = self._thread.submit(self._fill, rows, bitmask.data_ptr())
        return PendingMasks(future, bitmask, self._eos_row)

    def _matcher(self, grammar: str):
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(*self._source)
            self._executor = llguidance.LLExecutor(self.threads) if self.threads > 1 else None
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            self._compiled.put(grammar, compiled)
        return compiled.deep_copy()

    def _fill(self, rows: list, bitmask_ptr: int) -> tuple[list[int], dict[int, str]]:
        """On the worker thread: each live row's mask into its row of the bitmask; returns the rows whose grammar has
        ended, and {row: why} for those whose grammar failed."""
        row_bytes = self._words * 4
        live, ended = [], []
        failed: dict[int, str] = {}
        for i, row in enumerate(rows):
            if row.matcher is None:
                try:
                    row.matcher = self._matcher(row.params.grammar)
                except Exception as e:  # this request's grammar, and no other's
                    failed[i] = f"{type(e).__name__}: {e}"
                    continue
            m = row.matcher
            if m.is_error():
                failed[i] = _reason(m.get_error())
            elif m.is_stopped():
                ended.append(i)  # a step scheduled ahead of an end it did not know of: its token is dropped
            else:
                live.append((m, i))
        if self._executor is not None and len(live) > 1:
            self._executor.unsafe_compute_mask_ptr(live, bitmask_ptr, row_bytes, len(rows))
        else:
            for m, i in live:
                m.unsafe_compute_mask_ptr(bitmask_ptr + i * row_bytes, row_bytes)
        for m, i in live:
            if m.is_error():
                failed[i] = _reason(m.get_error())
        return ended, failed

    @staticmethod
    def advance(rows: list, tokens: list[int]) -> dict[int, str]:
        """Feed each row's sampled token to its matcher; {row index: why} where the grammar refused it."""
        failed = {}
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            m = row.matcher
            if m.is_stopped():
                continue
            if not m.consume_token(tok):
                failed[i] = _reason(m.get_error())
        return failed


class PendingMasks:
    """A step's grammar masks while the worker computes them."""

    def __init__(self, future: Future, bitmask, eos_row) -> None:
        self._future = future
        self._bitmask = bitmask
        self._eos_row = eos_row

    def result(self):
        """([R, words] int32 bitmask, {row: why its grammar failed}), once the worker is done."""
        ended, failed = self._future.result()
        for i in ended:
            self._bitmask[i] = self._eos_row
        return self._bitmask, failed


def _bit(k: int) -> int:
    """Bit k of an int32 word, as the signed value torch holds."""
    return -(1 << 31) if k == 31 else 1 << k
