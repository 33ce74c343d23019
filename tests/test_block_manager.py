"""BlockManager: allocation, reference counts, the prefix cache and its LRU eviction."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batching import BlockManager, SamplingParams, Sequence

_ids = itertools.count()


def make_seq(tokens, seq_id=None) -> Sequence:
    return Sequence(next(_ids) if seq_id is None else seq_id, list(tokens), SamplingParams(max_tokens=8))


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What the scheduler does for a step: blocks for the tokens, then publish the full ones."""
    assert bm.ensure(seq, num_tokens)
    bm.commit_full_blocks(seq, num_tokens)


def admit(bm: BlockManager, seq: Sequence) -> int:
    cached = bm.allocate_prefix(seq)
    compute(bm, seq, seq.num_tokens)
    return cached


def check_all(bm: BlockManager, live: list[Sequence]) -> None:
    """check_invariants plus what only the caller can know: who holds which block."""
    bm.check_invariants()
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == sum(s.block_table.count(b) for s in live), f"ref count of block {b}"
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"
    for b in bm.free:
        assert bm.block_hash[b] is None, "a free block kept its hash"
    for b in bm.evictable:
        assert bm.cached.get(bm.block_hash[b]) == b, "an evictable block is not in the prefix cache"
    used = {b for s in live for b in s.block_table}
    assert bm.num_used_blocks == len(used)
    assert bm.num_free_blocks == bm.num_blocks - len(used)


# ---- allocation and accounting -------------------------------------------------------------
def test_constructor_rejects_empty_cache():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_blocks_needed_rounds_up():
    bm = BlockManager(8, 4)
    assert [bm.blocks_needed(n) for n in range(0, 10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_ensure_and_release_accounting():
    bm = BlockManager(8, 4)
    seq = make_seq(range(10))
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0 and bm.usage == 0.0
    assert bm.ensure(seq, 10)
    assert seq.block_table == [0, 1, 2]  # lowest ids first
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(3 / 8)
    # Already covered: nothing changes.
    assert bm.ensure(seq, 12)
    assert bm.ensure(seq, 1)
    assert seq.block_table == [0, 1, 2]
    assert bm.ensure(seq, 13)
    assert seq.block_table == [0, 1, 2, 3] and bm.num_free_blocks == 4
    # Too many: False and no change at all.
    other = make_seq(range(100))
    assert not bm.ensure(other, 4 * 5)
    assert other.block_table == [] and bm.num_free_blocks == 4
    assert bm.ensure(other, 4 * 4)
    assert bm.num_free_blocks == 0
    check_all(bm, [seq, other])
    seq.num_blocks_sent = 4
    bm.release(seq)
    assert seq.block_table == [] and seq.num_blocks_sent == 0
    assert bm.num_free_blocks == 4
    bm.release(other)
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    check_all(bm, [])


def test_release_twice_is_caught():
    bm = BlockManager(4, 4)
    seq = make_seq(range(5))
    assert bm.ensure(seq, 5)
    table = list(seq.block_table)
    bm.release(seq)
    seq.block_table.extend(table)
    with pytest.raises(AssertionError):
        bm.release(seq)


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, 4)
    seq = make_seq(range(5))
    assert bm.ensure(seq, 5)
    bm.check_invariants()
    bm.free.append(seq.block_table[0])  # a referenced block also on the free list
    with pytest.raises(AssertionError):
        bm.check_invariants()


# ---- prefix cache ----------------------------------------------------------------------------
def test_shared_prefix_shares_exactly_the_full_blocks():
    bm = BlockManager(32, 4)
    base = list(range(100, 113))  # 3 full blocks and one token
    a = make_seq(base)
    assert admit(bm, a) == 0
    assert len(a.block_table) == 4 and len(bm.cached) == 3

    # Same 3 full blocks, then a different tail.
    b = make_seq(base[:12] + [7, 7, 7, 7, 7])
    assert bm.can_prefix_hits(b) == 3
    assert bm.allocate_prefix(b) == 12
    assert b.block_table == a.block_table[:3]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 2, 1]
    compute(bm, b, b.num_tokens)
    assert not set(b.block_table[3:]) & set(a.block_table)

    # The identical prompt: the last, partial block is never shared.
    c = make_seq(base)
    assert bm.allocate_prefix(c) == 12
    assert c.block_table == a.block_table[:3]
    compute(bm, c, c.num_tokens)
    assert c.block_table[3] != a.block_table[3]
    assert bm.ref_counts[a.block_table[3]] == 1

    # A prompt made only of cached full blocks still leaves its last token to compute.
    d = make_seq(base[:12])
    assert bm.can_prefix_hits(d) == 2
    assert bm.allocate_prefix(d) == 8
    assert d.block_table == a.block_table[:2]
    one_block = make_seq(base[:4])
    assert bm.allocate_prefix(one_block) == 0 and one_block.block_table == []

    # A different first block means no hit at all, even if later blocks match.
    e = make_seq([0] + base[1:])
    assert bm.allocate_prefix(e) == 0
    # Counted in tokens, as vLLM counts them: every prompt token looked up, and those found.
    assert bm.prefix_hits == 12 + 12 + 8 and bm.prefix_queries == 13 + 17 + 13 + 12 + 4 + 13
    check_all(bm, [a, b, c, d, one_block, e])


