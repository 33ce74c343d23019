"""Turns one step's logits into next tokens: penalties, bias, filtering, seeded sampling, logprobs.

Which work a step does is decided from the rows' Python parameters, so nothing waits on
the device before the final host transfer, and what a batch does not ask for is skipped.

Sampling is an exponential race: token = argmax(logits / T - log(-log u)), where u is a
pure function of (seed, tokens sampled so far, vocab index) given by a counter-based hash.
A row therefore draws the same tokens whatever else shares its batch and whichever
position it has, and no generator state has to be carried between steps. Filters only
decide which tokens may enter the race, so they never change the noise a token gets.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
import math
from typing import Any

import torch

from batching.sampling_params import SamplingParams
from engine.kernels import token_mask

_NEG_INF = float("-inf")
# A batch whose sampled rows all have top_k up to this filters and races over topk() candidates.
_TOPK_CANDIDATES_MAX = 1024
# On CPU, where sorting a whole vocab is slow and a host check is free, top_p first looks for
# the nucleus among this many candidates, then among this many times more for the rows where it
# does not fit, and so on; a row whose nucleus holds a large share of the vocab is sorted whole.
# Over 32 rows of 49152 logits on one core: top 256 in 5 ms, top 4096 in 18, a sort in 90.
_CPU_TOP_P_CANDIDATES = 256
_CPU_TOP_P_GROWTH = 16
# Largest sampling scratch (elements per buffer) kept between steps on CPU.
_CPU_SCRATCH_MAX = 8 << 20


def _wrap(x: int, bits: int) -> int:
    """Two's-complement reading of the low `bits` bits, the form torch signed ints hold."""
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >= 1 << (bits - 1) else x


_PHI64 = _wrap(0x9E3779B97F4A7C15, 64)  # splitmix64
_MIX64_M1 = _wrap(0xBF58476D1CE4E5B9, 64)
_MIX64_M2 = _wrap(0x94D049BB133111EB, 64)
_PHI32 = _wrap(0x9E3779B9, 32)  # murmur3 fmix32 and its Weyl step
_MIX32_M1 = _wrap(0x85EBCA6B, 32)
_MIX32_M2 = _wrap(0xC2B2AE35, 32)


def _xorshift_(x: torch.Tensor, shift: int, bits: int, tmp: torch.Tensor) -> None:
    """x ^= x >>> shift (logical), in place."""
    torch.bitwise_right_shift(x, shift, out=tmp)
    tmp.bitwise_and_((1 << (bits - shift)) - 1)  # >> on signed ints is arithmetic: drop the smeared sign
    x.bitwise_xor_(tmp)


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, in place on int64 (multiplies wrap mod 2**64)."""
    tmp = torch.empty_like(x)
    _xorshift_(x, 30, 64, tmp)
    x.mul_(_MIX64_M1)
    _xorshift_(x, 27, 64, tmp)
    x.mul_(_MIX64_M2)
    _xorshift_(x, 31, 64, tmp)
    return x


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[R] int64 noise key per row from its seed and the count of tokens it has sampled."""
    return _mix64_(_mix64_(seeds + _PHI64).add_((steps + 1) * _PHI64))


