"""The engine's CPU kernels (engine.kernels) against torch."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from engine.kernels import amx_gemm, build, half_gemm, paged_attention
from engine.model import attention, linear
from engine.model.attention import build_metadata
from engine.model.linear import AmxLinear, NativeHalfLinear, PackedHalfLinear, UpcastLinear, make_linear

CPU = torch.device("cpu")
HAS_ISA = set(half_gemm.CPU_FEATURES) <= build.cpu_flags()

pytestmark = pytest.mark.skipif(not HAS_ISA, reason="needs an x86-64 CPU with AVX2, FMA and F16C")


def test_builds_where_a_compiler_is():
    if shutil.which("cc") or shutil.which("gcc"):
        assert platform.machine() in ("x86_64", "AMD64")
        assert half_gemm.available(CPU, torch.bfloat16, torch.float32)
    assert not half_gemm.available(CPU, torch.float32, torch.float32)  # fp32 weights stay on torch's BLAS
    assert not half_gemm.available(CPU, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 32, 64, 100])
# [out, in]; 37 and 3: a partial block; 20 x 0: no inputs, so the product is the bias
@pytest.mark.parametrize("shape", [(48, 32), (37, 19), (3, 200), (130, 64), (20, 1), (20, 0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_torch_in_fp32(dtype, rows, shape, threads):
    if not half_gemm.available(CPU, dtype, torch.float32):
        pytest.skip("kernel not built here")
    g = torch.Generator().manual_seed(rows * 1000 + shape[0])
    weight = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    x = torch.randn(rows, shape[1], generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (None, bias):
            product = PackedHalfLinear(weight, b)
            want = F.linear(x, weight.float(), b.float() if b is not None else None)
            got = product(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # A non-contiguous input is taken as its values.
            wide = torch.randn(rows, 2 * shape[1], generator=g)
            want = F.linear(wide[:, ::2], weight.float(), b.float() if b is not None else None)
            torch.testing.assert_close(product(wide[:, ::2]), want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


def _native_bf16_product(weight, bias):
    if not linear._native_bf16_products():
        pytest.skip("this CPU has no native bf16 products")
    return NativeHalfLinear(weight, bias) if weight.shape[1] else make_linear(weight, bias, torch.float32, {})


def _amx_product(weight, bias):
    if not amx_gemm.available(CPU, torch.bfloat16, torch.float32):
        pytest.skip("this CPU has no AMX-BF16 tiles, or the kernel did not build")
    return AmxLinear(weight, bias)


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 100, 300])
@pytest.mark.parametrize("shape", [(48, 32), (37, 19), (3, 200), (64, 96)])
@pytest.mark.parametrize("kind", ["amx", "onednn"])
def test_products_on_a_cpu_with_native_bf16(kind, rows, shape):
    """Where the CPU multiplies bf16 natively (the engine's AMX tile kernel, or oneDNN's prepacked products), each
    product is that of the bf16-rounded input, accumulated in fp32."""
    g = torch.Generator().manual_seed(rows + shape[0])
    weight = (torch.randn(shape, generator=g) * 0.1).bfloat16()
    bias = torch.randn(shape[0], generator=g).bfloat16()
    for b in (None, bias):
        product = (_amx_product if kind == "amx" else _native_bf16_product)(weight, b)
        wide = torch.randn(rows, 2 * shape[1], generator=g)
        for x in (wide[:, : shape[1]].contiguous(), wide[:, ::2]):  # a non-contiguous input is taken as its values
            want = F.linear(x.bfloat16().float(), weight.float(), b.float() if b is not None else None)
            got = product(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            # oneDNN rounds its output to bf16; the tile kernel returns its fp32 sums.
            tol = 1e-2 if kind == "onednn" else 1e-5
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_amx_products_share_their_blocks_among_threads_and_refuse_bad_inputs():
    weight = torch.randn(200, 96).bfloat16()
    product = _amx_product(weight, None)
    x = torch.randn(40, 96)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = product(x)
        torch.set_num_threads(3)
        assert torch.equal(product(x), alone)
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError):
        product(torch.randn(4, 95))
    with pytest.raises(ValueError):
        product(x.double())


@pytest.mark.parametrize("kind", ["half-kernel bf16", "half-kernel fp16", "amx"])
def test_rows_of_a_packed_weight_are_its_embeddings(kind):
    dtype = torch.float16 if kind.endswith("fp16") else torch.bfloat16
    weight = torch.randn(70, 45).to(dtype)
    if kind == "amx":
        product = _amx_product(weight, None)
    else:
        if not half_gemm.available(CPU, dtype, torch.float32):
            pytest.skip("kernel not built here")
        product = PackedHalfLinear(weight, None)
    ids = torch.tensor([0, 15, 16, 31, 32, 69, 5, 5, 8, 7, 24])
    assert torch.equal(product.rows(ids), weight[ids])
    with pytest.raises(IndexError):
        product.rows(torch.tensor([70]))


def test_disabled_by_environment(monkeypatch):
    half_gemm._library.cache_clear()
    monkeypatch.setenv("STRATA_CPU_KERNELS", "0")
    try:
        assert isinstance(make_linear(torch.randn(16, 8).half(), None, torch.float32, {}), UpcastLinear)
    finally:
        half_gemm._library.cache_clear()


def test_without_a_compiler_torch_does_the_work(monkeypatch, tmp_path, caplog):
    half_gemm._library.cache_clear()
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    try:
        with caplog.at_level("WARNING", logger="strata.kernels"):
            assert isinstance(make_linear(torch.randn(16, 8).half(), None, torch.float32, {}), UpcastLinear)
        assert "falling back to torch's kernels" in caplog.text
    finally:
        half_gemm._library.cache_clear()


# Heads of 64 and 128 over a bf16 cache take the AVX-512 path where the CPU has it: groups of query heads that
# fill its registers (4 of 64, 2 of 128) and ones that leave a remainder, blocks of fewer and more than 16 rows.
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 16), (9, 3, 64), (10, 2, 64), (8, 8, 128), (14, 2, 128),
                                              (6, 2, 20), (2, 1, 256)])
@pytest.mark.parametrize("block_size", [4, 16, 32])
@pytest.mark.parametrize("kv_dtype, wide", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_paged_decode_attention_matches_the_gathered_path(monkeypatch, heads, kv_heads, d, block_size, kv_dtype,
                                                          wide):
    """Contexts of 1 to 70 tokens over shuffled blocks of an fp32 or bf16 cache, the bf16 one on the AVX2 path and
    on the AVX-512 one where the CPU has it, over the whole context, through sliding windows and with capped scores: the
    kernel equals the gathered path (SDPA, or its steps written out where scores are capped)."""
    if not paged_attention.available(torch.zeros(1)):
        pytest.skip("kernel not built here")
    monkeypatch.setattr(paged_attention, "WIDE", wide)
    g = torch.Generator().manual_seed(heads * d + block_size)
    lens = [1, 7, 8, 9, 16, 33, 70]
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(kv_dtype)
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = []
    for n in per_seq:
        tables.append(order[:n])
        order = order[n:]
    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)]
    q = torch.randn(len(lens), heads, d, generator=g)
    k = torch.randn(len(lens), kv_heads, d, generator=g)
    v = torch.randn(len(lens), kv_heads, d, generator=g)

    def attend(window, softcap) -> torch.Tensor:
        meta = build_metadata(block_size, slots, tables, lens, [], CPU)
        return attention.paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, d**-0.5, window, softcap)

    # Sliding windows (the first key inside a block, the first block skipped), and scores capped softly.
    cases = [(None, None), (6, None), (17, None), (None, 1.5), (6, 1.5)]
    got = [attend(*c) for c in cases]
    monkeypatch.setattr(paged_attention, "available", lambda cache: False)
    for c, out in zip(cases, got):
        torch.testing.assert_close(out, attend(*c), rtol=1e-5, atol=1e-5)


def _decode_case(n: int, length: int, heads: int = 4, kv_heads: int = 2, d: int = 16, block_size: int = 4):
    blocks = -(-length // block_size)
    k_cache = torch.randn(n * blocks + 1, block_size, kv_heads, d)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(1, n * blocks + 1).view(n, blocks)
    lens = torch.full((n,), length, dtype=torch.int64)
    return torch.randn(n, heads, d), k_cache, v_cache, tables, lens


@pytest.mark.parametrize("length", [5, 8, 21])
@pytest.mark.parametrize("d,kv_dtype", [(16, torch.float32), (64, torch.bfloat16)])
def test_paged_decode_attention_propagates_nan_as_sdpa_does(length, d, kv_dtype):
    if not paged_attention.available(torch.zeros(1)):
        pytest.skip("kernel not built here")
    q, k_cache, v_cache, tables, lens = _decode_case(2, length, d=d)
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    q[0, 1, 3] = float("nan")
    out = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    assert out[0, 1].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("n", [1, 2, 5])
def test_paged_decode_attention_splits_heads_among_spare_threads(monkeypatch, n):
    """With fewer sequences than threads, a sequence's KV heads are shared among threads: the same answer."""
    if not paged_attention.available(torch.zeros(1)):
        pytest.skip("kernel not built here")
    torch.manual_seed(n)
    q, k_cache, v_cache, tables, lens = _decode_case(n, 37, heads=9, kv_heads=3, d=64, block_size=16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    alone = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    shared = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert torch.equal(alone, shared)


def test_paged_decode_attention_takes_strided_queries_and_refuses_bad_tables():
    if not paged_attention.available(torch.zeros(1)):
        pytest.skip("kernel not built here")
    q, k_cache, v_cache, tables, lens = _decode_case(3, 9)
    wide = torch.randn(3, 8, 16)
    wide[:, :4] = q
    strided = paged_attention.paged_decode_attention(wide[:, :4], k_cache, v_cache, tables.int(), lens, 0.25)
    torch.testing.assert_close(strided, paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25))
    with pytest.raises(IndexError):
        paged_attention.paged_decode_attention(q, k_cache, v_cache, tables + k_cache.shape[0], lens, 0.25)
    with pytest.raises(IndexError):
        paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens + 100, 0.25)
    with pytest.raises(ValueError):
        paged_attention.paged_decode_attention(q.double(), k_cache, v_cache, tables, lens, 0.25)
    with pytest.raises(ValueError):  # keys and values held alike
        paged_attention.paged_decode_attention(q, k_cache.bfloat16(), v_cache, tables, lens, 0.25)


