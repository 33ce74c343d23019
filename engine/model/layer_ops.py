"""The elementwise steps of a decoder layer: residual add and RMS norm, rotary embedding with the
KV cache write, and the gated MLP's SiLU. One C call each where engine.kernels.layer_ops runs
(fp32 on x86-64 CPUs); torch's kernels elsewhere. Which one is chosen once per forward pass,
and so are the index checks the C code relies on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import layer_ops as kernel
from engine.model.rope import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    if weight.dtype == torch.float32:  # Gemma's 1 + w: scaled in fp32 and rounded once, as its reference does
        return F.rms_norm(x.float(), weight.shape, weight, eps).to(x.dtype)
    # Normalise in fp32 and round, then scale, as the reference implementation does.
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> [T, I], on any device: the C kernel where it runs (fp32 on a CPU)."""
    if kernel.available(gate_up):
        return kernel.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> [T, I], with the tanh approximation of GELU (Gemma)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


GATED = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}  # by ModelConfig.activation


class LayerOps:
    """The elementwise steps for one forward pass over tokens at `positions`, whose new keys and values go to
    `slots` of a KV cache like `kv_cache` ([layers, 2, blocks, block_size, kv_heads, d]). `caches[i]` holds
    layer i's key and value caches."""

    def __init__(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, rope: torch.Tensor,
                 kv_cache: torch.Tensor, heads: int, kv_heads: int, eps: float,
                 local_rope: torch.Tensor | None = None) -> None:
        """local_rope: the sliding layers' own table, alike in shape (Gemma 3)."""
        self.heads, self.kv_heads, self.eps = heads, kv_heads, eps
        self.positions, self.slots, self.rope, self.local_rope = positions, slots, rope, local_rope
        self.caches = [layer.unbind(0) for layer in kv_cache.unbind(0)]
        self.fused = kernel.available(x) and kv_cache.dtype in kernel.KV_DTYPES and kv_cache.is_contiguous()
        if self.fused and self.caches:
            slots_per_layer = kv_cache.shape[2] * kv_cache.shape[3]  # blocks x block size
            for name, t, limit in (("position", positions, rope.shape[0]), ("cache slot", slots, slots_per_layer)):
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
                    raise IndexError(f"a {name} is out of range: {int(t.min())}..{int(t.max())}, limit {limit}")
            kernel.check_rotary(heads, kv_heads, positions, rope, slots, *self.caches[0])
        elif not self.fused:
            self.cos_sin = {id(t): (t[positions][:, 0:1], t[positions][:, 1:2])  # [T, 1, d] each
                            for t in (rope, local_rope) if t is not None}

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """x += delta in place (when given); returns x normalised and scaled by weight."""
        if self.fused:
            return kernel.add_rms_norm(x, delta, weight, self.eps)
        if delta is not None:
            x.add_(delta)
        return rms_norm(x, weight, self.eps)

    def head_norms(self, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> None:
        """An RMS norm over each query head and each key head of qkv [T, (heads + 2 kv_heads) d], in place, before
        the rotary embedding (Qwen3's q_norm and k_norm)."""
        nh, nkv = self.heads, self.kv_heads
        if self.fused:
            kernel.head_rms_norm(qkv, nh, nkv, q_weight, k_weight, self.eps)
            return
        heads = qkv.view(qkv.shape[0], nh + 2 * nkv, -1)
        heads[:, :nh] = rms_norm(heads[:, :nh], q_weight, self.eps)
        heads[:, nh:nh + nkv] = rms_norm(heads[:, nh:nh + nkv], k_weight, self.eps)

    def rotary_into_cache(self, qkv: torch.Tensor, layer: int, local: bool = False):
        """qkv [T, (heads + 2 kv_heads) d] -> q [T, heads, d], k, v [T, kv_heads, d], q and k rotated (local: by the
        sliding layers' table); the new keys and values are written into the layer's caches."""
        T = qkv.shape[0]
        nh, nkv = self.heads, self.kv_heads
        d = self.rope.shape[-1]
        k_cache, v_cache = self.caches[layer]
        table = self.local_rope if local else self.rope
        if self.fused:
            kernel.rotary_into_checked_cache(qkv, nh, nkv, self.positions, table, self.slots, k_cache, v_cache)
            heads = qkv.view(T, nh + 2 * nkv, d)
            return heads[:, :nh], heads[:, nh : nh + nkv], heads[:, nh + nkv :]
        qk = apply_rotary(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), *self.cos_sin[id(table)])
        k = qk[:, nh:]
        v = qkv[:, (nh + nkv) * d :].view(T, nkv, d)
        k_cache.view(-1, nkv, d).index_copy_(0, self.slots, k.to(k_cache.dtype))
        v_cache.view(-1, nkv, d).index_copy_(0, self.slots, v.to(v_cache.dtype))
        return qk[:, :nh], k, v

    gelu_tanh_mul = staticmethod(gelu_tanh_mul)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate | up) -> [T, I]."""
        if self.fused:
            return kernel.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