def vocab_offsets(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int32 Weyl sequence the vocab index enters the hash through."""
    v = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device)
    off = (v * (_PHI32 & 0xFFFFFFFF)) & 0xFFFFFFFF
    return torch.where(off >= 1 << 31, off - (1 << 32), off).to(torch.int32)


def log_exponential_noise(
    keys: torch.Tensor, offsets: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """[R, C] float32 log(E), E ~ Exp(1) i.i.d.; keys: [R] int64, offsets: [C] or [R, C] int32.

    argmax(log p - log E) samples p. The vocab axis is hashed in int32, half the memory
    traffic of int64; the 64-bit row key enters as two 32-bit words. With `scratch`, two
    [R, C] int32 buffers, the result is a view of the second one.
    """
    lo = keys & 0xFFFFFFFF
    lo = torch.where(lo >= 1 << 31, lo - (1 << 32), lo).to(torch.int32)[:, None]  # [R, 1]
    hi = (keys >> 32).to(torch.int32)[:, None]  # arithmetic shift: already in int32 range
    if scratch is None:
        x = offsets + lo  # [R, C] int32, wrapping
        tmp = torch.empty_like(x)
    else:
        x, tmp = scratch
        torch.add(offsets, lo, out=x)
    x.bitwise_xor_(hi)
    _xorshift_(x, 16, 32, tmp)
    x.mul_(_MIX32_M1)
    _xorshift_(x, 13, 32, tmp)
    x.mul_(_MIX32_M2)
    # The top bits of the last product depend on every input bit, so fmix32's final
    # xorshift is skipped. Arithmetic shift: a signed 23-bit s in [-2**22, 2**22).
    x.bitwise_right_shift_(9)
    u = tmp.view(torch.float32)  # reuse the scratch buffer
    torch.mul(x, 2.0**-23, out=u)
    # (2s + 2**23 + 1) / 2**24: odd multiples of 2**-24, exact in float32, never 0 or 1.
    u.add_(0.5 + 2.0**-24)
    return u.log_().neg_().log_()


def _to(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host tensor to `dev`. A blocking copy would also wait for the forward pass queued ahead
    of it; from pageable memory the non-blocking one is staged before it returns, so it is safe."""
    return x.to(dev, non_blocking=True)


def _flat(token_lists: Iterable[list[int]]) -> torch.Tensor:
    """[N] int64 on CPU; array('q') fills about twice as fast as torch.tensor(list)."""
    buf = array("q", chain.from_iterable(token_lists))
    return torch.frombuffer(buf, dtype=torch.int64) if buf else torch.empty(0, dtype=torch.int64)


@dataclass(slots=True)
class SamplingRow:
    """The last pipeline stage's view of one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled so far (the caller appends after each step)
    seed: int  # resolved 64-bit seed: the request's seed, or a random one drawn once per sequence
    matcher: Any = None  # where params.grammar is set: its state (engine.model.grammar.GrammarMasks)


@dataclass(slots=True)
class HostSamples:
    """One step's results on the host. A row that asked for fewer alternatives than the
    batch's K uses a prefix of its `top` list."""

    token_ids: list[int]
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32 under the raw distribution; None if no row asked
    top_ids: torch.Tensor | None  # [B, K] int64, K = most alternatives asked in the batch
    top_logprobs: torch.Tensor | None  # [B, K] float32

    def to_host(self) -> HostSamples:
        if self.logprobs is None:
            return HostSamples(self.token_ids.tolist(), None, None)
        assert self.top_ids is not None and self.top_logprobs is not None
        k = self.top_ids.shape[1]
        # float64 holds int ids (< 2**53) and float32 logprobs exactly: one transfer for all.
        packed = torch.cat(
            (
                self.token_ids[:, None].double(),
                self.logprobs[:, None].double(),
                self.top_ids.double(),
                self.top_logprobs.double(),
            ),
            dim=1,
        ).tolist()  # [B, 2 + 2K]
        return HostSamples(
            token_ids=[int(r[0]) for r in packed],
            logprobs=[r[1] for r in packed],
            top=[[(int(t), lp) for t, lp in zip(r[2 : 2 + k], r[2 + k :])] for r in packed],
        )


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size  # width of the logits rows
        self.eos_token_ids = eos_token_ids
        self._offsets: dict[torch.device, torch.Tensor] = {}
        self._scratch = torch.empty(3, 0, dtype=torch.int32)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 masks: tuple[list[int], torch.Tensor] | None = None) -> SamplerOutput:
        """logits: [B, V] on any device, one row per SamplingRow; left unmodified but for the rows `masks` names: the
        rows that follow a grammar and their allowed tokens ([G, ceil(V / 32)] int32 bitmask on the CPU), whose
        forbidden logits are set to -inf in place (sparing a copy of every row) after every other adjustment: what
        a grammar forbids is never sampled, whatever the penalties and biases. Logprobs are the model's, unmasked."""
        if logits.dim() != 2 or logits.shape[0] != len(rows) or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows x {self.vocab_size}")
        logits = logits.float()
        dev = logits.device

        asked = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if asked else None  # [B, V]

        work = self.adjust_logits(logits, rows)  # [B, V]
        if masks is not None and masks[0]:
            token_mask.apply(work, _to(torch.tensor(masks[0], dtype=torch.int64), dev), masks[1])
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled) == len(rows):
            tokens = self._sample(work, rows)  # [B]
        else:
            tokens = work.argmax(dim=-1)  # [B]; ties go to the lowest id, as in HF generate
            if sampled:
                idx = _to(torch.tensor(sampled, dtype=torch.int64), dev)
                picks = self._sample(work.index_select(0, idx), [rows[i] for i in sampled])
                tokens.index_copy_(0, idx, picks)

        if raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
        top_lp, top_ids = raw_logprobs.topk(max(asked), dim=-1)  # [B, K] each
        return SamplerOutput(tokens, chosen, top_ids, top_lp)

    # -- logit processing -----------------------------------------------------------------

    def adjust_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[B, V] logits after penalties, logit_bias and min_tokens, in that order: what greedy
        rows take the argmax of. Returns `logits` itself when nothing applies, else a copy."""
        V = self.vocab_size
        dev = logits.device
        work = logits
        pen = [i for i, r in enumerate(rows) if r.params.needs_penalties]
        if pen:
            work = logits.clone(memory_format=torch.contiguous_format)
            self._apply_penalties(work.view(-1), rows, pen)

        bias_pos: list[int] = []
        bias_val: list[float] = []
        ban_pos: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                for tok, b in p.logit_bias.items():
                    if 0 <= tok < V:
                        bias_pos.append(i * V + tok)
                        bias_val.append(b)
            if len(r.output_token_ids) < p.min_tokens:
                ban_pos.extend(i * V + t for t in self.eos_token_ids.union(p.stop_token_ids) if 0 <= t < V)
        if bias_pos or ban_pos:
            if work is logits:
                work = logits.clone(memory_format=torch.contiguous_format)
            flat = work.view(-1)  # [B * V]
            if bias_pos:
                pos = _to(torch.tensor(bias_pos, dtype=torch.int64), dev)
                flat.index_put_((pos,), _to(torch.tensor(bias_val, dtype=torch.float32), dev), accumulate=True)
            if ban_pos:
                flat[_to(torch.tensor(ban_pos, dtype=torch.int64), dev)] = _NEG_INF
        return work

    def _apply_penalties(self, flat: torch.Tensor, rows: list[SamplingRow], pen: list[int]) -> None:
        """flat: [B * V] logits, in place. Penalties only touch tokens a row has seen, so they
        are applied at those positions rather than through dense [B, V] count tables."""
        V = self.vocab_size
        dev = flat.device

        def positions(idx: list[int], lists: list[list[list[int]]], per_row: list[tuple[float, ...]]):
            """Flat positions [N] of the rows' tokens and [N, k] of their rows' values; ids
            outside the vocab are dropped here on the host, where that costs no device sync."""
            lengths = torch.tensor([sum(map(len, parts)) for parts in lists], dtype=torch.int64)
            toks = _flat(chain.from_iterable(lists))  # [N]
            base = torch.repeat_interleave(torch.tensor(idx, dtype=torch.int64) * V, lengths)  # [N]
            vals = torch.repeat_interleave(torch.tensor(per_row, dtype=torch.float32), lengths, dim=0)  # [N, k]
            ok = (toks >= 0) & (toks < V)
            return _to((base + toks)[ok], dev), _to(vals[ok], dev)

        rep_rows = [i for i in pen if rows[i].params.repetition_penalty != 1.0]
        if rep_rows:
            pos, rep = positions(
                rep_rows,
                [[rows[i].prompt_token_ids, rows[i].output_token_ids] for i in rep_rows],
                [(rows[i].params.repetition_penalty,) for i in rep_rows],
            )
            x = flat[pos]  # [N]; every copy of a repeated token writes the same value back
            # HF / vLLM: a positive logit is divided, a negative one multiplied; both lower its odds.
            flat[pos] = torch.where(x > 0, x / rep[:, 0], x * rep[:, 0])
        out_rows = [i for i in pen if rows[i].params.presence_penalty or rows[i].params.frequency_penalty]
        if out_rows:
            pos, pf = positions(
                out_rows,
                [[rows[i].output_token_ids] for i in out_rows],
                [(rows[i].params.presence_penalty, rows[i].params.frequency_penalty) for i in out_rows],
            )
            flat[pos] = flat[pos] - pf[:, 0]  # presence: once per distinct token
            flat.index_put_((pos,), -pf[:, 1], accumulate=True)  # frequency: once per occurrence

    # -- sampling -------------------------------------------------------------------------

    def _vocab_offsets(self, dev: torch.device) -> torch.Tensor:
        off = self._offsets.get(dev)
        if off is None:
            off = self._offsets[dev] = vocab_offsets(self.vocab_size, dev)
        return off

    def _buffers(self, r: int, c: int, dev: torch.device) -> list[torch.Tensor] | None:
        """Three [r, c] int32 scratch buffers kept between steps on CPU, where a fresh
        multi-megabyte tensor is page-faulted in on every step at a cost above the hash's.
        None elsewhere: the CUDA caching allocator already reuses its blocks."""
        n = r * c
        if dev.type != "cpu" or n > _CPU_SCRATCH_MAX:
            return None
        if self._scratch.shape[1] < n:
            self._scratch = torch.empty(3, n, dtype=torch.int32)
        return [b[:n].view(r, c) for b in self._scratch]

    def _sample(self, work: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """work: [R, V] adjusted logits of non-greedy rows; returns [R] int64 sampled ids."""
        dev = work.device
        ps = [r.params for r in rows]
        floats = [
            (
                p.temperature,
                p.top_p if p.top_p < 1.0 else math.inf,  # rounding in the running mass never cuts the tail
                math.log(p.min_p) if p.min_p > 0 else _NEG_INF,
            )
            for p in ps
        ]
        ints = [(_wrap(r.seed, 64), len(r.output_token_ids), p.top_k) for r, p in zip(rows, ps)]
        fparams = _to(torch.tensor(floats, dtype=torch.float32), dev)  # [R, 3]
        iparams = _to(torch.tensor(ints, dtype=torch.int64), dev)  # [R, 3]
        temp, top_p, log_min_p = fparams[:, 0:1], fparams[:, 1:2], fparams[:, 2:3]  # [R, 1] each
        top_k = iparams[:, 2:3]  # [R, 1]
        keys = row_keys(iparams[:, 0], iparams[:, 1])  # [R]
        offsets = self._vocab_offsets(dev)  # [V]

        bufs = self._buffers(*work.shape, dev)
        scaled = work / temp if bufs is None else torch.div(work, temp, out=bufs[2].view(torch.float32))  # [R, V]
        floor: torch.Tensor | None = None  # [R, 1]: tokens below it may not enter the race
        cand: tuple[torch.Tensor, torch.Tensor] | None = None
        if any(p.top_k > 0 or p.top_p < 1.0 for p in ps):
            floor, cand = self._rank_floor(scaled, ps, top_k, top_p)
        if any(p.min_p > 0.0 for p in ps):
            # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p)
            mp = scaled.amax(dim=-1, keepdim=True) + log_min_p
            floor = mp if floor is None else torch.maximum(floor, mp)

        if cand is not None:
            # Every row is top_k-bounded: race over the candidates only (same noise per token).
            vals, ids = cand  # [R, C]
            vals = vals.masked_fill(vals < floor, _NEG_INF)
            bufs = self._buffers(*vals.shape, dev)  # the first two: `scaled` holds the third
            noise = log_exponential_noise(keys, offsets[ids], None if bufs is None else (bufs[0], bufs[1]))
            choice = noise.neg_().add_(vals).argmax(dim=-1, keepdim=True)  # [R, 1]
            return ids.gather(1, choice).squeeze(1)
        if floor is not None:
            scaled.masked_fill_(scaled < floor, _NEG_INF)
        noise = log_exponential_noise(keys, offsets, None if bufs is None else (bufs[0], bufs[1]))  # [R, V]
        return noise.neg_().add_(scaled).argmax(dim=-1)

    def _rank_floor(
        self, scaled: torch.Tensor, ps: list[SamplingParams], top_k: torch.Tensor, top_p: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """[R, 1] lowest logit top_k / top_p keep (-inf for rows without either), and the
        (values, ids) candidates when every row is top_k-bounded and may race over them alone."""
        V = scaled.shape[1]
        dev = scaled.device
        max_k = max(p.top_k for p in ps)
        if all(0 < p.top_k <= _TOPK_CANDIDATES_MAX for p in ps):
            vals, ids = scaled.topk(min(max_k, V), dim=-1)  # [R, C], descending
            floor, _ = _nucleus_floor(scaled, vals, top_k, top_p, need_total=False)
            return floor, (vals, ids)

        need_total = any(p.top_k == 0 and p.top_p < 1.0 for p in ps)
        if dev.type != "cpu":
            # A device sort needs no host check of whether candidates suffice; it sorts only the rows that rank.
            rows = [i for i, p in enumerate(ps) if p.top_k > 0 or p.top_p < 1.0]
            if len(rows) == len(ps):
                vals = scaled.sort(dim=-1, descending=True).values  # [R, V]
                floor, _ = _nucleus_floor(scaled, vals, top_k, top_p, need_total)
                return floor, None
            idx = _to(torch.tensor(rows), dev)
            sub = scaled.index_select(0, idx)
            vals = sub.sort(dim=-1, descending=True).values  # [rows that rank, V]
            sub_floor, _ = _nucleus_floor(sub, vals, top_k[idx], top_p[idx], need_total)
            floor = torch.full((len(ps), 1), _NEG_INF, dtype=scaled.dtype, device=dev)
            return floor.index_copy_(0, idx, sub_floor), None

        ranked = torch.tensor([p.top_k > 0 or p.top_p < 1.0 for p in ps])[:, None]  # [R, 1]
        c = min(V, max(_CPU_TOP_P_CANDIDATES, max_k if max_k <= _TOPK_CANDIDATES_MAX else 0))
        vals = scaled.topk(c, dim=-1).values  # [R, C]
        floor, covered = _nucleus_floor(scaled, vals, top_k, top_p, need_total)
        missing = (ranked & ~covered).squeeze(1).nonzero().squeeze(1)  # host check: free on CPU
        while missing.numel():
            c = c * _CPU_TOP_P_GROWTH
            sub = scaled.index_select(0, missing)
            if 2 * c >= V:
                vals, c = sub.sort(dim=-1, descending=True).values, V  # [M, V]
            else:
                vals = sub.topk(c, dim=-1).values  # [M, C]
            sub_floor, sub_covered = _nucleus_floor(sub, vals, top_k[missing], top_p[missing], need_total)
            floor.index_copy_(0, missing, sub_floor)
            missing = missing[~sub_covered.squeeze(1)]  # none once sorted whole
        return torch.where(ranked, floor, _NEG_INF), None


def _nucleus_floor(
    scaled: torch.Tensor, vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, need_total: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor from the top C sorted logits `vals` [R, C] of `scaled` [R, V]; returns
    ([R, 1] floor, [R, 1] bool: the candidates held what the row keeps).

    top_p keeps the smallest prefix whose mass reaches top_p, measured after top_k. Mass is
    a running sum in rank order, so C candidates give what a full sort would, up to rounding
    in the whole-row total.
    """
    C = vals.shape[1]
    V = scaled.shape[1]
    rank = torch.arange(C, device=vals.device)  # [C]
    k = torch.where(top_k > 0, top_k.clamp(max=C), C)  # [R, 1]
    mass = (vals - vals[:, :1]).exp_()  # [R, C], unnormalised
    mass.masked_fill_(rank >= k, 0.0)
    cum = mass.cumsum(dim=-1)  # [R, C]
    total = cum.gather(1, k - 1)  # [R, 1]: mass of the top_k set
    if need_total:
        # Without top_k the reference is the whole row, which the candidates may not hold.
        row = (scaled - vals[:, :1]).exp_().sum(dim=-1, keepdim=True)  # [R, 1]
        total = torch.where(top_k > 0, total, row)
    # Rank r stays while the mass strictly above it is short of top_p; rank 0 always stays.
    n = 1 + (cum[:, :-1] < top_p * total).sum(dim=-1, keepdim=True)  # [R, 1]
    n = torch.minimum(n, k)
    if C == V:
        covered = torch.ones_like(n, dtype=torch.bool)
    else:
        # With top_k the candidates must hold all k; without, the nucleus must end inside them.
        covered = torch.where(top_k > 0, top_k <= C, cum[:, -1:] >= top_p * total)
    return vals.gather(1, n - 1), covered
