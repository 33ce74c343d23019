"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM), one pipeline stage of it.

A stage owns a contiguous run of decoder layers; the first also embeds tokens, the last
also applies the final norm and the LM head. Projections are fused (q/k/v into one
matmul, gate/up into another) to halve the kernel launches per layer, and so are the
elementwise steps between them (engine.model.layer_ops).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from engine.model.attention import AttentionMetadata, paged_attention
from engine.model.checkpoint import TensorReader, expected_shapes, return_freed_memory
from engine.model.config import ModelConfig
from engine.model.layer_ops import LayerOps, rms_norm
from engine.model.linear import AmxLinear, NativeHalfLinear, PackedHalfLinear, make_linear, product_path
from engine.model.rope import cos_sin_table
from engine.placement.local_device import available_memory


class DecoderLayer:
    __slots__ = ("ln1", "ln2", "qkv", "o", "gate_up", "down")

    def __init__(self, read: TensorReader, prefix: str, cfg: ModelConfig, dtype: torch.dtype, linear) -> None:
        a, m = prefix + "self_attn.", prefix + "mlp."
        self.ln1 = read(prefix + "input_layernorm.weight").to(dtype)
        self.ln2 = read(prefix + "post_attention_layernorm.weight").to(dtype)
        qkv = [a + "q_proj.", a + "k_proj.", a + "v_proj."]
        self.qkv = linear(read.fused([n + "weight" for n in qkv]),
                          read.fused([n + "bias" for n in qkv]) if cfg.qkv_bias else None)
        self.o = linear(read(a + "o_proj.weight"), read.get(a + "o_proj.bias"))
        gate_up = [m + "gate_proj.", m + "up_proj."]
        self.gate_up = linear(read.fused([n + "weight" for n in gate_up]),
                              read.fused([n + "bias" for n in gate_up]) if cfg.mlp_bias else None)
        self.down = linear(read(m + "down_proj.weight"), read.get(m + "down_proj.bias"))


class StageModel:
    def __init__(
        self,
        cfg: ModelConfig,
        source,  # engine.model.checkpoint.tensor_source
        layers: range,
        first: bool,
        last: bool,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        weight_dtype: torch.dtype | None = None,
        wide_copy: bool | None = None,
    ) -> None:
        """wide_copy: also keep an fp32 copy of half-precision weights for wide steps (see engine.model.linear);
        None: when it takes at most a quarter of the device's free memory."""
        self.cfg = cfg
        self.layer_ids = layers
        self.first, self.last = first, last
        self.dtype, self.device = dtype, device
        shapes = expected_shapes(cfg, layers, first, last)
        weight_dtype = weight_dtype or dtype
        fp32_bytes = 4 * sum(math.prod(s) for s in shapes.values())
        if wide_copy is None:
            wide_copy = fp32_bytes <= available_memory(device) // 4
        wide_copy = wide_copy and product_path(device, weight_dtype, dtype) == "upcast"
        read = TensorReader(source, shapes, weight_dtype, device)
        self.weight_bytes = (weight_dtype.itemsize * sum(math.prod(s) for s in shapes.values())
                             + (fp32_bytes if wide_copy else 0))
        linear = partial(make_linear, compute_dtype=dtype, scratch={}, wide_copy=wide_copy)
        self.layers = []
        for i in layers:
            self.layers.append(DecoderLayer(read, f"model.layers.{i}.", cfg, dtype, linear))
            return_freed_memory()  # what building the layer freed (its parts before packing), back to the system
        self.norm = read("model.norm.weight").to(dtype) if last else None
        head = None
        if last:
            head = read("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        self.lm_head = linear(head, None) if last else None
        # A tied head packed for the engine's kernels answers embedding lookups itself, so the matrix is held once.
        self.embed_from_head = (first and cfg.tie_word_embeddings
                                and isinstance(self.lm_head, (PackedHalfLinear, AmxLinear)))
        self.embed = None
        if first and not self.embed_from_head:
            # A tied matrix the head holds as it was read is the same tensor, not a second read.
            tied_plain = last and cfg.tie_word_embeddings and getattr(self.lm_head, "weight", None) is head
            self.embed = head if tied_plain else read("model.embed_tokens.weight")
        del head
        if self.embed is not None and isinstance(self.lm_head, NativeHalfLinear):
            # A tied matrix held twice: plain for lookups, prepacked for the head.
            self.weight_bytes += self.embed.numel() * self.embed.element_size()
        self.rope = cos_sin_table(cfg, max_positions, dtype, device)  # [P, 2, d]
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T] token ids on the first stage, else [T, hidden]
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [layers, 2, num_blocks, block_size, kv_heads, d]
        on_layer=None,  # called with -1 before the first layer, then with each layer's index within the stage
    ) -> torch.Tensor:  # [T, hidden]
        if self.embed_from_head:
            x = self.lm_head.rows(x).to(self.dtype)
        elif self.first:
            x = F.embedding(x, self.embed).to(self.dtype)
        else:  # the residual stream is updated in place; the caller's tensor stays as it was
            x = x.clone(memory_format=torch.contiguous_format)
        cfg = self.cfg
        ops = LayerOps(x, positions, meta.slot_mapping, self.rope, kv_cache, cfg.num_heads, cfg.num_kv_heads,
                       cfg.rms_norm_eps)
        if on_layer is not None:
            on_layer(-1)  # the layers start here
        h = ops.add_norm(x, None, self.layers[0].ln1) if self.layers else None
        for i, layer in enumerate(self.layers):
            q, k, v = ops.rotary_into_cache(layer.qkv(h), i)
            attn = paged_attention(q, k, v, *ops.caches[i], meta, self.scale)
            h = ops.add_norm(x, layer.o(attn), layer.ln2)
            mlp = layer.down(ops.silu_mul(layer.gate_up(h)))
            if i + 1 < len(self.layers):
                h = ops.add_norm(x, mlp, self.layers[i + 1].ln1)
            else:
                x.add_(mlp)
            if on_layer is not None:
                on_layer(i)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] float32
        h = rms_norm(hidden, self.norm, self.cfg.rms_norm_eps)
        return self.lm_head(h).float()
