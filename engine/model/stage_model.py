"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM), one pipeline stage of it.

A stage owns a contiguous run of decoder layers; the first also embeds tokens, the last
also applies the final norm and the LM head. Projections are fused (q/k/v into one
matmul, gate/up into another) to halve the kernel launches per layer, and so are the
elementwise steps between them (engine.model.layer_ops).
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import CheckpointError
from engine.model.attention import AttentionMetadata, paged_attention
from engine.model.checkpoint import TensorReader, expected_shapes, return_freed_memory
from engine.model.config import ModelConfig
from engine.model.experts import ExpertProducts
from engine.model.layer_ops import LayerOps, rms_norm
from engine.model.host_stream import HostStream, host_layer, read_host_layer
from engine.placement.devices import tier_name
from engine.model.layer_stream import LayerStream, SpillFile, StoredLayer, open_for_reading
from engine.model.linear import AmxLinear, PackedHalfLinear, QuantLinear, SplitLinear, make_linear, product_path
from engine.model.packed_weights import pack_objects, unpack_objects
from engine.model.rope import cos_sin_table
from engine.model.weight_formats import FORMATS
from engine.placement.local_device import available_memory


class Products:
    """Builds a stage's matrix products, each at its format: `formats` names the weights that run at something
    other than the stage's weight dtype (engine.model.weight_formats.tensor_formats)."""

    def __init__(self, read: TensorReader, formats: dict[str, str], compute_dtype: torch.dtype,
                 weight_dtype: torch.dtype, wide_copy: bool) -> None:
        self.read, self.formats = read, formats
        self.compute_dtype, self.weight_dtype, self.wide_copy = compute_dtype, weight_dtype, wide_copy
        self.scratch: dict = {}
        self.bytes_saved = 0  # below what the weights take at the weight dtype

    def __call__(self, weights: list[str], biases: list[str] | None = None):
        bias = self.read.fused(biases) if biases else None
        runs: list[tuple[str | None, list[str]]] = []
        for name in weights:
            fmt = self.formats.get(name)
            if runs and runs[-1][0] == fmt:
                runs[-1][1].append(name)
            else:
                runs.append((fmt, [name]))
        if len(runs) == 1:
            return self._one(weights, runs[0][0], bias)
        parts, start = [], 0
        for fmt, names in runs:
            rows = sum(self.read.shapes[n][0] for n in names)
            parts.append(self._one(names, fmt, bias[start : start + rows] if bias is not None else None))
            start += rows
        return SplitLinear(parts)

    def _one(self, names: list[str], fmt: str | None, bias: torch.Tensor | None):
        numel = sum(math.prod(self.read.shapes[n]) for n in names)
        # What StageModel counted for these weights up front: the weight dtype, and an fp32 copy where wide_copy.
        counted = numel * (self.weight_dtype.itemsize + (4 if self.wide_copy else 0))
        target = FORMATS[fmt] if fmt else None
        if target is not None and target.quantized:
            weight = self.read.quantized(names, target)
            self.bytes_saved += counted - weight.nbytes
            return QuantLinear(weight, bias, self.compute_dtype)
        dtype = getattr(torch, fmt) if fmt else self.weight_dtype
        weight = self.read.fused(names, dtype) if len(names) > 1 else self.read(names[0], dtype)
        linear = make_linear(weight, bias, self.compute_dtype, self.scratch, self.wide_copy)
        wide = getattr(linear, "wide", None)
        self.bytes_saved += counted - numel * weight.element_size() - (wide.nbytes if wide is not None else 0)
        return linear


class LayerProducts:
    """A decoder layer's matrix products: what a streamed layer keeps on disk (engine.model.layer_stream)."""

    __slots__ = ("qkv", "o", "gate_up", "down", "experts")

    def __init__(self, prefix: str, cfg: ModelConfig, products: Products, layer: int,
                 expert_products: Products | None = None) -> None:
        a, m = prefix + "self_attn.", prefix + "mlp."
        qkv = [a + "q_proj.", a + "k_proj.", a + "v_proj."]
        self.qkv = products([n + "weight" for n in qkv], [n + "bias" for n in qkv] if cfg.qkv_bias else None)
        self.o = products([a + "o_proj.weight"], [a + "o_proj.bias"] if cfg.o_bias else None)
        # A dense MLP (gate_up, down), or a mixture of experts.
        self.gate_up = self.down = self.experts = None
        if cfg.is_moe(layer):
            self.experts = ExpertProducts(prefix, cfg, products, expert_products)
            return
        gate_up = [m + "gate_proj.", m + "up_proj."]
        self.gate_up = products([n + "weight" for n in gate_up], [n + "bias" for n in gate_up] if cfg.mlp_bias else None)
        self.down = products([m + "down_proj.weight"], [m + "down_proj.bias"] if cfg.mlp_bias else None)


