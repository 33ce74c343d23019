"""A decoder layer's elementwise steps: the C kernel (engine.kernels.layer_ops) against torch's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import layer_ops as kernel
from engine.model.layer_ops import LayerOps

pytestmark = pytest.mark.skipif(not kernel.available(torch.zeros(1)), reason="needs the kernel (x86-64 with AVX2)")

HEADS, KV_HEADS, D = 6, 2, 64
BLOCKS, BLOCK_SIZE = 256, 4
ROPE = torch.randn(64, 2, D, generator=torch.Generator().manual_seed(0))  # [positions, cos | sin, d]


def _ops(monkeypatch, fused: bool, x, positions, slots, kv_cache) -> LayerOps:
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(kernel, "available", lambda x: False)
        ops = LayerOps(x, positions, slots, ROPE, kv_cache, HEADS, KV_HEADS, 1e-5)
    assert ops.fused == fused
    return ops


@pytest.mark.parametrize("tokens", [1, 5, 1000])  # 1000 rows: shared among threads
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_equal_torch_steps(monkeypatch, tokens, threads, kv_dtype):
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 72, 100  # not multiples of 8: the scalar tails run too
    x = torch.randn(tokens, hidden, generator=g) * 3
    delta = torch.randn(tokens, hidden, generator=g)
    weight = torch.randn(hidden, generator=g)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=g)[:tokens]
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * D, generator=g)
    gate_up = torch.randn(tokens, 2 * inter, generator=g) * 4
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    head_weights = torch.randn(2, D, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for fused in (True, False):
            cache = torch.zeros(1, 2, BLOCKS, BLOCK_SIZE, KV_HEADS, D, dtype=kv_dtype)
            xs = x.clone()
            ops = _ops(monkeypatch, fused, xs, positions, slots, cache)
            h = ops.add_norm(xs, delta, weight)
            h0 = ops.add_norm(xs.clone(), None, weight)
            q, k, v = ops.rotary_into_cache(qkv.clone(), 0)
            normed = qkv.clone()
            ops.head_norms(normed, head_weights[0], head_weights[1])
            results.append((xs, h, h0, q, k, v, cache, ops.silu_mul(gate_up), normed))
    finally:
        torch.set_num_threads(previous)
    (xs, h, h0, q, k, v, cache, act, normed), want = results
    torch.testing.assert_close(normed, want[8], rtol=2e-6, atol=1e-6)  # per-head norms; the values untouched
    assert torch.equal(normed[:, (HEADS + KV_HEADS) * D:], qkv[:, (HEADS + KV_HEADS) * D:])
    torch.testing.assert_close(xs, want[0], rtol=0, atol=0)  # the residual add
    torch.testing.assert_close(h, want[1], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(h0, want[2], rtol=2e-6, atol=1e-6)
    for got, expected in zip((q, k, v, cache), want[3:7]):  # products and sums rounded one by one, as torch does
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(act, want[7], rtol=1e-6, atol=1e-7)
    # The reference implementation's RMS norm.
    ref = weight * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(h, ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(act, F.silu(gate_up[:, :inter]) * gate_up[:, inter:], rtol=1e-6, atol=1e-7)


def test_nan_stays_nan():
    gate_up = torch.zeros(1, 16)
    gate_up[0, 2] = float("nan")
    out = kernel.silu_mul(gate_up)
    assert out[0, 2].isnan() and not out[0, 3].isnan()


def test_out_of_range_positions_and_slots_are_refused(monkeypatch):
    cache = torch.zeros(1, 2, BLOCKS, BLOCK_SIZE, KV_HEADS, D)
    x = torch.zeros(2, 8)
    with pytest.raises(IndexError, match="position"):
        _ops(monkeypatch, True, x, torch.tensor([0, 64]), torch.tensor([0, 1]), cache)
    with pytest.raises(IndexError, match="cache slot"):
        _ops(monkeypatch, True, x, torch.tensor([0, 1]), torch.tensor([0, BLOCKS * BLOCK_SIZE]), cache)
    with pytest.raises(IndexError, match="cache slot"):
        _ops(monkeypatch, True, x, torch.tensor([0, 1]), torch.tensor([-1, 0]), cache)


def test_a_bf16_cache_gets_what_torch_rounds_to(monkeypatch):
    """New keys and values written to a bf16 cache: rounded to nearest even, as torch rounds, bit for bit, with
    infinities, overflow and subnormals; a NaN stays a NaN."""
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 3.39e38, -3.39e38, 1e-39,
                            -1e-40, 0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    qkv = torch.randn(3, (HEADS + 2 * KV_HEADS) * D)
    qkv[:, HEADS * D : HEADS * D + special.numel()] = special  # keys
    qkv[:, -special.numel():] = special  # values
    positions, slots = torch.tensor([0, 5, 9]), torch.tensor([3, 0, 17])
    caches = []
    for fused in (True, False):
        cache = torch.zeros(1, 2, BLOCKS, BLOCK_SIZE, KV_HEADS, D, dtype=torch.bfloat16)
        ops = _ops(monkeypatch, fused, torch.zeros(3, 8), positions, slots, cache)
        ops.rotary_into_cache(qkv.clone(), 0)
        caches.append(cache)
    got, want = caches
    assert torch.equal(got.isnan(), want.isnan())  # a NaN's payload is torch's own choice, path by path
    assert torch.equal(got.nan_to_num(0.0).view(torch.int16), want.nan_to_num(0.0).view(torch.int16))


def test_a_stage_without_layers_needs_no_checks():
    x = torch.zeros(2, 8)
    LayerOps(x, torch.tensor([0, 1]), torch.tensor([0, 1]), ROPE, torch.zeros(0, 2, BLOCKS, BLOCK_SIZE, KV_HEADS, D),
             HEADS, KV_HEADS, 1e-5)


def test_kernel_refuses_what_it_cannot_read():
    with pytest.raises(ValueError):
        kernel.silu_mul(torch.zeros(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError):
        kernel.silu_mul(torch.zeros(2, 15))
    with pytest.raises(ValueError):
        kernel.add_rms_norm(torch.zeros(4, 16)[:, ::2], None, torch.ones(8), 1e-5)
    with pytest.raises(ValueError):
        kernel.add_rms_norm(torch.zeros(4, 16), None, torch.ones(8), 1e-5)
    cache = torch.zeros(1, 2, BLOCKS, BLOCK_SIZE, KV_HEADS, D)
    positions, slots = torch.tensor([0, 1]), torch.tensor([0, 1])
    ops = LayerOps(torch.zeros(2, 8), positions, slots, ROPE, cache, HEADS, KV_HEADS, 1e-5)
    with pytest.raises(ValueError, match="qkv"):  # checked on every layer: one row short
        ops.rotary_into_cache(torch.zeros(2, (HEADS + 2 * KV_HEADS) * D - 1), 0)
    with pytest.raises(ValueError):  # checked once per pass
        LayerOps(torch.zeros(2, 8), positions.int(), slots, ROPE, cache, HEADS, KV_HEADS, 1e-5)