def test_hash_chain_covers_the_whole_prefix():
    bm = BlockManager(16, 2)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)
    # Second block equal to a's second block, first block different: no hit for it.
    b = make_seq([9, 9, 3, 4, 5])
    assert bm.allocate_prefix(b) == 0


def test_commit_publishes_only_computed_full_blocks():
    bm = BlockManager(16, 4)
    prompt = list(range(20))
    a = make_seq(prompt)
    assert bm.allocate_prefix(a) == 0  # hashes the prompt's full blocks ahead of computing them
    compute(bm, a, 10)  # a first chunk: blocks 0..1 full, block 2 half written
    assert len(a.block_table) == 3
    assert len(bm.cached) == 2
    assert bm.block_hash[a.block_table[2]] is None
    b = make_seq(prompt)
    assert bm.allocate_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    compute(bm, a, 12)  # the chunk that fills block 2
    assert len(bm.cached) == 3
    c = make_seq(prompt)
    assert bm.allocate_prefix(c) == 12
    check_all(bm, [a, b, c])


def test_release_keeps_full_blocks_cached_for_reuse():
    bm = BlockManager(8, 4)
    prompt = list(range(9))  # 2 full blocks and one token
    a = make_seq(prompt)
    admit(bm, a)
    full, partial = a.block_table[:2], a.block_table[2]
    bm.release(a)
    assert bm.num_free_blocks == 8
    assert list(bm.evictable) == [full[1], full[0]]  # the tail is freed first
    assert partial in bm.free
    check_all(bm, [])
    b = make_seq(prompt + [50])
    assert bm.allocate_prefix(b) == 8
    assert b.block_table == full
    assert not bm.evictable  # taken back out of the evictable list
    assert [bm.ref_counts[x] for x in full] == [1, 1]
    assert bm.num_free_blocks == 6
    check_all(bm, [b])


def test_ref_counts_follow_sharing():
    bm = BlockManager(16, 2)
    prompt = [1, 2, 3, 4, 5]
    seqs = [make_seq(prompt) for _ in range(4)]
    for s in seqs:
        admit(bm, s)
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs)
    assert [bm.ref_counts[x] for x in shared] == [4, 4]
    check_all(bm, seqs)
    for k, s in enumerate(seqs[:3]):
        bm.release(s)
        assert [bm.ref_counts[x] for x in shared] == [3 - k, 3 - k]
        assert not set(shared) & (set(bm.free) | set(bm.evictable))
        check_all(bm, seqs[k + 1 :])
    bm.release(seqs[3])
    assert set(shared) <= set(bm.evictable)
    check_all(bm, [])


