"""Paged KV-cache blocks: allocation, reference counts and the prefix cache.

A block holds `block_size` consecutive tokens of one or more sequences' KV. A full block
is identified by a hash chained over every token before and in it, so two sequences
with the same prefix share the same blocks. Blocks nobody references stay cached and
are evicted least-recently-freed first when fresh blocks run out.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from batching.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    # A cryptographic hash: a crafted collision must not expose another user's KV.
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # full-block hash -> block id
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used or hashless; pop() takes the lowest
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but cached, oldest first
        # Tokens looked up in the prefix cache, and those found there (vLLM's prefix_cache_queries and _hits).
        self.prefix_hits = 0
        self.prefix_queries = 0

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------
    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes over the full blocks among its first num_tokens tokens."""
        bs = self.block_size
        n_full = num_tokens // bs
        while len(seq.block_hashes) < n_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(hash_block(parent, seq.token_ids_slice(i * bs, (i + 1) * bs)))

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix.

        Returns how many tokens that covers. At least one token is always left to compute,
        since the step that computes it produces the logits to sample from.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        self._update_hashes(seq, seq.num_tokens - 1)
        self.prefix_queries += seq.num_tokens
        hit = 0
        for h in seq.block_hashes:
            block = self.cached.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
            hit += 1
        self.prefix_hits += hit * self.block_size
        return hit * self.block_size

    def can_prefix_hits(self, seq: Sequence) -> int:
        """How many blocks of seq's prefix are cached right now (without taking them)."""
        if not self.enable_prefix_caching:
            return 0
        self._update_hashes(seq, seq.num_tokens - 1)
        hit = 0
        for h in seq.block_hashes:
            if h not in self.cached:
                break
            hit += 1
        return hit

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    # ---- allocation -------------------------------------------------------------------
    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover num_tokens tokens; False (and no change) if short."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._fresh_block())
        return True

    def _fresh_block(self) -> int:
        if self.free:
            block = self.free.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            old = self.block_hash[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def commit_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that num_tokens computed tokens have filled, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(seq, num_tokens)
        # Only blocks that num_tokens fills: seq.block_hashes may already reach further (the
        # prefix lookup hashes the whole prompt), and a block past them is not computed yet. Dropped ones are no
        # longer the sequence's.
        n_full = num_tokens // self.block_size
        for i in range(seq.num_dropped_blocks, min(n_full, len(seq.block_table))):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = seq.block_hashes[i]
            self.block_hash[block] = h
            # A block with the same content may already be cached; keep the first.
            self.cached.setdefault(h, block)

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; its blocks go back at once (cached ones stay for reuse)."""
        # Free the tail first so that, under eviction, a prefix outlives its continuation.
        for block in reversed(seq.block_table[seq.num_dropped_blocks :]):
            self._unref(block)
        seq.block_table.clear()
        seq.num_blocks_sent = 0
        seq.num_dropped_blocks = 0

    def drop_before(self, seq: Sequence, position: int) -> None:
        """Give back seq's blocks that hold only positions before `position` (which no later query attends to: they
        have left every layer's sliding window), oldest first."""
        dead = min(position // self.block_size, len(seq.block_table))
        for i in range(seq.num_dropped_blocks, dead):
            self._unref(seq.block_table[i])
        seq.num_dropped_blocks = max(seq.num_dropped_blocks, dead)

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            h = self.block_hash[block]
            if h is not None and self.cached.get(h) == block:
                self.evictable[block] = None
            else:
                self.block_hash[block] = None
                self.free.append(block)

    def check_invariants(self) -> None:
        """For tests: every block is exactly one of free, evictable or referenced."""
        free = set(self.free)
        ev = set(self.evictable)
        assert len(free) == len(self.free), "duplicate free block"
        assert not (free & ev), "block both free and evictable"
        for b in range(self.num_blocks):
            referenced = self.ref_counts[b] > 0
            assert referenced + (b in free) + (b in ev) == 1, f"block {b} in bad state"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