def read_norm(read: TensorReader, name: str, cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """A norm's scale as it multiplies: 1 + w where the family stores it so (Gemma), kept in fp32, as the reference
    multiplies by it (engine.model.layer_ops.rms_norm)."""
    w = read(name)
    return w.float() + 1.0 if cfg.norm_offset else w.to(dtype)


class DecoderLayer:
    __slots__ = ("ln1", "ln2", "post_attn", "post_mlp", "q_norm", "k_norm", "local_rope", "products")

    def __init__(self, read: TensorReader, layer: int, cfg: ModelConfig, dtype: torch.dtype,
                 products: Products, expert_products: Products | None = None) -> None:
        prefix = f"model.layers.{layer}."
        norm = (lambda name: read_norm(read, prefix + name, cfg, dtype))
        self.ln1 = norm("input_layernorm.weight")
        # The norm before the MLP, and (Gemma) the norms of the attention's and the MLP's outputs.
        self.ln2 = norm("pre_feedforward_layernorm.weight" if cfg.sandwich_norms else "post_attention_layernorm.weight")
        self.post_attn = norm("post_attention_layernorm.weight") if cfg.sandwich_norms else None
        self.post_mlp = norm("post_feedforward_layernorm.weight") if cfg.sandwich_norms else None
        # Per-head norms of the queries and keys (Qwen3, Gemma 3); None where the family has none.
        self.q_norm = norm("self_attn.q_norm.weight") if cfg.qk_norm else None
        self.k_norm = norm("self_attn.k_norm.weight") if cfg.qk_norm else None
        # Whether the layer rotates by the sliding layers' own table (Gemma 3).
        self.local_rope = cfg.local_rope_theta is not None and cfg.window(layer) is not None
        # None: streamed. expert_products: where the routed experts live elsewhere (the host's CPU).
        self.products: LayerProducts | None = LayerProducts(prefix, cfg, products, layer, expert_products)


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
        formats: dict[str, str] | None = None,
        streamed: Iterable[int] = (),
        offload: str | Path | SpillFile | None = None,
        tier: str | None = None,
        host_experts: Iterable[int] = (),
        host_dtypes: tuple[torch.dtype, torch.dtype] | None = None,
    ) -> None:
        """wide_copy: also keep an fp32 copy of half-precision weights for wide steps (see engine.model.linear);
        None: when it takes at most a quarter of the device's free memory. formats: the weights that run at another
        format than weight_dtype (engine.model.weight_formats.tensor_formats). streamed: layers (model indices) whose
        products live in a tier and are brought in for every step. tier "disk" (a CPU stage's): a tier file written at
        load (engine.model.layer_stream), offload being that file or the folder to make it in (None: the system's
        temporary folder); "host" (a GPU stage's): pinned host memory, copied in on a stream of their own
        (engine.model.host_stream). None: the device's own, disk on a CPU, host on a GPU. host_experts:
        mixture-of-experts layers whose routed experts stay in host memory, run by the host's CPU at host_dtypes
        ((compute, weights); None: the stage's), the rest of the layer on the device."""
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
        formats = formats or {}
        products = Products(read, formats, dtype, weight_dtype, wide_copy)
        streamed = set(streamed)
        tier = tier or tier_name(device.type)
        if tier not in ("disk", "host"):
            raise ValueError(f"tier must be disk or host, got {tier!r}")
        if streamed - set(layers) or (streamed and tier == "disk" and device.type != "cpu"):
            raise ValueError(f"layers {sorted(streamed)} cannot stream from {tier} on a {device.type} stage of layers "
                             f"{layers.start}-{layers.stop - 1}")
        host_experts = set(host_experts)
        if host_experts - {i for i in layers if cfg.is_moe(i)} or host_experts & streamed:
            raise ValueError(f"layers {sorted(host_experts)} cannot keep their experts on the host: only the "
                             f"mixture-of-experts layers of layers {layers.start}-{layers.stop - 1} that do not "
                             "stream can")
        host_products = None
        if host_experts:
            host_compute, host_weights = host_dtypes or (dtype, weight_dtype)
            cpu = torch.device("cpu")
            host_products = Products(TensorReader(source, shapes, host_weights, cpu), formats, host_compute,
                                     host_weights, wide_copy=False)
            per_weight = weight_dtype.itemsize + (4 if wide_copy else 0)
            self.weight_bytes -= per_weight * sum(
                math.prod(shape) for name, shape in shapes.items()
                if any(name.startswith(f"model.layers.{i}.mlp.experts.") for i in host_experts))
        spill = None
        if streamed and tier == "disk":
            spill = offload if isinstance(offload, SpillFile) else SpillFile(offload or tempfile.gettempdir())
        stored: list[StoredLayer] = []
        self.scratch = products.scratch  # fp32 buffers the products share (engine.model.linear.UpcastLinear)
        shared = {"scratch": self.scratch}
        self.layers = []
        for i in layers:
            layer = DecoderLayer(read, i, cfg, dtype, products, host_products if i in host_experts else None)
            experts = layer.products.experts
            if experts is not None and device.type == "cuda" and i not in streamed:
                experts.stack()  # all blocks through one grouped GEMM per product, where the GPU runs it
            if i in streamed:
                part, tensors = pack_objects(layer.products, shared, any_device=spill is None)
                stored.append(spill.append(i, part, tensors) if spill is not None else host_layer(i, part, tensors))
                self.weight_bytes -= sum(t.numel() * t.element_size() for t in tensors)
                layer.products = None
                del part, tensors
            self.layers.append(layer)
            return_freed_memory()  # what building the layer freed (its parts before packing), back to the system
        self.stream = None
        if stored:
            self.stream = (LayerStream(*spill.reader(), stored, shared=shared) if spill is not None
                           else HostStream(stored, device, shared=shared))
        if self.stream is not None:
            self.weight_bytes += self.stream.memory_bytes
        self.norm = read_norm(read, "model.norm.weight", cfg, dtype) if last else None
        embed_name = "model.embed_tokens.weight"
        self.lm_head = products([embed_name if cfg.tie_word_embeddings else "lm_head.weight"]) if last else None
        # A tied head packed for the engine's kernels answers embedding lookups itself, so the matrix is held once;
        # a quantized table decodes the rows it is asked for.
        self.embed_table = None  # a product whose rows() are the embeddings
        if first and cfg.tie_word_embeddings and isinstance(self.lm_head, (PackedHalfLinear, AmxLinear, QuantLinear)):
            self.embed_table = self.lm_head
        elif first and embed_name in formats and FORMATS[formats[embed_name]].quantized:
            self.embed_table = products([embed_name])
        self.embed = None
        if first and self.embed_table is None:
            # A tied matrix the head holds as it was read is the same tensor, not a second read.
            shared = getattr(self.lm_head, "weight", None) if last and cfg.tie_word_embeddings else None
            self.embed = shared if isinstance(shared, torch.Tensor) else read(embed_name)
            if last and cfg.tie_word_embeddings and self.embed is not shared:
                # A tied matrix held twice: plain for lookups, prepacked for the head.
                self.weight_bytes += self.embed.numel() * self.embed.element_size()
        self.weight_bytes -= products.bytes_saved
        self.rope = self.local_rope = None
        self._rotary_tables(max_positions, device)
        # Tokens routed to each expert of each of the stage's layers since the last take_expert_load().
        self.expert_load = torch.zeros(len(layers), max(cfg.num_experts, 1), dtype=torch.int64, device=device)
        self.scale = cfg.attention_scale or cfg.head_dim**-0.5

    def __getstate__(self) -> dict:
        # What a package stores (engine.model.package): the stream is rebuilt from the package's disk shard, the
        # rotary table for the context the server is started with.
        return {**self.__dict__, "stream": None, "rope": None, "local_rope": None}

    def _rotary_tables(self, max_positions: int, device: torch.device) -> None:
        """The cos/sin table ([P, 2, d]), and the sliding layers' own where they rotate otherwise (Gemma 3)."""
        self.rope = cos_sin_table(self.cfg, max_positions, self.dtype, device)
        if any(layer.local_rope for layer in self.layers):
            self.local_rope = cos_sin_table(self.cfg, max_positions, self.dtype, device, local=True)

    @classmethod
    def from_package(cls, path: Path, index: dict, stage_file: str, disk_file: str | None, max_positions: int,
                     device: torch.device = torch.device("cpu")):
        """A stage a package holds (index: engine.model.package.read_index): on a CPU, its objects over a private
        memory map of its shard and its streamed layers read from the disk shard each step; on a GPU, its shard
        copied to the device in one piece and its streamed layers read once into host memory (its host tier)."""
        part = index["model"]
        buffer = torch.from_file(str(path / stage_file), shared=False, size=part.nbytes, dtype=torch.uint8)
        if device.type != "cpu":
            buffer = buffer.to(device)
        model = unpack_objects(part, buffer)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path / stage_file}: holds a {type(model).__name__}, not a stage")
        model.device = device
        model._rotary_tables(max_positions, device)
        shared = {"scratch": model.scratch}
        if index["streamed"] and device.type == "cpu":
            fd, direct = open_for_reading(path / disk_file)
            model.stream = LayerStream(fd, direct, index["streamed"], shared=shared)
        elif index["streamed"]:
            model.stream = HostStream([read_host_layer(path / disk_file, s) for s in index["streamed"]], device,
                                      shared=shared)
        return model

    def forward(
        self,
        x: torch.Tensor,  # [T] token ids on the first stage, else [T, hidden]
        positions: torch.Tensor,  # [T] int64: each token's row of the rotary table (its position, offset for
        # LongRoPE's long frequencies: engine.model.rope.table_offset)
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [layers, 2, num_blocks, block_size, kv_heads, d]
        on_layer=None,  # called with -1 before the first layer, then with each layer's index within the stage; and
        # with (index, "experts") as a mixture-of-experts layer's experts start
    ) -> torch.Tensor:  # [T, hidden]
        if self.embed_table is not None:
            x = self.embed_table.rows(x).to(self.dtype)
        elif self.first:
            x = F.embedding(x, self.embed).to(self.dtype)
        else:  # the residual stream is updated in place; the caller's tensor stays as it was
            x = x.clone(memory_format=torch.contiguous_format)
        if self.first and self.cfg.embed_scale is not None:
            x = x * self.cfg.embed_scale
        cfg = self.cfg
        ops = LayerOps(x, positions, meta.slot_mapping, self.rope, kv_cache, cfg.num_heads, cfg.num_kv_heads,
                       cfg.rms_norm_eps, self.local_rope)
        act = ops.silu_mul if cfg.activation == "silu" else ops.gelu_tanh_mul
        if on_layer is not None:
            on_layer(-1)  # the layers start here
        h = ops.add_norm(x, None, self.layers[0].ln1) if self.layers else None
        stream, taken = self.stream, 0
        try:
            for i, layer in enumerate(self.layers):
                w = layer.products
                if w is None:
                    w = stream.acquire()
                    taken += 1
                qkv = w.qkv(h)
                if layer.q_norm is not None:
                    ops.head_norms(qkv, layer.q_norm, layer.k_norm)
                q, k, v = ops.rotary_into_cache(qkv, i, layer.local_rope)
                attn = w.o(paged_attention(q, k, v, *ops.caches[i], meta, self.scale, cfg.window(self.layer_ids[i]),
                                         cfg.attn_softcap))
                if layer.post_attn is not None:
                    attn = rms_norm(attn, layer.post_attn, cfg.rms_norm_eps)
                h = ops.add_norm(x, attn, layer.ln2)
                if w.experts is not None:
                    if on_layer is not None:
                        on_layer(i, "experts")
                    mlp = w.experts(h, act, self.expert_load[i])
                else:
                    mlp = w.down(act(w.gate_up(h)))
                if layer.post_mlp is not None:
                    mlp = rms_norm(mlp, layer.post_mlp, cfg.rms_norm_eps)
                if layer.products is None:
                    stream.release()
                if i + 1 < len(self.layers):
                    h = ops.add_norm(x, mlp, self.layers[i + 1].ln1)
                else:
                    x.add_(mlp)
                if on_layer is not None:
                    on_layer(i)
        except BaseException:
            if stream is not None and taken < len(stream.layers):
                stream.finish_pass(taken)  # the next pass starts at the first streamed layer again
            raise
        return x

    def take_expert_load(self) -> torch.Tensor | None:
        """Tokens routed to each expert of each layer of the stage ([layers, experts], on the CPU) since the last
        call; None for a dense model."""
        if not self.cfg.num_experts:
            return None
        load = self.expert_load.to("cpu", copy=True)
        self.expert_load.zero_()
        return load

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] float32
        h = rms_norm(hidden, self.norm, self.cfg.rms_norm_eps)
        logits = self.lm_head(h).float()
        cap = self.cfg.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
