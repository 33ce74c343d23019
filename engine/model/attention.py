"""Attention over the paged KV cache, for batches that mix prefill chunks and decodes.

Tokens of a step are laid out flat: the decode tokens (one per sequence) first, then
each prefill chunk. The step's new keys and values are already in their cache slots
(engine.model.layer_ops writes them). Decodes attend over their blocks in one batched call: a kernel reads them
in place (the engine's C kernel on x86-64 CPUs, its Triton kernel on GPUs); elsewhere they are gathered, in groups
of alike length, for SDPA. Each prefill chunk attends over its context (cached prefix plus itself) with a causal
offset.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kernels import paged_attention as paged_kernel
from engine.kernels import triton_paged_attention as triton_kernel
from engine.model.linear import cpu_has_fast_half


def prefill_dtype(q: torch.Tensor, k_cache: torch.Tensor) -> torch.dtype:
    """What prefill attention computes in: the queries' dtype, but the cache's bf16 where fp32 activations run over
    a bf16 cache on a CPU that multiplies bf16 natively. The keys and values are then what every later decode step
    reads from the cache; the queries are rounded as a bf16 model's are, and the output as the next product rounds
    its input anyway. torch's fused CPU attention runs 2.3x faster so (a 128-token prompt of 9 heads of 64: 92 us
    against 210)."""
    if (q.dtype == torch.float32 and k_cache.dtype == torch.bfloat16 and q.device.type == "cpu"
            and cpu_has_fast_half(torch.bfloat16)):
        return torch.bfloat16
    return q.dtype


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk among the step's tokens
    end: int
    context_len: int  # tokens the chunk attends to: cached prefix plus the chunk
    block_table: torch.Tensor  # [blocks covering context_len] int64
    mask: torch.Tensor | None  # [chunk, context_len] bool; None when plain causal from position 0


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows [start, end) whose blocks are gathered together, padded to the group's longest table."""

    start: int
    end: int
    width: int  # blocks per row in the gather


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool: key is in context
    decode_lens: torch.Tensor | None  # [num_decodes] int64: context length of each decode, its new token included
    prefills: list[PrefillChunk]
    # Where decodes gather their blocks (no kernel reads them in place): runs of rows whose padding stays within
    # GATHER_SLACK of their own blocks, so a step gathers about what its sequences hold, not num_decodes x longest.
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    carry: list[torch.Tensor] = field(default_factory=list)  # the caller's step inputs (build_metadata's carry)
    # Reused by every layer of the step: a fresh multi-megabyte tensor per layer costs more in page faults
    # than the gather itself.
    gather_k: torch.Tensor | None = None
    gather_v: torch.Tensor | None = None
    # Where decodes attend: "cpu" (the engine's C kernel), "triton" (a GPU's), "gather" (blocks gathered for SDPA);
    # found at the first layer.
    decode_kernel: str | None = None
    windows: dict = field(default_factory=dict)  # sliding window -> its WindowView, made at the first layer using it


@dataclass(slots=True)
class WindowView:
    """The step's attention seen through a sliding window of W keys (a query at position p attends to positions
    p - W + 1 .. p): the decodes' block tables from the block holding their first key in the window, their lengths
    from there and the keys of that block before the window (for the CPU kernel), their masks (for the gather), and
    each prefill chunk's mask (None: plain causal reaches no further back than the window)."""

    tables: torch.Tensor | None
    lens: torch.Tensor | None
    starts: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefill_masks: list[torch.Tensor | None]


def window_view(meta: AttentionMetadata, window: int, block_size: int) -> WindowView:
    view = meta.windows.get(window)
    if view is not None:
        return view
    tables = lens = starts = mask = None
    if meta.num_decodes:
        full = meta.decode_block_tables
        width = full.shape[1]
        first = (meta.decode_lens - window).clamp(min=0)  # each decode's first key in its window
        skip = first // block_size  # whole blocks before it
        columns = (skip[:, None] + torch.arange(width, device=full.device)).clamp(max=width - 1)
        tables, lens, starts = full.gather(1, columns), meta.decode_lens - skip * block_size, first - skip * block_size
        key_pos = torch.arange(width * block_size, device=full.device)
        mask = meta.decode_mask & (key_pos[None, :] >= first[:, None]).view(meta.num_decodes, 1, 1, -1)
    prefill_masks = []
    for c in meta.prefills:
        n = c.end - c.start
        if c.mask is None and n <= window:
            prefill_masks.append(None)
            continue
        device = c.block_table.device
        q_pos = torch.arange(c.context_len - n, c.context_len, device=device)[:, None]
        k_pos = torch.arange(c.context_len, device=device)[None, :]
        prefill_masks.append((k_pos <= q_pos) & (k_pos > q_pos - window))
    view = meta.windows[window] = WindowView(tables, lens, starts, mask, prefill_masks)
    return view


