"""CUDA graphs of a GPU stage's decode-only steps, as vLLM and gpt-fast replay them.

A decode step on a GPU is hundreds of small kernels, each launched from Python; replaying a captured graph launches
them at once. Graphs are captured per batch size bucket (1, 2, 4, 8, then multiples of 8), the first time a step of
that size comes, over static input buffers: a step of n sequences runs in the graph of the smallest bucket that
holds it, its rows beyond n padded to a block of the cache kept for that (their keys and values go there, and
nothing reads them). Decode attention reads the cache in place (engine.kernels.triton_paged_attention), so a graph
needs no gather sized by the batch's lengths.

Each graph is checked when it is captured: replayed over the step that asked for it, its output must equal the eager
forward's at the same padded shapes; the step itself then runs eagerly, so the cache holds its eager keys and values. A graph that cannot be captured, or differs, turns graphs off for the
stage, which then runs eagerly, as it does for steps with prefill chunks, steps traced at layer detail and batches
beyond the largest bucket.
"""
from __future__ import annotations

import sys

import torch

from engine.model.attention import AttentionMetadata

MAX_BUCKET = 256


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured at, up to the scheduler's largest batch (and MAX_BUCKET)."""
    top = max(1, min(max_num_seqs, MAX_BUCKET))
    return sorted({b for b in (1, 2, 4) if b < top} | set(range(8, top, 8)) | {top})


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, pad_block: int, block_size: int, max_blocks: int,
                 max_num_seqs: int, first: bool, hidden_size: int, dtype: torch.dtype) -> None:
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.buckets = bucket_sizes(max_num_seqs)
        device = kv_cache.device
        top = self.buckets[-1]
        self.first = first
        self.ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.hidden = None if first else torch.zeros((top, hidden_size), dtype=dtype, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slots = torch.full((top,), pad_block * block_size, dtype=torch.int64, device=device)
        self.tables = torch.full((top, max_blocks), pad_block, dtype=torch.int64, device=device)
        self.lens = torch.ones(top, dtype=torch.int64, device=device)
        self.pad_block = pad_block
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.enabled = True

    def bucket(self, n: int) -> int | None:
        if not self.enabled or n > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= n)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], num_decodes=b, decode_block_tables=self.tables[:b],
                                 decode_mask=None, decode_lens=self.lens[:b], prefills=[], decode_kernel="triton")

    def _forward(self, b: int) -> torch.Tensor:
        x = self.ids[:b] if self.first else self.hidden[:b]
        return self.model.forward(x, self.positions[:b], self._meta(b), self.kv_cache)

    def _fill(self, n: int, b: int, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        (self.ids if self.first else self.hidden)[:n].copy_(x)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        width = meta.decode_block_tables.shape[1]
        self.tables[:n, :width].copy_(meta.decode_block_tables)
        self.lens[:n].copy_(meta.decode_lens)
        if b > n:  # padded rows: position 0, one token of context, all in the block kept for them
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.pad_block * self.block_size)
            self.tables[n:b, 0].fill_(self.pad_block)
            self.lens[n:b].fill_(1)

    def run(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's hidden states [n, hidden] through a graph, or None where this step must run eagerly (the
        caller's forward then). meta: the step's own metadata, decodes only."""
        n = meta.num_decodes
        b = self.bucket(n)
        if b is None or n == 0 or meta.decode_block_tables.shape[1] > self.tables.shape[1]:
            return None
        entry = self.graphs.get(b)
        if entry is None:
            return self._capture(b, x, positions, meta)
        self._fill(n, b, x, positions, meta)
        graph, out = entry
        graph.replay()
        return out[:n].clone()  # the static output is overwritten by the next replay, maybe before it is sent

    def _capture(self, b: int, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_decodes
        device = self.kv_cache.device
        current = torch.cuda.current_stream(device)
        try:
            self._fill(n, b, x, positions, meta)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                warm = self._forward(b)  # lazy initialisations happen outside the capture; eager at the same shapes
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the stage's receive thread keeps allocating pinned buffers and copying meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._forward(b)
            self.pool = graph.pool()
            graph.replay()
            tol = 1e-5 if warm.dtype == torch.float32 else 1e-2
            if not torch.allclose(out[:n].float(), warm[:n].float(), rtol=tol, atol=tol):
                raise RuntimeError(f"the graph's output differs from the eager forward's by up to "
                                   f"{(out[:n].float() - warm[:n].float()).abs().max().item():.3g}")
            self.graphs[b] = (graph, out)
        except Exception as e:
            torch.cuda.set_stream(current)  # a capture that failed to end leaves its own stream current
            self.enabled, self.pool = False, None
            self.graphs.clear()
            print(f"decode steps run eagerly: a CUDA graph at batch {b} failed ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
        # Last, so that the cache holds the eager step's keys and values for this step's tokens whatever happened.
        return self.model.forward(x, positions, meta, self.kv_cache)