def test_packed_weights_refuse_what_torch_would():
    if not half_gemm.available(CPU, torch.bfloat16, torch.float32):
        pytest.skip("kernel not built here")
    product = PackedHalfLinear(torch.randn(37, 24).bfloat16(), None)
    with pytest.raises(IndexError):
        product.rows(torch.tensor([3, 37]))
    with pytest.raises(IndexError):
        product.rows(torch.tensor([-1]))
    with pytest.raises(ValueError):
        product(torch.randn(2, 23))
    with pytest.raises(ValueError):
        product(torch.randn(2, 24).double())


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_decode_groups_cover_every_row_once_and_pad_within_their_slack(blocks):
    groups = attention.decode_groups(sorted(blocks))
    assert [g.start for g in groups] == [0, *(g.end for g in groups[:-1])] and groups[-1].end == len(blocks)
    rows = sorted(blocks)
    for g in groups:
        own = rows[g.start : g.end]
        assert g.width == max(own)
        assert g.end - g.start == 1 or (g.end - g.start) * g.width <= attention.GATHER_SLACK * sum(own)
    # The whole step gathers within the slack of the blocks its sequences hold.
    assert sum((g.end - g.start) * g.width for g in groups) <= attention.GATHER_SLACK * sum(blocks) + max(blocks)