def test_eviction_is_least_recently_freed_first():
    bm = BlockManager(3, 2)
    x, y, z = make_seq([1, 1]), make_seq([2, 2]), make_seq([3, 3])
    for s in (x, y, z):
        compute(bm, s, 2)
    bx, by, bz = x.block_table[0], y.block_table[0], z.block_table[0]
    hx, hy, hz = (bm.block_hash[b] for b in (bx, by, bz))
    assert len({hx, hy, hz}) == 3 and len(bm.cached) == 3
    for s in (y, z, x):  # freed in this order
        bm.release(s)
    assert list(bm.evictable) == [by, bz, bx]
    check_all(bm, [])

    w = make_seq([8, 8, 8, 8])
    assert bm.ensure(w, 2)
    assert w.block_table == [by]  # y's block was freed longest ago
    assert hy not in bm.cached and bm.block_hash[by] is None
    assert bm.cached[hx] == bx and bm.cached[hz] == bz
    assert bm.can_prefix_hits(make_seq([2, 2, 0])) == 0
    assert bm.can_prefix_hits(make_seq([1, 1, 0])) == 1
    check_all(bm, [w])

    assert bm.ensure(w, 4)
    assert w.block_table == [by, bz]
    assert hz not in bm.cached and list(bm.evictable) == [bx]
    check_all(bm, [w])

    # A hit refreshes nothing in the order but pins the block: it cannot be evicted.
    v = make_seq([1, 1, 0])
    assert bm.allocate_prefix(v) == 2 and v.block_table == [bx]
    assert bm.num_free_blocks == 0
    assert not bm.ensure(v, 3)
    check_all(bm, [w, v])


def test_never_used_blocks_go_before_evicting_cached_ones():
    bm = BlockManager(4, 2)
    a = make_seq([1, 2, 3])
    admit(bm, a)  # one full block (cached) and one partial
    cached_block = a.block_table[0]
    bm.release(a)
    assert list(bm.evictable) == [cached_block]
    b = make_seq(range(50))
    assert bm.ensure(b, 6)  # three blocks: all from the free list
    assert cached_block not in b.block_table
    assert bm.cached.get(bm.block_hash[cached_block]) == cached_block
    assert bm.ensure(b, 8)  # now the cached block has to go
    assert cached_block in b.block_table and not bm.cached
    check_all(bm, [b])


def test_evicted_prefix_head_before_continuation_is_kept():
    """Freed tail first: under pressure a sequence's continuation is evicted before its head."""
    bm = BlockManager(3, 2)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)
    head, mid, tail = a.block_table
    bm.release(a)
    assert list(bm.evictable) == [mid, head] and bm.free == [tail]
    b = make_seq([9] * 6)
    assert bm.ensure(b, 4)
    assert b.block_table == [tail, mid]
    again = make_seq([1, 2, 3, 4, 5])
    assert bm.can_prefix_hits(again) == 1  # the head survived
    check_all(bm, [b])


def test_same_content_in_two_blocks_is_registered_once():
    bm = BlockManager(16, 2)
    prompt = [4, 5, 6, 7, 8]
    a, b = make_seq(prompt), make_seq(prompt)
    # Both admitted before either computed anything: no hits, separate blocks.
    assert bm.allocate_prefix(a) == 0 and bm.allocate_prefix(b) == 0
    assert bm.ensure(a, 5) and bm.ensure(b, 5)
    assert not set(a.block_table) & set(b.block_table)
    bm.commit_full_blocks(a, 5)
    bm.commit_full_blocks(b, 5)
    assert len(bm.cached) == 2
    assert set(bm.cached.values()) == set(a.block_table[:2])
    check_all(bm, [a, b])
    # b's duplicates are plain blocks when freed: nothing of them enters the cache.
    bm.release(b)
    assert not bm.evictable and bm.num_free_blocks == 13
    check_all(bm, [a])
    c = make_seq(prompt)
    head = a.block_table[:2]
    assert bm.allocate_prefix(c) == 4 and c.block_table == head
    bm.release(a)
    assert not bm.evictable  # c still holds the cached blocks
    bm.release(c)
    assert list(bm.evictable) == [head[1], head[0]]
    check_all(bm, [])


def test_duplicate_block_does_not_replace_the_cached_one_when_freed_first():
    bm = BlockManager(8, 2)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3])
    bm.allocate_prefix(a), bm.allocate_prefix(b)
    compute(bm, a, 3)
    compute(bm, b, 3)
    first = a.block_table[0]
    h = bm.block_hash[first]
    bm.release(a)
    assert bm.cached[h] == first and first in bm.evictable
    bm.release(b)
    assert bm.cached[h] == first and list(bm.evictable) == [first]
    check_all(bm, [])


