"""Iteration-level continuous batching.

Every step the scheduler fills a token budget: first the running sequences (one token
each when decoding, a chunk when their prompt is still being prefilled), then waiting
sequences in arrival order. A long prompt is cut into chunks so it never stalls the
decodes beside it. When KV blocks run out the most recently admitted sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.

A sequence's next token depends on the last, so with several micro-batches in flight each
holds different sequences, about an equal share. With lookahead, a decode step is also
scheduled while the step that samples its input token is still in flight: the first stage
takes that token straight from the last stage, so the driver's round trip (receive, update,
schedule, send) leaves the ring's critical path. A micro-batch then has a successor queued
behind it, and a sequence is in at most two steps at once. The driver learns of a stop one
step late; the step already in flight for it is computed and ignored.
"""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass

from batching.batch import PENDING, Batch, SeqInit, SeqWork, StepOutput
from batching.block_manager import BlockManager
from batching.sampling_params import check_context
from batching.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    # Batches in flight at once (the pipeline's stage count): each takes about this share of the sequences.
    num_micro_batches: int = 1
    # Schedule each micro-batch's next decode step before its sampled tokens come back (see above).
    lookahead: bool = False
    # Where every layer attends only to its last this many positions: a sequence's blocks that have left the window
    # are given back as its steps land.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be at least 1, got {self.num_micro_batches}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {self.num_blocks * self.block_size} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len}; give it more memory or lower max_model_len"
            )


