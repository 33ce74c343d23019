"""Scheduler: token budget, chunked prefill, FCFS, prefix cache, preemption, abort, stops.

The scheduler is driven by a fake pipeline that plays the stages: it keeps each sequence's
block table the way the stages do (from SeqWork.blocks_from/blocks), "computes" KV into a
slot map (each slot's value chains the previous position's value read back from the cache),
and samples a token from the last value. A step that reads a slot the cache never got
right therefore samples a different token, and the fake also asserts on it directly.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batching import (
    PENDING, Batch, FinishReason, SamplingParams, Scheduler, SchedulerConfig, Sequence, SequenceStatus, StepOutput,
)


VOCAB = 1000
EOS = 0


def mix(prev: int, token: int, pos: int) -> int:
    return hash((prev, token, pos)) & 0xFFFFFFFF


def content_token(seq_id: int, n_out: int, kv: int) -> int:
    """The default fake model: the next token depends on the whole context, never EOS."""
    return 1 + kv % (VOCAB - 1)


def reference_output(prompt: list[int], n: int) -> list[int]:
    """What content_token generates for a prompt with a correct KV cache."""
    toks, kv = list(prompt), 0
    for p, t in enumerate(toks):
        kv = mix(kv, t, p)
    out = []
    while len(out) < n:
        t = content_token(-1, len(out), kv)
        out.append(t)
        kv = mix(kv, t, len(toks))
        toks.append(t)
    return out


class FakeStages:
    """The pipeline: runs each Batch as it is submitted (stages see batches in order)."""

    def __init__(self, block_size: int, token_fn=content_token, window: int | None = None):
        self.bs = block_size
        self.token_fn = token_fn
        self.window = window  # a sliding window: the KV each step reads starts there
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.n_prompt: dict[int, int] = {}
        self.kv: dict[int, int] = {}

    def _slot(self, table: list[int], pos: int) -> int:
        assert pos // self.bs < len(table), f"position {pos} is past the block table {table}"
        return table[pos // self.bs] * self.bs + pos % self.bs

    def step(self, batch: Batch) -> StepOutput:
        for sid in batch.released:
            self.tables.pop(sid)
            self.tokens.pop(sid)
        ids, out = [], []
        for w in batch.seqs:
            table = self.tables.setdefault(w.seq_id, [])
            del table[w.blocks_from :]
            table.extend(w.blocks)
            if w.init is not None:
                assert w.seq_id not in self.tokens, "init sent twice"
                self.tokens[w.seq_id] = list(w.init.prompt_token_ids)
                self.n_prompt[w.seq_id] = len(w.init.prompt_token_ids)
            toks = self.tokens[w.seq_id]
            n = len(w.token_ids)
            assert n >= 1, "empty SeqWork"
            if w.token_ids == [PENDING]:  # the token this sequence's previous step sampled (as the last stage says)
                assert w.start_pos == len(toks) - 1, "a step ahead of a token not sampled yet"
            else:
                assert PENDING not in w.token_ids
                assert w.token_ids == toks[w.start_pos : w.start_pos + n]
            work_tokens = toks[w.start_pos : w.start_pos + n]
            # The KV before start_pos must be this sequence's own prefix (cached or computed), where it is read:
            # within the window of the step's first query.
            expect, first = 0, max(0, w.start_pos + 1 - self.window) if self.window else 0
            for p in range(w.start_pos):
                expect = mix(expect, toks[p], p)
                if p >= first:
                    assert self.kv.get(self._slot(table, p)) == expect, f"seq {w.seq_id}: bad KV at position {p}"
            kv = self.kv.get(self._slot(table, w.start_pos - 1)) if w.start_pos else 0
            for p, t in enumerate(work_tokens, start=w.start_pos):
                kv = mix(kv, t, p)
                self.kv[self._slot(table, p)] = kv
            if w.sample:
                assert w.start_pos + n == len(toks)
                tok = self.token_fn(w.seq_id, len(toks) - self.n_prompt[w.seq_id], kv)
                toks.append(tok)
                ids.append(w.seq_id)
                out.append(tok)
        return StepOutput(batch.batch_id, ids, out)


class Harness:
    """Drives a Scheduler with up to `depth` batches in flight, checking every Batch."""

    def __init__(self, config: SchedulerConfig, eos=frozenset(), token_fn=content_token, depth: int = 1):
        self.sched = Scheduler(config, eos)
        self.cfg = config
        self.stages = FakeStages(config.block_size, token_fn, config.sliding_window)
        self.depth = depth
        self.pending: deque[tuple[Batch, StepOutput]] = deque()
        self.batches: list[Batch] = []
        self.mirror: dict[int, list[int]] = {}  # what the stages hold, per sequence
        self.sent: set[int] = set()  # sequences whose state the stages hold
        self.ever_sent: set[int] = set()
        self.released: set[int] = set()
        self.in_flight: Counter[int] = Counter()  # steps in flight per sequence
        self.all: dict[int, Sequence] = {}
        self.admission_order: list[int] = []
        self._ids = itertools.count(1000)

    def add(self, prompt, params: SamplingParams | None = None, seq_id: int | None = None) -> Sequence:
        seq = Sequence(next(self._ids) if seq_id is None else seq_id, list(prompt), params or SamplingParams())
        self.sched.add(seq)
        self.all[seq.seq_id] = seq
        return seq

    # -- one schedule / one update -----------------------------------------------------------
    def schedule(self) -> Batch | None:
        batch = self.sched.schedule()
        self.check_state()
        if batch is None:
            return None
        self.check_batch(batch)
        self.batches.append(batch)
        self.pending.append((batch, self.stages.step(batch)))
        return batch

    def land(self):
        batch, out = self.pending.popleft()
        self.in_flight.subtract(w.seq_id for w in batch.seqs)
        self.in_flight += Counter()  # drop the zeros
        updates = self.sched.update(out)
        self.check_state()
        for u in updates:
            assert u.finished == u.seq.is_finished
        return updates

    def step(self) -> bool:
        """Fill the pipeline, then land the oldest batch. False when there was nothing to do."""
        while len(self.pending) < self.depth and self.schedule() is not None:
            pass
        if not self.pending:
            return False
        self.land()
        return True

    def run(self, max_steps: int = 20_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished() and not self.pending:
                return
            assert self.step(), "unfinished sequences but nothing schedulable and nothing in flight"
        raise AssertionError("did not finish")

    # -- checks ------------------------------------------------------------------------------
    def check_batch(self, batch: Batch) -> None:
        cfg, sched = self.cfg, self.sched
        assert batch.seqs, "an empty Batch"
        assert batch.num_tokens <= cfg.max_num_batched_tokens
        assert len(batch.seqs) <= cfg.max_num_seqs
        ids = [w.seq_id for w in batch.seqs]
        assert len(set(ids)) == len(ids), "a sequence twice in one batch"
        for sid in batch.released:
            assert sid in self.sent, f"released {sid}, which the stages never had"
            assert sid not in sched.seqs and self.all[sid].is_finished
            assert sid not in ids
            self.sent.discard(sid)
            self.mirror.pop(sid, None)
            self.released.add(sid)
        for w in batch.seqs:
            seq = sched.seqs[w.seq_id]
            assert seq.status is SequenceStatus.RUNNING and seq.in_flight
            if w.seq_id not in self.ever_sent:
                assert w.init is not None and w.init.prompt_token_ids == seq.prompt_token_ids
                self.admission_order.append(w.seq_id)
            else:
                assert w.init is None
            self.ever_sent.add(w.seq_id)
            self.sent.add(w.seq_id)
            table = self.mirror.setdefault(w.seq_id, [])
            assert 0 <= w.blocks_from <= len(table)
            del table[w.blocks_from :]
            table.extend(w.blocks)
            assert table == seq.block_table, "the stages' block table drifted from the scheduler's"
            end = w.start_pos + len(w.token_ids)
            assert end == seq.num_computed_tokens
            if w.token_ids == [PENDING]:
                # A step ahead: its one earlier step in flight samples this token, and does not end it by length.
                assert cfg.lookahead and self.in_flight[w.seq_id] == 1, "a sequence in two in-flight batches"
                assert w.start_pos == seq.num_tokens and w.sample
                assert len(seq.output_token_ids) + 1 < seq.params.max_tokens and end < cfg.max_model_len
            else:
                assert not self.in_flight[w.seq_id], "a sequence in two in-flight batches"
                assert w.token_ids == seq.token_ids_slice(w.start_pos, end)
                assert w.sample == (end == seq.num_tokens)
            assert len(seq.block_table) >= sched.blocks.blocks_needed(end)
        self.in_flight.update(ids)

    def check_state(self) -> None:
        sched, bm = self.sched, self.sched.blocks
        bm.check_invariants()
        held = Counter(b for s in sched.seqs.values() for b in s.block_table[s.num_dropped_blocks :])
        assert bm.ref_counts == [held[b] for b in range(bm.num_blocks)], "ref counts drifted from the tables"
        assert {s.seq_id for s in sched.waiting} | {s.seq_id for s in sched.running} == set(sched.seqs)
        assert len(sched.waiting) + len(sched.running) == len(sched.seqs)
        assert len(sched.running) <= self.cfg.max_num_seqs
        for s in sched.waiting:
            assert s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
            assert not s.in_flight
        for s in sched.running:
            assert s.status is SequenceStatus.RUNNING
            assert len(s.block_table) >= bm.blocks_needed(s.num_computed_tokens)
            # A step ahead computes the token its earlier step samples: of its steps in flight, those that sample a
            # token nobody knows yet.
            awaited = sum(w.sample for b in sched.in_flight.values() for w in b.seqs if w.seq_id == s.seq_id)
            assert s.num_computed_tokens <= s.num_tokens + max(0, awaited - 1)
            assert 0 <= awaited <= s.num_in_flight <= (2 if self.cfg.lookahead else 1)
        for sid in self.in_flight:
            s = self.all[sid]
            assert s.is_finished or s.status is SequenceStatus.RUNNING, "an in-flight sequence was preempted"
        for s in self.all.values():
            if s.is_finished:
                assert not s.block_table and s.seq_id not in sched.seqs


def cfg(**kw) -> SchedulerConfig:
    base = dict(num_blocks=256, block_size=4, max_num_seqs=64, max_num_batched_tokens=64, max_model_len=256)
    base.update(kw)
    return SchedulerConfig(**base)


def prompt(n: int, salt: int) -> list[int]:
    return [(salt * 31 + i * 7) % VOCAB for i in range(n)]


def work(batch: Batch, seq_id: int):
    return next((w for w in batch.seqs if w.seq_id == seq_id), None)


# ---- config ------------------------------------------------------------------------------------
def test_config_rejects_a_cache_smaller_than_one_sequence():
    with pytest.raises(ValueError):
        SchedulerConfig(num_blocks=3, block_size=4, max_model_len=16)
    SchedulerConfig(num_blocks=4, block_size=4, max_model_len=16)
    for bad in (dict(max_num_seqs=0), dict(max_num_batched_tokens=0), dict(max_model_len=1)):
        with pytest.raises(ValueError):
            SchedulerConfig(num_blocks=64, **bad)


def test_add_rejects_prompts_that_fill_the_context_and_duplicate_ids():
    h = Harness(cfg(max_model_len=16))
    with pytest.raises(ValueError):
        h.add(prompt(16, 0))
    h.add(prompt(15, 0), seq_id=1)
    with pytest.raises(ValueError):
        h.add(prompt(3, 0), seq_id=1)


# ---- budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 3])
def test_token_budget_and_max_num_seqs_are_never_exceeded(depth):
    config = cfg(max_num_seqs=3, max_num_batched_tokens=24)
    h = Harness(config, depth=depth)
    for i in range(12):
        h.add(prompt(5 + 7 * i % 40, i), SamplingParams(max_tokens=3 + i % 6))
    h.run()  # check_batch asserts the limits on every Batch
    assert max(b.num_tokens for b in h.batches) == 24
    assert max(len(b.seqs) for b in h.batches) == 3
    assert all(s.finish_reason is FinishReason.LENGTH for s in h.all.values())
    for s in h.all.values():
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params.max_tokens)


def test_schedule_returns_none_when_everything_is_in_flight():
    h = Harness(cfg())
    h.add(prompt(5, 1))
    assert h.schedule() is not None
    assert h.sched.schedule() is None
    h.land()
    assert h.schedule() is not None


def test_schedule_returns_none_when_idle():
    h = Harness(cfg())
    assert h.sched.schedule() is None
    assert not h.sched.has_unfinished()


# ---- chunked prefill ---------------------------------------------------------------------------
def test_long_prompt_is_split_into_contiguous_chunks():
    h = Harness(cfg(max_num_batched_tokens=16))
    seq = h.add(prompt(70, 3), SamplingParams(max_tokens=2))
    chunks = []
    while True:
        b = h.schedule()
        w = work(b, seq.seq_id)
        chunks.append(w)
        h.land()
        if w.sample:
            break
    assert [(w.start_pos, len(w.token_ids)) for w in chunks] == [(0, 16), (16, 16), (32, 16), (48, 16), (64, 6)]
    assert [w.sample for w in chunks] == [False] * 4 + [True]
    assert sum((w.token_ids for w in chunks), []) == seq.prompt_token_ids
    assert len(seq.output_token_ids) == 1
    h.run()
    assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 2)


def test_long_prompt_never_stalls_running_decodes():
    h = Harness(cfg(max_num_batched_tokens=16))
    decoders = [h.add(prompt(3, i), SamplingParams(max_tokens=40)) for i in range(3)]
    h.step()  # all three prefilled in one step
    assert all(len(s.output_token_ids) == 1 for s in decoders)
    long = h.add(prompt(100, 9), SamplingParams(max_tokens=3))
    chunks = []
    while not chunks or not chunks[-1].sample:
        b = h.schedule()
        for s in decoders:
            w = work(b, s.seq_id)
            assert w is not None, "a decode was left out of a step with a prefill chunk"
            assert len(w.token_ids) == 1 and w.sample
        chunks.append(work(b, long.seq_id))
        assert b.num_tokens == 16 or chunks[-1].sample
        h.land()
    pos = 0
    for w in chunks:
        assert w.start_pos == pos
        pos += len(w.token_ids)
    assert pos == 100
    assert [w.sample for w in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) == -(-100 // 13)
    h.run()
    for s in decoders + [long]:
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params.max_tokens)


# ---- FCFS --------------------------------------------------------------------------------------
def test_waiting_sequences_are_admitted_in_arrival_order():
    h = Harness(cfg(max_num_seqs=2, max_num_batched_tokens=10))
    ids = [50, 7, 31, 2, 99, 13]
    for k, sid in enumerate(ids):
        h.add(prompt(3 + 5 * (k % 3), sid), SamplingParams(max_tokens=2 + k % 3), seq_id=sid)
    h.run()
    assert h.admission_order == ids


def test_a_small_request_does_not_jump_a_big_one_waiting_for_blocks():
    # 8 blocks of 4 tokens; the first request holds 5 of them while it runs.
    h = Harness(cfg(num_blocks=8, max_model_len=32, max_num_batched_tokens=32))
    first = h.add(prompt(17, 1), SamplingParams(max_tokens=3))
    h.step()
    big = h.add(prompt(20, 2), SamplingParams(max_tokens=2))  # needs 5 blocks, 3 are free
    small = h.add(prompt(2, 3), SamplingParams(max_tokens=2))  # needs 1
    b = h.schedule()
    assert [w.seq_id for w in b.seqs] == [first.seq_id]
    assert big.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING
    h.land()
    h.run()
    assert h.admission_order == [first.seq_id, big.seq_id, small.seq_id]


# ---- prefix cache ------------------------------------------------------------------------------
def test_second_request_starts_after_the_cached_prefix():
    h = Harness(cfg())
    shared = prompt(16, 5)
    a = h.add(shared + [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=2))
    h.run()
    assert a.num_cached_tokens == 0
    b = h.add(shared + [9, 9, 9, 9], SamplingParams(max_tokens=2))
    batch = h.schedule()
    w = work(batch, b.seq_id)
    assert b.num_cached_tokens == 16
    assert w.start_pos == 16 and w.token_ids == [9, 9, 9, 9]
    assert b.num_computed_tokens == 20
    h.land()
    h.run()
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2)


def test_prefix_hit_while_the_first_request_still_runs_shares_its_blocks():
    h = Harness(cfg())
    base = prompt(13, 6)
    a = h.add(base, SamplingParams(max_tokens=20))
    h.step()
    b = h.add(base, SamplingParams(max_tokens=3))
    batch = h.schedule()
    assert b.num_cached_tokens == 12 and work(batch, b.seq_id).start_pos == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert all(h.sched.blocks.ref_counts[x] == 2 for x in a.block_table[:3])
    h.land()
    # A prompt that is all cached full blocks still computes its last token.
    c = h.add(base[:12], SamplingParams(max_tokens=2))
    batch = h.schedule()
    assert c.num_cached_tokens == 8 and work(batch, c.seq_id).start_pos == 8
    h.land()
    h.run()
    for s in (a, b, c):
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params.max_tokens)


def test_no_prefix_hits_when_caching_is_disabled():
    h = Harness(cfg(enable_prefix_caching=False))
    base = prompt(20, 7)
    h.add(base, SamplingParams(max_tokens=2))
    h.run()
    b = h.add(base, SamplingParams(max_tokens=2))
    assert work(h.schedule(), b.seq_id).start_pos == 0 and b.num_cached_tokens == 0
    h.run()


def test_aborted_partial_prefill_caches_only_computed_blocks():
    """A chunk that ends inside a block must not publish that block (nor later ones)."""
    h = Harness(cfg(block_size=16, max_num_batched_tokens=50))
    p = prompt(100, 8)
    a = h.add(p, SamplingParams(max_tokens=4))
    h.step()  # tokens 0..49 computed: blocks 0..2 full, block 3 holds two tokens
    assert a.num_computed_tokens == 50
    h.sched.abort(a.seq_id)
    b = h.add(p, SamplingParams(max_tokens=4))
    batch = h.schedule()
    assert b.num_cached_tokens == 48 and work(batch, b.seq_id).start_pos == 48
    h.land()
    h.run()
    assert b.output_token_ids == reference_output(p, 4)


def test_prefix_hit_on_a_chunk_still_in_flight():
    h = Harness(cfg(block_size=16, max_num_batched_tokens=50), depth=2)
    p = prompt(100, 8)
    a = h.add(p, SamplingParams(max_tokens=4))
    assert h.schedule() is not None  # a's first chunk, in flight
    b = h.add(p, SamplingParams(max_tokens=4))
    batch = h.schedule()  # a is in flight, so b is admitted now
    assert [w.seq_id for w in batch.seqs] == [b.seq_id]
    assert b.num_cached_tokens == 48
    h.run()
    assert a.output_token_ids == b.output_token_ids == reference_output(p, 4)


# ---- preemption --------------------------------------------------------------------------------
def test_newest_running_sequence_is_preempted_first():
    # 4 blocks of 4 tokens: four one-block sequences fill the cache, then each needs a second block.
    h = Harness(cfg(num_blocks=4, max_model_len=16, max_num_batched_tokens=64))
    a, b, c, d = (h.add(prompt(4, i), SamplingParams(max_tokens=6)) for i in range(4))
    h.step()
    assert [len(s.block_table) for s in (a, b, c, d)] == [1, 1, 1, 1]
    assert h.sched.blocks.num_free_blocks == 0
    batch = h.schedule()
    # a needs a block: d (the newest) goes; b needs one: c goes.
    assert [w.seq_id for w in batch.seqs] == [a.seq_id, b.seq_id]
    assert list(h.sched.waiting) == [c, d]
    assert [s.num_preemptions for s in (a, b, c, d)] == [0, 0, 1, 1]
    assert h.sched.num_preemptions == 2
    assert all(s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
               for s in (c, d))
    h.land()
    h.run()
    for s in (a, b, c, d):
        assert s.output_token_ids == reference_output(s.prompt_token_ids, 6)


def test_older_sequence_waits_for_in_flight_victims_instead_of_preempting_itself():
    """Two sequences that do not fit together, two batches in flight: both must finish.

    When the older one needs a block and the only newer one is in flight, the older one waits
    for it to land (and then preempts it). Preempting itself instead made the two throw away
    each other's work forever.
    """
    config = cfg(
        num_blocks=33, block_size=1, max_num_seqs=2, max_num_batched_tokens=10, max_model_len=32,
        enable_prefix_caching=False,
    )
    h = Harness(config, depth=2)
    a = h.add(prompt(20, 0), SamplingParams(max_tokens=5))
    for _ in range(3):
        h.step()
    b = h.add(prompt(20, 1), SamplingParams(max_tokens=5))
    h.run(max_steps=200)
    for s in (a, b):
        assert s.finish_reason is FinishReason.LENGTH
        assert s.output_token_ids == reference_output(s.prompt_token_ids, 5)
    assert a.num_preemptions == 0  # the older one is never the one preempted
    assert h.sched.num_preemptions > 0


def run_workload(num_blocks: int, depth: int, prefix: bool = True, window: int | None = None) -> Harness:
    h = Harness(
        cfg(num_blocks=num_blocks, max_model_len=64, max_num_batched_tokens=20, enable_prefix_caching=prefix,
            sliding_window=window),
        depth=depth,
    )
    for i in range(8):
        h.add(prompt(6 + 3 * i % 17, i % 3), SamplingParams(max_tokens=30), seq_id=i)
    h.run()
    return h


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("prefix", [True, False])
def test_preempted_sequences_recompute_to_the_same_outputs(depth, prefix):
    small = run_workload(16, depth, prefix)
    big = run_workload(1024, depth, prefix)
    assert small.sched.num_preemptions > 0
    assert big.sched.num_preemptions == 0
    assert any(s.num_preemptions > 0 for s in small.all.values())
    for sid, s in small.all.items():
        assert s.finish_reason is FinishReason.LENGTH
        assert len(s.output_token_ids) == 30
        assert s.output_token_ids == big.all[sid].output_token_ids
    for h in (small, big):
        assert h.sched.blocks.num_free_blocks == h.cfg.num_blocks
    # After a preemption the whole table is sent again from block 0.
    assert any(w.blocks_from > 0 for b in small.batches for w in b.seqs)
    resent = [w for b in small.batches for w in b.seqs if w.blocks_from == 0 and w.init is None]
    assert resent


@pytest.mark.parametrize("depth", [1, 2])
def test_blocks_that_leave_a_sliding_window_go_back_as_steps_land(depth):
    """Every position a step reads lies in its window and holds the sequence's own KV (FakeStages checks); the
    blocks before it serve others meanwhile, so a cache too small without the window preempts less with it."""
    windowed = run_workload(16, depth, window=6)
    assert windowed.sched.num_preemptions < run_workload(16, depth).sched.num_preemptions
    for s in windowed.all.values():
        assert s.output_token_ids == reference_output(s.prompt_token_ids, 30)
    assert windowed.sched.blocks.num_free_blocks == 16


# ---- blocks sent to stages ---------------------------------------------------------------------
def test_stage_tables_follow_the_scheduler():
    h = Harness(cfg(num_blocks=12, max_model_len=40, max_num_batched_tokens=12), depth=2)
    for i in range(6):
        h.add(prompt(4 + 5 * i % 23, i % 2), SamplingParams(max_tokens=12))
    h.run()  # check_batch rebuilds each table from blocks_from/blocks and compares on every Batch
    assert h.sched.num_preemptions > 0
    assert any(w.blocks_from > 0 and w.blocks for b in h.batches for w in b.seqs)  # a table grows
    assert any(not w.blocks for b in h.batches for w in b.seqs)  # a decode inside its last block


# ---- abort -------------------------------------------------------------------------------------
def test_abort_waiting_sequence():
    h = Harness(cfg(max_num_seqs=1))
    running = h.add(prompt(5, 1), SamplingParams(max_tokens=5))
    waiting = h.add(prompt(5, 2), SamplingParams(max_tokens=5))
    h.step()
    assert waiting.status is SequenceStatus.WAITING
    assert h.sched.abort(waiting.seq_id) is waiting
    assert waiting.is_finished and waiting.finish_reason is FinishReason.ABORT
    assert waiting not in h.sched.waiting
    assert h.sched.abort(waiting.seq_id) is None
    b = h.schedule()
    assert b.released == []  # the stages never saw it
    h.land()
    h.run()
    assert waiting.seq_id not in h.ever_sent
    assert running.finish_reason is FinishReason.LENGTH


def test_abort_preempted_sequence_releases_its_stage_state():
    h = Harness(cfg(num_blocks=4, max_model_len=16))
    a, b, c = (h.add(prompt(4, i), SamplingParams(max_tokens=6)) for i in range(3))
    h.step()
    h.step()  # c is preempted back to waiting
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    h.sched.abort(c.seq_id)
    assert work(h.schedule(), a.seq_id) is not None
    assert h.batches[-1].released == [c.seq_id]


def test_abort_running_sequence_frees_blocks_at_once():
    h = Harness(cfg())
    keep = h.add(prompt(10, 1), SamplingParams(max_tokens=8))
    gone = h.add(prompt(10, 2), SamplingParams(max_tokens=8))
    h.step()
    h.step()
    assert gone.status is SequenceStatus.RUNNING and not gone.in_flight
    held = len(gone.block_table)
    assert held == 3
    free = h.sched.blocks.num_free_blocks
    assert h.sched.abort(gone.seq_id) is gone
    assert h.sched.blocks.num_free_blocks == free + held and not gone.block_table
    assert gone not in h.sched.running
    b = h.schedule()
    assert b.released == [gone.seq_id]
    assert work(b, gone.seq_id) is None
    h.land()
    h.run()
    assert sum(b.released.count(gone.seq_id) for b in h.batches) == 1
    assert keep.output_token_ids == reference_output(keep.prompt_token_ids, 8)


def test_abort_in_flight_sequence_ignores_its_output():
    h = Harness(cfg(), depth=2)
    keep = h.add(prompt(6, 1), SamplingParams(max_tokens=5))
    gone = h.add(prompt(9, 2), SamplingParams(max_tokens=5))
    h.step()
    batch = h.schedule()
    assert {w.seq_id for w in batch.seqs} == {keep.seq_id, gone.seq_id}
    assert gone.in_flight
    n_out = len(gone.output_token_ids)
    free = h.sched.blocks.num_free_blocks
    held = len(gone.block_table)
    h.sched.abort(gone.seq_id)
    assert h.sched.blocks.num_free_blocks == free + held  # at once, not when the step lands
    assert gone.finish_reason is FinishReason.ABORT
    out = h.pending[0][1]
    assert gone.seq_id in out.seq_ids  # the stages did sample it ...
    updates = h.land()
    assert [u.seq.seq_id for u in updates] == [keep.seq_id]  # ... but update drops it
    assert len(gone.output_token_ids) == n_out
    b = h.schedule()
    assert gone.seq_id in b.released and work(b, gone.seq_id) is None
    h.run()
    assert keep.output_token_ids == reference_output(keep.prompt_token_ids, 5)
    assert h.sched.blocks.num_free_blocks == h.cfg.num_blocks


def test_abort_unknown_or_finished_returns_none():
    h = Harness(cfg())
    assert h.sched.abort(12345) is None
    s = h.add(prompt(3, 1), SamplingParams(max_tokens=1))
    h.run()
    assert s.finish_reason is FinishReason.LENGTH
    assert h.sched.abort(s.seq_id) is None and s.finish_reason is FinishReason.LENGTH


# ---- stop conditions ---------------------------------------------------------------------------
def scripted(script: dict[int, list[int]]):
    return lambda seq_id, n_out, kv: script[seq_id][n_out]


def run_scripted(script, params: dict[int, SamplingParams], eos=frozenset({EOS}), depth: int = 1, **kw) -> Harness:
    h = Harness(cfg(**kw), eos=eos, token_fn=scripted(script), depth=depth)
    for sid, p in params.items():
        h.add(prompt(5, sid), p, seq_id=sid)
    h.run()
    return h


def test_eos_stops_unless_ignored():
    script = {1: [5, 6, EOS, 7, 8, 9], 2: [5, 6, EOS, 7, 8, 9]}
    h = run_scripted(script, {1: SamplingParams(max_tokens=6), 2: SamplingParams(max_tokens=6, ignore_eos=True)})
    a, b = h.all[1], h.all[2]
    assert a.output_token_ids == [5, 6, EOS] and a.finish_reason is FinishReason.STOP
    assert b.output_token_ids == script[2] and b.finish_reason is FinishReason.LENGTH


def test_stop_token_ids_stop_even_with_ignore_eos():
    script = {1: [5, 6, 42, 7, 8], 2: [5, 6, 7, 8, 9]}
    p = SamplingParams(max_tokens=5, stop_token_ids=[42], ignore_eos=True)
    h = run_scripted(script, {1: p, 2: p})
    assert h.all[1].output_token_ids == [5, 6, 42] and h.all[1].finish_reason is FinishReason.STOP
    assert h.all[2].output_token_ids == script[2] and h.all[2].finish_reason is FinishReason.LENGTH


def test_min_tokens_suppresses_early_stops():
    script = {
        1: [EOS, EOS, 42, 5, EOS, 6, 7],
        2: [EOS, 42, EOS, 5, 6, 7, 8],
        3: [EOS, 5, 6, 7, 8, 9, 10],
    }
    params = {
        1: SamplingParams(max_tokens=7, min_tokens=4, stop_token_ids=[42]),
        2: SamplingParams(max_tokens=7, min_tokens=3),
        3: SamplingParams(max_tokens=7, min_tokens=2),
    }
    h = run_scripted(script, params)
    assert h.all[1].output_token_ids == [EOS, EOS, 42, 5, EOS]
    assert h.all[2].output_token_ids == [EOS, 42, EOS]
    assert h.all[3].output_token_ids == script[3]
    assert [h.all[i].finish_reason for i in (1, 2, 3)] == [FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH]
    for s in h.all.values():
        if s.finish_reason is FinishReason.STOP:
            assert len(s.output_token_ids) >= s.params.min_tokens


def test_max_tokens_finishes_with_length():
    script = {sid: list(range(10, 30)) for sid in range(1, 4)}
    h = Harness(cfg(), eos=frozenset({EOS}), token_fn=scripted(script))
    seqs = [h.add(prompt(5, sid), SamplingParams(max_tokens=sid * 3), seq_id=sid) for sid in range(1, 4)]
    finished_at = {}
    while h.sched.has_unfinished():
        h.schedule()
        for u in h.land():
            assert u.new_token_ids == [u.seq.output_token_ids[-1]]
            if u.finished:
                assert u.seq.seq_id not in finished_at
                finished_at[u.seq.seq_id] = len(u.seq.output_token_ids)
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert s.output_token_ids == script[s.seq_id][: s.params.max_tokens]
        assert finished_at[s.seq_id] == s.params.max_tokens
        assert s.status is SequenceStatus.FINISHED


def test_stop_token_on_the_last_allowed_token_is_a_stop():
    h = run_scripted({1: [5, 6, EOS]}, {1: SamplingParams(max_tokens=3)})
    assert h.all[1].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("max_tokens", [None, 100])
def test_max_model_len_finishes_with_length(max_tokens):
    h = Harness(cfg(max_model_len=16), eos=frozenset({EOS}))
    s = h.add(prompt(10, 1), SamplingParams(max_tokens=max_tokens))
    h.run()
    assert s.finish_reason is FinishReason.LENGTH
    assert len(s.output_token_ids) == 6 and s.num_tokens == 16
    assert s.output_token_ids == reference_output(s.prompt_token_ids, 6)


# ---- lookahead ---------------------------------------------------------------------------------
def test_lookahead_queues_each_micro_batch_successor_behind_the_fresh_ones():
    h = Harness(cfg(num_micro_batches=2, lookahead=True), depth=4)
    for i in range(4):
        h.add(prompt(5 + i, i), SamplingParams(max_tokens=6), seq_id=i)
    a, b, a2, b2 = (h.schedule() for _ in range(4))
    assert [w.seq_id for w in a.seqs] == [0, 1] and [w.seq_id for w in b.seqs] == [2, 3]
    # Both micro-batches start before either gets a successor; each successor holds its own sequences.
    assert [(w.seq_id, w.token_ids) for w in a2.seqs] == [(0, [PENDING]), (1, [PENDING])]
    assert [(w.seq_id, w.token_ids) for w in b2.seqs] == [(2, [PENDING]), (3, [PENDING])]
    assert h.schedule() is None  # every sequence is two steps deep
    h.land()  # a lands: a2's successor comes next
    assert [(w.seq_id, w.start_pos) for w in h.schedule().seqs] == [(0, 6), (1, 7)]  # prompts of 5 and 6
    h.run()
    for s in h.all.values():
        assert s.output_token_ids == reference_output(s.prompt_token_ids, 6)
    # Two steps at a time end exactly at max_tokens: no step is scheduled past it.
    assert sum(len(b.seqs) for b in h.batches) == 4 * 6


def test_a_lone_sequence_runs_two_steps_deep():
    h = Harness(cfg(num_micro_batches=2, lookahead=True), depth=4)
    h.add(prompt(5, 1), SamplingParams(max_tokens=4), seq_id=1)
    _, second = h.schedule(), h.schedule()
    assert second.seqs[0].token_ids == [PENDING] and h.schedule() is None
    h.run()
    assert h.all[1].output_token_ids == reference_output(prompt(5, 1), 4)


def test_a_stop_seen_one_step_late_wastes_that_step_and_nothing_else():
    script = {1: [5, EOS, 7, 8, 9, 10], 2: [5, 6, 7, 8, 9, 10]}
    h = run_scripted(script, {1: SamplingParams(max_tokens=6), 2: SamplingParams(max_tokens=6)},
                     num_micro_batches=1, lookahead=True, depth=2)
    one = h.all[1]
    assert one.output_token_ids == [5, EOS] and one.finish_reason is FinishReason.STOP
    assert h.all[2].output_token_ids == script[2]
    steps_of_one = [w for b in h.batches for w in b.seqs if w.seq_id == 1]
    assert len(steps_of_one) == 3  # prefill, the EOS step, and the one scheduled ahead of the EOS
    assert h.sched.blocks.num_free_blocks == h.cfg.num_blocks


def test_a_sequence_is_never_scheduled_ahead_past_the_context():
    h = Harness(cfg(max_model_len=12, lookahead=True), depth=2)
    h.add(prompt(8, 1), SamplingParams(max_tokens=100), seq_id=1)
    h.run()
    s = h.all[1]
    assert s.num_tokens == 12 and s.finish_reason is FinishReason.LENGTH
    assert max(w.start_pos + len(w.token_ids) for b in h.batches for w in b.seqs) == 11


# ---- random workloads --------------------------------------------------------------------------
_ADD = st.tuples(st.just("add"), st.integers(1, 30), st.integers(0, 3), st.integers(1, 16))
OPS = st.one_of(
    _ADD,
    _ADD,
    _ADD,
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("schedule")),
    st.tuples(st.just("land")),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
)
BASE = prompt(40, 77)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4]),
    extra_blocks=st.integers(0, 4),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 4),
    depth=st.integers(1, 3),
    lookahead=st.booleans(),
    prefix=st.booleans(),
    initial=st.lists(_ADD, min_size=1, max_size=6),
    ops=st.lists(OPS, max_size=60),
    abort_rest=st.sampled_from([False, False, False, True]),
)
def test_random_workloads_leak_nothing(
    block_size, extra_blocks, budget, max_num_seqs, depth, lookahead, prefix, initial, ops, abort_rest
):
    max_model_len = 32
    config = SchedulerConfig(
        num_blocks=max_model_len // block_size + extra_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget, max_model_len=max_model_len, enable_prefix_caching=prefix,
        num_micro_batches=depth, lookahead=lookahead,
    )
    h = Harness(config, depth=2 * depth if lookahead else depth)
    aborted: set[int] = set()
    for op in initial + ops:
        kind = op[0]
        if kind == "add":
            _, n, shared, max_tokens = op
            # Prompts that share prefixes of BASE, so the cache gets hits.
            p = BASE[: min(n, 8 * shared)] + prompt(max(0, n - 8 * shared), len(h.all))
            h.add(p[:n], SamplingParams(max_tokens=max_tokens))
        elif kind == "step":
            h.step()
        elif kind == "schedule":
            if len(h.pending) < h.depth:
                h.schedule()
        elif kind == "land":
            if h.pending:
                h.land()
        else:
            live = sorted(h.sched.seqs)
            if live:
                sid = live[op[1] % len(live)]
                free = h.sched.blocks.num_free_blocks
                seq = h.sched.seqs[sid]
                others = {b for s in h.sched.seqs.values() if s is not seq for b in s.block_table}
                freed = len(set(seq.block_table) - others)
                assert h.sched.abort(sid) is seq
                assert h.sched.blocks.num_free_blocks == free + freed
                aborted.add(sid)
                h.check_state()
    if abort_rest:
        for sid in sorted(h.sched.seqs):
            h.sched.abort(sid)
            aborted.add(sid)
        h.check_state()
    h.run()
    while h.pending:
        h.land()
    assert not h.sched.has_unfinished() and not h.sched.waiting and not h.sched.running
    assert h.sched.blocks.num_free_blocks == config.num_blocks
    assert all(r == 0 for r in h.sched.blocks.ref_counts)
    h.sched.blocks.check_invariants()
    for sid, s in h.all.items():
        assert s.is_finished
        if sid in aborted:
            assert s.finish_reason is FinishReason.ABORT
        else:
            n = min(s.params.max_tokens, max_model_len - s.num_prompt_tokens)
            assert s.finish_reason is FinishReason.LENGTH
            assert s.output_token_ids == reference_output(s.prompt_token_ids, n)
    # Every sequence the stages were sent is released exactly once, or was released with the
    # final Batch still to come (the stages would get it in the next one).
    released_later = set(h.sched.released)
    assert h.released | released_later == h.ever_sent
    assert not h.released & released_later


# ---- no torch here -----------------------------------------------------------------------------
def test_batching_imports_without_torch():
    """In a fresh interpreter: whatever else this test session has imported, and in whatever order, is no evidence."""
    code = ("import sys, batching, batching.scheduler, batching.block_manager, batching.batch\n"
            "from batching import SamplingParams, Scheduler\n"
            "assert 'torch' not in sys.modules, 'batching imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