# A decode group's gather may hold this much more than its rows' own blocks (padding to its longest row).
GATHER_SLACK = 1.25


def decode_groups(blocks: list[int]) -> list[DecodeGroup]:
    """Consecutive runs of decode rows, given each row's block count, each padded to its longest row and within
    GATHER_SLACK of its own blocks (a lone row is always a group). Rows sorted by length give the fewest groups."""
    groups: list[DecodeGroup] = []
    start, own, width = 0, 0, 0
    for i, n in enumerate(blocks):
        wider = max(width, n)
        if i > start and (i + 1 - start) * wider > GATHER_SLACK * (own + n):
            groups.append(DecodeGroup(start, i, width))
            start, own, wider = i, 0, n
        own += n
        width = wider
    if blocks:
        groups.append(DecodeGroup(start, len(blocks), width))
    return groups


def int64_tensors(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Lists of ints as int64 tensors on `device`, from one host buffer: on a GPU, one copy from pinned memory,
    where a torch.tensor(list, device="cuda") per list would be a copy each from pageable memory."""
    buf = array("q")
    bounds = []
    for part in parts:
        start = len(buf)
        buf.extend(part)
        bounds.append((start, len(buf)))
    cuda = device.type == "cuda"
    host = torch.empty(len(buf), dtype=torch.int64, pin_memory=cuda)
    if buf:
        host.copy_(torch.frombuffer(buf, dtype=torch.int64))
    if cuda:
        host = host.to(device, non_blocking=True)
    return [host[a:b] for a, b in bounds]


def build_metadata(
    block_size: int,
    slot_mapping: list[int],
    decode_tables: list[list[int]],
    decode_context_lens: list[int],
    prefills: list[tuple[int, int, int, list[int]]],
    device: torch.device,
    carry: tuple[list[int], ...] = (),
) -> AttentionMetadata:
    """prefills: (start row, end row, start position, block table) per chunk. carry: the caller's own lists of ints
    for the step (positions, token ids), made tensors with the metadata's in the same copy (AttentionMetadata.carry)."""
    n_dec = len(decode_tables)
    width = max((len(t) for t in decode_tables), default=0)
    padded = [b for t in decode_tables for b in (*t, *([0] * (width - len(t))))]
    chunk_tables = [table[: -(-(pos + end - start) // block_size)] for start, end, pos, table in prefills]
    slots_t, tables_t, lens_t, *rest = int64_tensors(
        [slot_mapping, padded, decode_context_lens, *chunk_tables, *carry], device)
    chunk_t, carried = rest[: len(prefills)], rest[len(prefills):]
    tables = mask = lens = None
    if n_dec:
        tables, lens = tables_t.view(n_dec, width), lens_t
        key_pos = torch.arange(width * block_size, device=device)
        mask = (key_pos[None, :] < lens[:, None]).view(n_dec, 1, 1, -1)
    chunks = []
    for (start, end, pos, _), table in zip(prefills, chunk_t):
        ctx = pos + end - start
        chunk_mask = None
        if pos > 0:
            q_pos = torch.arange(pos, ctx, device=device)
            chunk_mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
        chunks.append(PrefillChunk(start, end, ctx, table, chunk_mask))
    return AttentionMetadata(
        slot_mapping=slots_t,
        num_decodes=n_dec,
        decode_block_tables=tables,
        decode_mask=mask,
        decode_lens=lens,
        prefills=chunks,
        decode_groups=decode_groups([len(t) for t in decode_tables]),
        carry=carried,
    )


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         softcap: float | None, causal: bool = False) -> torch.Tensor:
    """Attention of q [..., heads, L, d] over k, v [..., kv_heads, S, d] (fewer heads: each shared by a group of
    query heads), mask [..., L, S] true where a key counts; torch's fused kernels, or where scores are capped softly
    (Gemma 2), the same steps written out: scale, cap, mask, softmax in fp32."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[-3] != q.shape[-3])
    if k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def paged_attention(
    q: torch.Tensor,  # [T, heads, d]
    k: torch.Tensor,  # [T, kv_heads, d], already written to the cache
    v: torch.Tensor,  # [T, kv_heads, d], already written to the cache
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,  # a sliding window: each query attends to its last `window` positions
    softcap: float | None = None,  # scores capped to softcap * tanh(score / softcap) before the softmax (Gemma 2)
) -> torch.Tensor:  # [T, heads * d]
    num_blocks, block_size, kv_heads, d = k_cache.shape
    T, heads, _ = q.shape
    nd = meta.num_decodes
    if meta.decode_kernel is None:  # every layer's cache is alike: decide once per step
        if paged_kernel.available(k_cache) and q.dtype == torch.float32:
            meta.decode_kernel = "cpu"
        else:
            meta.decode_kernel = "triton" if triton_kernel.available(q, k_cache) else "gather"
    view = window_view(meta, window, block_size) if window is not None else None
    # The GPU's kernel takes no window or cap: such a layer's decodes are gathered there.
    gathered = meta.decode_kernel == "gather" or (meta.decode_kernel == "triton"
                                                  and (view is not None or softcap is not None))
    if nd and not gathered:
        if meta.decode_kernel == "cpu":
            tables, lens, starts = ((view.tables, view.lens, view.starts) if view is not None
                                    else (meta.decode_block_tables, meta.decode_lens, None))
            decoded = paged_kernel.paged_decode_attention(q[:nd], k_cache, v_cache, tables, lens, scale, starts, softcap)
        else:
            decoded = triton_kernel.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_lens, scale)
        if nd == T:
            return decoded.view(T, heads * d)
        out = torch.empty_like(q)
        out[:nd] = decoded
    else:
        out = torch.empty_like(q)
    if nd and gathered:
        if meta.gather_k is None:
            most = max((g.end - g.start) * g.width for g in meta.decode_groups)
            meta.gather_k = k_cache.new_empty((most, block_size * kv_heads * d))
            meta.gather_v = torch.empty_like(meta.gather_k)
        for g in meta.decode_groups:
            rows = g.end - g.start
            # index_select over whole blocks copies rows at memcpy speed; advanced indexing is several times slower.
            flat = meta.decode_block_tables[g.start : g.end, : g.width].reshape(-1)
            keys = torch.index_select(k_cache.view(num_blocks, -1), 0, flat, out=meta.gather_k[: flat.numel()])
            values = torch.index_select(v_cache.view(num_blocks, -1), 0, flat, out=meta.gather_v[: flat.numel()])
            # A cache held at lower precision than the queries (bf16 under fp32 activations) is widened here.
            keys = keys.view(rows, -1, kv_heads, d).transpose(1, 2).to(q.dtype)  # [rows, kvh, L, d]
            values = values.view(rows, -1, kv_heads, d).transpose(1, 2).to(q.dtype)
            masks = view.decode_mask if view is not None else meta.decode_mask
            mask = masks[g.start : g.end, ..., : g.width * block_size]  # [rows, 1, 1, L]
            # The query heads of each KV head as its queries, [rows, kvh, heads / kvh, d]: GQA without repeating
            # the keys, in a form the fused kernels take with a mask (enable_gqa with a mask is the math path's).
            o = sdpa(q[g.start : g.end].view(rows, kv_heads, heads // kv_heads, d), keys, values, mask, scale, softcap)
            out[g.start : g.end] = o.reshape(rows, heads, d)
    if meta.prefills:
        dtype = prefill_dtype(q, k_cache)
        # The prefill rows at that dtype, converted once for every chunk of the step (the decode rows, first, are
        # left out: they are not read again).
        qp, kp, vp = (t[nd:].to(dtype) for t in (q, k, v))
    for i, c in enumerate(meta.prefills):
        # 4-D, [1, heads, n, d]: the layout PyTorch's fused attention kernels take (3-D falls back to the math path,
        # which materialises [heads, n, context] scores).
        n = c.end - c.start
        rows = slice(c.start - nd, c.end - nd)
        chunk_mask = view.prefill_masks[i] if view is not None else c.mask
        if chunk_mask is None:
            o = sdpa(qp[rows].transpose(0, 1).unsqueeze(0), kp[rows].transpose(0, 1).unsqueeze(0),
                     vp[rows].transpose(0, 1).unsqueeze(0), None, scale, softcap, causal=True)[0]  # [heads, n, d]
        else:
            kc = k_cache.view(num_blocks, -1).index_select(0, c.block_table).view(-1, kv_heads, d)[: c.context_len]
            vc = v_cache.view(num_blocks, -1).index_select(0, c.block_table).view(-1, kv_heads, d)[: c.context_len]
            kc, vc = kc.to(dtype).transpose(0, 1), vc.to(dtype).transpose(0, 1)  # [kvh, ctx, d]
            # As for decodes: each KV head's query heads and positions as its queries, the mask repeated for each.
            group = heads // kv_heads
            qc = qp[rows].view(n, kv_heads, group, d).permute(1, 2, 0, 3).reshape(kv_heads, group * n, d)
            mask = chunk_mask.repeat(group, 1) if group > 1 else chunk_mask  # [group * n, ctx]
            o = sdpa(qc.unsqueeze(0), kc.unsqueeze(0), vc.unsqueeze(0), mask, scale, softcap)[0]  # [kvh, group * n, d]
            o = o.view(kv_heads, group, n, d).reshape(heads, n, d)
        out[c.start : c.end] = o.transpose(0, 1)
    return out.view(T, heads * d)