def test_grouped_decode_gather_equals_attention_one_sequence_at_a_time(monkeypatch):
    """Decodes of very different lengths (so several gather groups) over a bf16 cache, as a GPU or a CPU without
    the kernel runs them: each row equals SDPA over that sequence's own keys alone."""
    monkeypatch.setattr(paged_attention, "available", lambda cache: False)
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, d, bs = 4, 2, 16, 4
    lens = [1, 2, 3, 9, 10, 40, 41, 150]
    per_seq = [-(-n // bs) for n in lens]
    k_cache = torch.randn(sum(per_seq) + 1, bs, kv_heads, d, generator=g).bfloat16()
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).bfloat16()
    tables, next_block = [], 1
    for n in per_seq:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
    q = torch.randn(len(lens), heads, d, generator=g)
    k = torch.randn(len(lens), kv_heads, d, generator=g)
    meta = build_metadata(bs, slots, tables, lens, [], CPU)
    assert len(meta.decode_groups) > 1
    got = attention.paged_attention(q, k, k, k_cache, v_cache, meta, d**-0.5).view(len(lens), heads, d)
    for i, (t, n) in enumerate(zip(tables, lens)):
        keys = k_cache[t].reshape(-1, kv_heads, d)[:n].float().transpose(0, 1)  # [kvh, n, d]
        values = v_cache[t].reshape(-1, kv_heads, d)[:n].float().transpose(0, 1)
        want = F.scaled_dot_product_attention(q[i][:, None], keys, values, scale=d**-0.5, enable_gqa=True)
        torch.testing.assert_close(got[i], want[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_attend_at_the_caches_precision(kv_dtype):
    """A step of a decode and two prefill chunks, one from position 0 and one after a cached prefix: each chunk's
    rows equal causal attention over its own keys and values, computed in fp32 from the queries, keys and values
    rounded as the cache holds them (bf16 where the cache is bf16 and the CPU multiplies bf16 natively)."""
    g = torch.Generator().manual_seed(11)
    heads, kv_heads, d, bs = 6, 2, 32, 4
    prefix, fresh, later = 6, 9, 5  # cached tokens of the second sequence, then each chunk's tokens
    k_cache = torch.zeros(16, bs, kv_heads, d, dtype=kv_dtype)
    v_cache = torch.zeros_like(k_cache)
    fresh_table, later_table, decode_table = [1, 2, 3], [4, 5, 6], [7]
    T = 1 + fresh + later
    q = torch.randn(T, heads, d, generator=g)
    k, v = torch.randn(T, kv_heads, d, generator=g), torch.randn(T, kv_heads, d, generator=g)
    past_k = torch.randn(prefix, kv_heads, d, generator=g)
    past_v = torch.randn(prefix, kv_heads, d, generator=g)
    for i in range(prefix):  # the second sequence's cached prefix
        k_cache[later_table[i // bs], i % bs], v_cache[later_table[i // bs], i % bs] = past_k[i], past_v[i]
    slots = [7 * bs] + [fresh_table[i // bs] * bs + i % bs for i in range(fresh)] + [
        later_table[(prefix + i) // bs] * bs + (prefix + i) % bs for i in range(later)]
    for row, slot in enumerate(slots):  # the step's keys and values, written as the layer writes them
        k_cache.view(-1, kv_heads, d)[slot], v_cache.view(-1, kv_heads, d)[slot] = k[row], v[row]
    prefills = [(1, 1 + fresh, 0, fresh_table), (1 + fresh, T, prefix, later_table)]
    meta = build_metadata(bs, slots, [decode_table], [1], prefills, CPU)
    got = attention.paged_attention(q, k, v, k_cache, v_cache, meta, d**-0.5).view(T, heads, d)
    at = attention.prefill_dtype(q, k_cache)
    assert at == (torch.bfloat16 if kv_dtype == torch.bfloat16 and linear.cpu_has_fast_half(torch.bfloat16)
                  else torch.float32)

    def causal(qs, ks, vs, start):  # [n, heads, d] over [ctx, kv_heads, d], query i at position start + i
        qs, ks, vs = (t.to(at).float().transpose(0, 1) for t in (qs, ks, vs))
        mask = torch.arange(ks.shape[1])[None, :] <= torch.arange(start, start + qs.shape[1])[:, None]
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=d**-0.5, enable_gqa=True).transpose(0, 1)

    tolerance = dict(rtol=2e-2, atol=2e-2) if at == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1 : 1 + fresh], causal(q[1 : 1 + fresh], k[1 : 1 + fresh], v[1 : 1 + fresh], 0),
                               **tolerance)
    keys, values = torch.cat([past_k, k[1 + fresh :]]), torch.cat([past_v, v[1 + fresh :]])
    torch.testing.assert_close(got[1 + fresh :], causal(q[1 + fresh :], keys, values, prefix), **tolerance)


TRITON_CHECK = """
import sys
import torch
import torch.nn.functional as F
from engine.kernels import triton_paged_attention as kernel
from engine.model import attention
from engine.model.attention import build_metadata

attention.paged_kernel.available = lambda cache: False  # the CPU's own kernel would take fp32 decodes
g = torch.Generator().manual_seed(3)
heads, kv_heads, d, bs = int(sys.argv[1]), int(sys.argv[2]), 16, 16
lens = [1, 5, 16, 17, 40, 100]
per_seq = [-(-n // bs) for n in lens]
for dtype in (torch.float32, torch.bfloat16):
    k_cache = torch.randn(sum(per_seq) + 1, bs, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(sum(per_seq) + 1, bs, kv_heads, d, generator=g).to(dtype)
    order = (torch.randperm(sum(per_seq), generator=g) + 1).tolist()  # each sequence's blocks scattered
    tables = []
    for n in per_seq:
        tables.append(order[:n])
        order = order[n:]
    slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
    for t, n in zip(tables, lens):  # what a freed sequence left past each context is never read
        k_cache[t[-1], (n - 1) % bs + 1 :] = float("nan")
        v_cache[t[-1], (n - 1) % bs + 1 :] = float("inf")
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    meta = build_metadata(bs, slots, tables, lens, [], torch.device("cpu"))
    assert kernel.available(q, k_cache)
    got = attention.paged_attention(q, q[:, :kv_heads], q[:, :kv_heads], k_cache, v_cache, meta, d**-0.5)
    assert meta.decode_kernel == "triton"
    got = got.view(len(lens), heads, d).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 outputs are rounded to bf16
    for i, (t, n) in enumerate(zip(tables, lens)):
        keys = k_cache[t].reshape(-1, kv_heads, d)[:n].float().transpose(0, 1)
        values = v_cache[t].reshape(-1, kv_heads, d)[:n].float().transpose(0, 1)
        want = F.scaled_dot_product_attention(q[i].float()[:, None], keys, values, scale=d**-0.5,
                                              enable_gqa=True)[:, 0]
        torch.testing.assert_close(got[i], want, rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 2)])
def test_the_gpu_decode_kernel_equals_attention_over_each_sequence(heads, kv_heads):
    """The Triton kernel GPUs decode with, run under Triton's interpreter: each sequence's context read in place
    from scattered blocks, query heads grouped per KV head (padded to the tile where the group is smaller)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", TRITON_CHECK, str(heads), str(kv_heads)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