@dataclass(slots=True)
class SeqUpdate:
    """What one step did to one sequence."""

    seq: Sequence
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.seqs: dict[int, Sequence] = {}
        self.released: list[int] = []  # finished sequences the stages still hold state for
        self.in_flight: dict[int, Batch] = {}  # in submission order
        self._followed: set[int] = set()  # in-flight batches whose successor is already scheduled
        self.num_preemptions = 0
        self._next_batch_id = 0
        self._seed_rng = random.Random()

    # ---- requests ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        check_context(seq.num_tokens, None, self.config.max_model_len)
        if seq.seq_id in self.seqs:
            raise ValueError(f"sequence {seq.seq_id} already exists")
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int, reason: FinishReason = FinishReason.ABORT) -> Sequence | None:
        """End a sequence now and free its blocks at once (its in-flight steps are ignored)."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.is_finished:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, reason)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.release(seq)
        del self.seqs[seq.seq_id]
        if seq.known_to_stages:
            self.released.append(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- scheduling -------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """The next step's work, or None when every schedulable sequence is in flight."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []
        preempted = False
        # With P micro-batches in flight, one batch takes its share of the sequences so the next has some too.
        active = min(len(self.running) + len(self.waiting), cfg.max_num_seqs)
        max_seqs = max(1, -(-active // cfg.num_micro_batches))
        source = self._lookahead_source()
        follows = self._followers(source) if source is not None else set()

        # Running sequences first, oldest first; make room by preempting the newest.
        i = 0
        while i < len(self.running) and budget > 0 and len(work) < max_seqs:
            seq = self.running[i]
            if seq.in_flight:
                # Its next token is the one in flight; no sequence is preempted to make room for it.
                if seq.seq_id in follows and self.blocks.ensure(seq, seq.num_computed_tokens + 1):
                    work.append((seq, 1))
                    budget -= 1
                i += 1
                continue
            n_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.ensure(seq, seq.num_computed_tokens + n_new):
                victim = self._newest_preemptible(after=i)
                if victim is None:
                    break
                self._preempt(victim)
                preempted = True
            else:
                work.append((seq, n_new))
                budget -= n_new
                i += 1
                continue
            # No victim: every newer sequence is in flight, or there is none.
            preempted = True
            if any(s.in_flight for s in self.running[i + 1 :]):
                # Newer sequences are in flight: wait for them to land and preempt them then.
                # Preempting this older one instead lets two sequences that do not fit together
                # undo each other's work forever.
                i += 1
                continue
            self._preempt(seq)

        # Then waiting sequences in arrival order; none jumps the queue.
        while (self.waiting and budget > 0 and not preempted and len(self.running) < cfg.max_num_seqs
               and len(work) < max_seqs):
            seq = self.waiting[0]
            hit_blocks = self.blocks.can_prefix_hits(seq)
            remaining = seq.num_tokens - hit_blocks * cfg.block_size
            n_new = min(remaining, budget)
            need = self.blocks.blocks_needed(hit_blocks * cfg.block_size + n_new) - hit_blocks
            # Evictable blocks the hits would pin no longer count as free.
            pinned = sum(
                1 for h in seq.block_hashes[:hit_blocks] if self.blocks.ref_counts[self.blocks.cached[h]] == 0
            )
            if need + pinned > self.blocks.num_free_blocks:
                break
            self.waiting.popleft()
            cached = self.blocks.allocate_prefix(seq)
            seq.num_computed_tokens = cached
            if seq.num_preemptions == 0 and seq.first_scheduled_time is None:
                seq.num_cached_tokens = cached
            ok = self.blocks.ensure(seq, cached + n_new)
            assert ok, "block accounting went wrong"
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            work.append((seq, n_new))
            budget -= n_new

        if not work:
            return None
        if source is not None:
            self._followed.add(source.batch_id)
        return self._make_batch(work)

    def _lookahead_source(self) -> Batch | None:
        """The in-flight batch whose successor to schedule now: the oldest without one. Only once every micro-batch
        is in flight, or when nothing else is there to start one: a successor queued in front of a fresh
        micro-batch would make the first stage wait for its tokens."""
        if not self.config.lookahead or not self.in_flight:
            return None
        if len(self.in_flight) < self.config.num_micro_batches and (
            self.waiting or any(not s.in_flight for s in self.running)
        ):
            return None
        return next((b for b in self.in_flight.values() if b.batch_id not in self._followed), None)

    def _followers(self, batch: Batch) -> set[int]:
        """Sequences of `batch` whose next step may be scheduled now: it samples their last known token, it is
        their only step in flight, and the token it samples will not end them by length."""
        out = set()
        limit = self.config.max_model_len
        for w in batch.seqs:
            seq = self.seqs.get(w.seq_id)
            if (seq is None or not w.sample or seq.num_in_flight != 1
                    or seq.num_computed_tokens != seq.num_tokens or seq.num_tokens + 1 >= limit):
                continue
            max_tokens = seq.params.max_tokens
            if max_tokens is None or len(seq.output_token_ids) + 1 < max_tokens:
                out.add(seq.seq_id)
        return out

    def _newest_preemptible(self, after: int) -> Sequence | None:
        for seq in reversed(self.running[after + 1 :]):
            if not seq.in_flight:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _make_batch(self, work: list[tuple[Sequence, int]]) -> Batch:
        seqs = []
        for seq, n_new in work:
            start = seq.num_computed_tokens
            end = start + n_new
            known = min(end, seq.num_tokens)  # beyond: the token its step in flight samples
            init = None
            if not seq.known_to_stages:
                seed = seq.params.seed if seq.params.seed is not None else self._seed_rng.getrandbits(63)
                init = SeqInit(params=seq.params, prompt_token_ids=seq.prompt_token_ids, seed=seed)
                seq.known_to_stages = True
            seqs.append(
                SeqWork(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_ids_slice(start, known) + [PENDING] * (end - known),
                    start_pos=start,
                    blocks_from=seq.num_blocks_sent,
                    blocks=seq.block_table[seq.num_blocks_sent :],
                    sample=end >= seq.num_tokens,
                    init=init,
                )
            )
            seq.num_blocks_sent = len(seq.block_table)
            seq.num_computed_tokens = end
            seq.num_in_flight += 1
            self.blocks.commit_full_blocks(seq, known)
        batch = Batch(batch_id=self._next_batch_id, seqs=seqs, released=self.released)
        self.released = []
        self._next_batch_id += 1
        self.in_flight[batch.batch_id] = batch
        return batch

    # ---- results ----------------------------------------------------------------------
    def update(self, out: StepOutput) -> list[SeqUpdate]:
        """Apply a step's sampled tokens; returns the sequences that advanced or finished."""
        batch = self.in_flight.pop(out.batch_id)
        self._followed.discard(batch.batch_id)
        window = self.config.sliding_window
        for w in batch.seqs:
            seq = self.seqs.get(w.seq_id)
            if seq is not None:
                seq.num_in_flight -= 1
                if window is not None and seq.block_table:
                    # Every later query is at this step's end or after: it attends from end + 1 - window on.
                    self.blocks.drop_before(seq, w.start_pos + len(w.token_ids) + 1 - window)
        updates = []
        now = None
        for seq_id, token in zip(out.seq_ids, out.token_ids):
            seq = self.seqs.get(seq_id)
            if seq is None:  # aborted while in flight
                continue
            seq.output_token_ids.append(token)
            if seq.num_computed_tokens >= seq.num_tokens:  # a step of the token is in flight: its block may be full
                self.blocks.commit_full_blocks(seq, seq.num_tokens)
            if seq.first_token_time is None:
                seq.first_token_time = now = now or time.monotonic()
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            updates.append(SeqUpdate(seq, [token], reason is not None))
        return updates

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return FinishReason.STOP
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