def test_prefix_caching_disabled():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    assert admit(bm, a) == 0
    assert not bm.cached and all(h is None for h in bm.block_hash)
    b = make_seq([1, 2, 3, 4, 5])
    assert bm.can_prefix_hits(b) == 0 and bm.allocate_prefix(b) == 0
    bm.release(a)
    assert not bm.evictable and bm.num_free_blocks == 8
    check_all(bm, [])


# ---- a state machine over every operation ----------------------------------------------------
BASES = [[(7 * i + k) % 5 for i in range(40)] for k in range(3)]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions, growth, commits and releases against a model of what each block holds."""

    def __init__(self):
        super().__init__()
        self.bm: BlockManager | None = None
        self.live: list[Sequence] = []
        self.computed: dict[int, int] = {}  # seq_id -> tokens computed
        self.content: dict[int, tuple | None] = {}  # block -> the token prefix it holds once full

    @precondition(lambda self: self.bm is None)
    @rule(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 3, 4]), prefix=st.booleans())
    def init(self, num_blocks, block_size, prefix):
        self.bm = BlockManager(num_blocks, block_size, prefix)

    def _record(self, seq: Sequence, before: list[int]) -> None:
        bs = self.bm.block_size
        for b in seq.block_table[len(before) :]:
            self.content[b] = None  # fresh: nothing written yet
        n = self.computed[seq.seq_id]
        tokens = seq.token_ids_slice(0, seq.num_tokens)
        for i in range(n // bs):
            b = seq.block_table[i]
            want = tuple(tokens[: (i + 1) * bs])
            if self.content.get(b) is not None:
                assert self.content[b] == want, "a block is shared by sequences with different prefixes"
            self.content[b] = want

    @precondition(lambda self: self.bm is not None)
    @rule(base=st.integers(0, 2), shared=st.integers(0, 40), tail=st.lists(st.integers(0, 4), max_size=6))
    def add(self, base, shared, tail):
        tokens = BASES[base][:shared] + tail
        if not tokens:
            return
        seq = make_seq(tokens)
        bm = self.bm
        expect = bm.can_prefix_hits(seq)
        cached = bm.allocate_prefix(seq)
        assert cached == expect * bm.block_size
        assert cached <= seq.num_tokens - 1
        if not bm.enable_prefix_caching:
            assert cached == 0
        for i, b in enumerate(seq.block_table):
            assert self.content.get(b) == tuple(tokens[: (i + 1) * bm.block_size]), "a hit on unwritten KV"
        self.computed[seq.seq_id] = cached
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), k=st.integers(1, 12))
    def compute(self, i, k):
        seq = self.live[i % len(self.live)]
        bm = self.bm
        target = min(seq.num_tokens, self.computed[seq.seq_id] + k)
        before = list(seq.block_table)
        free = bm.num_free_blocks
        need = bm.blocks_needed(target) - len(before)
        if bm.ensure(seq, target):
            assert len(seq.block_table) == max(len(before), bm.blocks_needed(target))
            assert seq.block_table[: len(before)] == before
            assert bm.num_free_blocks == free - max(need, 0)
            self.computed[seq.seq_id] = target
            bm.commit_full_blocks(seq, target)
            self._record(seq, before)
        else:
            assert need > free
            assert seq.block_table == before and bm.num_free_blocks == free

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 4))
    def decode(self, i, token):
        seq = self.live[i % len(self.live)]
        if self.computed[seq.seq_id] == seq.num_tokens:
            seq.output_token_ids.append(token)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        seq = self.live.pop(i % len(self.live))
        free = self.bm.num_free_blocks
        still_used = {b for s in self.live for b in s.block_table}
        freed = set(seq.block_table) - still_used
        self.bm.release(seq)
        assert seq.block_table == [] and seq.num_blocks_sent == 0
        assert self.bm.num_free_blocks == free + len(freed)
        check_all(self.bm, self.live)

    @invariant()
    def consistent(self):
        if self.bm is not None:
            check_all(self.bm, self.live)

    def teardown(self):
        if self.bm is None:
            return
        for seq in self.live:
            self.bm.release(seq)
        check_all(self.bm, [])
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(r == 0 for r in self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
