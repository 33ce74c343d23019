"""The model's shape, read from a Hugging Face `config.json` or a GGUF file's metadata."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError

# Architectures that are the same decoder up to the flags below.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
# The products of a dense layer's MLP, and of one expert of a mixture-of-experts layer (Hugging Face names).
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16", "float": "float32"}


# quantization_config's quant_method, as people name the method.
QUANT_METHODS = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8", "bitsandbytes": "bitsandbytes", "compressed-tensors":
                 "compressed-tensors", "aqlm": "AQLM", "hqq": "HQQ", "eetq": "EETQ", "torchao": "torchao",
                 "fbgemm_fp8": "FBGEMM FP8", "mxfp4": "MXFP4"}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # an RMS norm over each query and key head before the rotary embedding (Qwen3)
    fused_projections: bool  # the checkpoint stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (Phi-3)
    sliding_window: int | None  # attention over the last this many positions, in the layers of window_layers
    checkpoint_dtype: str  # the dtype the weights are stored in
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    # Mixture of experts: each token's MLP is the weighted sum of the experts_per_token experts its router scores
    # highest (renormalised to sum to one where norm_topk_prob), plus a shared expert where the family has one,
    # scaled by a sigmoid gate (Qwen2-MoE). Layers not in moe_layers have a dense MLP of intermediate_size.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: frozenset[int] = frozenset()
    window_layers: frozenset[int] = frozenset()  # the layers whose attention slides (sliding_window)
    # Gemma's differences: norms scale by 1 + w (norm_offset), the attention's and the MLP's outputs are normalised
    # before the residual adds them (sandwich_norms: post_attention_layernorm on the attention's output,
    # pre_feedforward_layernorm before the MLP, post_feedforward_layernorm after it), embeddings scaled by
    # embed_scale, a GELU (tanh) gate, queries scaled by attention_scale, and the sliding layers' own rotary base.
    norm_offset: bool = False
    sandwich_norms: bool = False
    embed_scale: float | None = None
    activation: str = "silu"  # "silu" or "gelu_tanh"
    attention_scale: float | None = None  # None: head_dim ** -0.5
    local_rope_theta: float | None = None  # the sliding layers' rotary base, unscaled; None: as the others
    attn_softcap: float | None = None  # attention scores capped to c * tanh(score / c) (Gemma 2)
    logit_softcap: float | None = None  # the LM head's logits capped alike

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_dir(model_dir: str | Path) -> "ModelConfig":
        """From the folder's config.json, or from the metadata of a GGUF file (model_dir names it, or a folder with
        one .gguf and no config.json)."""
        from engine.model.gguf_checkpoint import config_dict, gguf_file

        gguf = gguf_file(model_dir)
        if gguf is not None:
            return ModelConfig.from_dict(config_dict(gguf), str(gguf))
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; a checkpoint directory needs config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return ModelConfig.from_dict(raw, str(path), Path(model_dir))

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json", model_dir: Path | None = None) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{source}: architecture {archs or raw.get('model_type')!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        quantized = raw.get("quantization_config")
        if quantized is not None:
            method = quantized.get("quant_method", "an unnamed method") if isinstance(quantized, dict) else quantized
            raise CheckpointError(
                f"{source}: the checkpoint's weights are quantized with {QUANT_METHODS.get(method, method)} "
                "(quantization_config), which Strata does not run; serve its unquantized checkpoint, with "
                "--quantization q8_0 or q4_k to quantize it at load, or a GGUF file of it")

        def need(key: str):
            if key not in raw:
                raise CheckpointError(f"{source}: missing required field {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = raw.get("head_dim") or hidden // heads
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        # Older configs say rope_theta + rope_scaling; newer ones fold both into rope_parameters, per layer type where
        # layer types differ (Gemma 3: the sliding layers' own base, unscaled).
        local_theta = raw.get("rope_local_base_freq")
        if isinstance(raw.get("rope_parameters"), dict) and "full_attention" in raw["rope_parameters"]:
            local = raw["rope_parameters"].get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise CheckpointError(f"{source}: sliding layers' rope type {local.get('rope_type')!r} is not "
                                      "supported (default)")
            local_theta = local.get("rope_theta", local_theta)
            raw = {**raw, "rope_parameters": raw["rope_parameters"]["full_attention"]}
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            # freq_factors: per-frequency divisors, as a GGUF file carries Llama 3's scaling
            if kind not in ("llama3", "linear", "freq_factors", "longrope", "su", "default", None):
                raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported "
                                      "(llama3, linear, longrope)")
            if kind == "freq_factors" and len(scaling.get("factors") or ()) != int(head_dim) // 2:
                raise CheckpointError(f"{source}: {len(scaling.get('factors') or ())} rotary frequency factors "
                                      f"for a head of {head_dim}")
            if kind in ("longrope", "su"):
                scaling = _long_rope(scaling, raw, int(head_dim), source)
            if kind in ("default", None):
                scaling = None
        theta = raw.get("rope_theta")
        if theta is None and isinstance(raw.get("rope_parameters"), dict):
            theta = raw["rope_parameters"].get("rope_theta")
        sliding = (raw.get("sliding_window") if family in ("mistral", "phi3", "mixtral", "gemma2", "gemma3")
                   or raw.get("use_sliding_window") else None)
        if sliding and int(sliding) >= int(raw.get("max_position_embeddings", 4096)):
            sliding = None  # a window at least the context long never slides (Phi-3's 128k models)
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if raw.get(cap) is not None and family != "gemma2":
                raise CheckpointError(f"{source}: {cap} is not supported for {arch}")
        partial = float((raw.get("rope_parameters") or {}).get("partial_rotary_factor", raw.get(
            "partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise CheckpointError(f"{source}: rotary embedding over part of each head (partial_rotary_factor "
                                  f"{partial}) is not supported")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise CheckpointError(f"{source}: torch_dtype {dtype!r} is not supported (float32, bfloat16, float16)")
        eos = raw.get("eos_token_id")
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if model_dir is not None:
            gen = model_dir / "generation_config.json"
            if gen.is_file():
                g_eos = json.loads(gen.read_text()).get("eos_token_id")
                eos_ids |= set([g_eos] if isinstance(g_eos, int) else (g_eos or []))
        moe = _experts(raw, family, source)
        return ModelConfig(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family in ("qwen2", "qwen2_moe") or bool(raw.get("attention_bias", False)),
            o_bias=family == "llama" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
            fused_projections=family == "phi3",
            sliding_window=int(sliding) if sliding else None,
            window_layers=(_window_layers(raw, family, int(need("num_hidden_layers")), source) if sliding
                           else frozenset()),
            checkpoint_dtype=DTYPES[dtype],
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=frozenset(int(e) for e in eos_ids),
            **moe,
            **(_gemma(raw, family, hidden, local_theta, DTYPES[dtype]) if family in ("gemma2", "gemma3") else {}),
        )

    def window(self, layer: int) -> int | None:
        """The layer's sliding window, or None where it attends to the whole context."""
        return self.sliding_window if layer in self.window_layers else None

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def mlp_prefixes(self, layer: int) -> list[tuple[str, int]]:
        """The gated MLPs of a layer, each as (name prefix within the layer, intermediate size): the dense MLP, or
        every expert and then the shared expert."""
        if not self.is_moe(layer):
            return [("mlp.", self.intermediate_size)]
        out = [(f"mlp.experts.{e}.", self.expert_intermediate_size) for e in range(self.num_experts)]
        if self.shared_expert_intermediate_size:
            out.append(("mlp.shared_expert.", self.shared_expert_intermediate_size))
        return out

    def product_parts(self, layer: int) -> list[str]:
        """The matrix products of a layer, by name within it (without ".weight"); a router's is not one of them: it
        is never quantized (llama.cpp keeps it in F32), and runs at the layer's float type."""
        return [*ATTENTION_PARTS, *(p + part for p, _ in self.mlp_prefixes(layer) for part in MLP_PARTS)]

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors, by name within it, with their shapes."""
        h, q, kv = self.hidden_size, self.q_size, self.kv_size
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            **({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)}
               if self.sandwich_norms else {}),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        }
        if self.qkv_bias:
            shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if self.o_bias:
            shapes["self_attn.o_proj.bias"] = (h,)
        if self.qk_norm:
            shapes.update({"self_attn.q_norm.weight": (self.head_dim,), "self_attn.k_norm.weight": (self.head_dim,)})
        for m, inter in self.mlp_prefixes(layer):
            shapes.update({m + "gate_proj.weight": (inter, h), m + "up_proj.weight": (inter, h),
                           m + "down_proj.weight": (h, inter)})
        if self.is_moe(layer):
            shapes["mlp.gate.weight"] = (self.num_experts, h)
            if self.shared_expert_intermediate_size:
                shapes["mlp.shared_expert_gate.weight"] = (1, h)
        elif self.mlp_bias:
            inter = self.intermediate_size
            shapes.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
        return shapes

    def layer_params(self, layer: int) -> int:
        """A layer's weights, in elements."""
        return sum(math.prod(s) for s in self.layer_shapes(layer).values())

    def layer_weight_bytes(self, dtype_bytes: int) -> int:
        """The mean layer's weights (layers differ where some are dense in a mixture-of-experts model)."""
        return sum(self.layer_params(i) for i in range(self.num_layers)) * dtype_bytes // max(self.num_layers, 1)

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int) -> int:
        return 2 * self.kv_size * dtype_bytes


def _gemma(raw: dict, family: str, hidden: int, local_theta, dtype: str) -> dict:
    """Gemma 2's and 3's fields of ModelConfig, with transformers' defaults where the config is silent."""
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"activation {act!r} is not supported for Gemma (gelu_pytorch_tanh)")
    if family == "gemma3" and local_theta is None:
        local_theta = 10000.0  # the sliding layers' base
    return dict(
        # A GGUF file's norms hold 1 + w already (llama.cpp's converter adds it).
        norm_offset=not raw.get("norms_include_offset", False), sandwich_norms=True,
        embed_scale=_rounded(hidden**0.5, dtype),  # sqrt(hidden) rounded to the weights' dtype, as the reference has it
        activation="gelu_tanh", attention_scale=float(raw.get("query_pre_attn_scalar") or 256) ** -0.5,
        local_rope_theta=float(local_theta) if local_theta else None,
        attn_softcap=_positive(raw.get("attn_logit_softcapping"), "attn_logit_softcapping"),
        logit_softcap=_positive(raw.get("final_logit_softcapping"), "final_logit_softcapping"))


def _positive(value, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise CheckpointError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _rounded(value: float, dtype: str) -> float:
    """value as the nearest number of a float dtype (bf16: round to nearest even)."""
    if dtype == "float16":
        return struct.unpack("e", struct.pack("e", value))[0]
    bits = struct.unpack("I", struct.pack("f", value))[0]
    if dtype == "bfloat16":
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("f", struct.pack("I", bits))[0]


def _window_layers(raw: dict, family: str, layers: int, source: str) -> frozenset[int]:
    """The layers a sliding window applies to, as the reference implementation takes them: as the config's
    layer_types say; else for Gemma all but every n-th layer (n: sliding_window_pattern, 6 for Gemma 3, 2 for Gemma
    2), for Qwen's families those from max_window_layers on, and every layer of the others (Mistral, Mixtral,
    Phi-3)."""
    types = raw.get("layer_types")
    if types:
        kinds = {"sliding_attention", "full_attention"}
        if not isinstance(types, list) or len(types) != layers or not set(types) <= kinds:
            raise CheckpointError(f"{source}: layer_types must name one of {sorted(kinds)} for each of the {layers} "
                                  "layers")
        return frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
    if family in ("gemma2", "gemma3"):
        pattern = raw.get("sliding_window_pattern", 6 if family == "gemma3" else 2)
        if not isinstance(pattern, int) or pattern < 1:
            raise CheckpointError(f"{source}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        return frozenset(i for i in range(layers) if (i + 1) % pattern)
    if family.startswith("qwen"):
        return frozenset(range(int(raw.get("max_window_layers") or 0), layers))
    return frozenset(range(layers))


def _long_rope(scaling: dict, raw: dict, head_dim: int, source: str) -> dict:
    """LongRoPE (Phi-3's "su"): per-frequency divisors for short contexts and for long ones, and the factor cos and
    sin are scaled by, as one dict."""
    original = scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if not original:
        raise CheckpointError(f"{source}: longrope scaling needs original_max_position_embeddings")
    for key in ("short_factor", "long_factor"):
        if len(scaling.get(key) or ()) != head_dim // 2:
            raise CheckpointError(f"{source}: longrope {key} has {len(scaling.get(key) or ())} values for a head of "
                                  f"{head_dim}")
    factor = scaling.get("factor") or int(raw.get("max_position_embeddings", original)) / int(original)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(int(original))) if factor > 1.0 else 1.0
    return {"rope_type": "longrope", "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]), "original_max_position_embeddings": int(original),
            "attention_factor": float(attention)}


def _experts(raw: dict, family: str, source: str) -> dict:
    """The mixture-of-experts fields of ModelConfig from a config.json (none for a dense family)."""
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    top_k = int(raw.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= top_k <= experts:
        raise CheckpointError(f"{source}: {top_k} experts per token of {experts} is not a mixture of experts")
    layers = int(raw["num_hidden_layers"])
    if family == "mixtral":
        return dict(num_experts=experts, experts_per_token=top_k, expert_intermediate_size=int(raw["intermediate_size"]),
                    norm_topk_prob=True, moe_layers=frozenset(range(layers)))
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = raw.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < layers for i in dense) or step < 1:
        raise CheckpointError(f"{source}: mlp_only_layers must list layers 0..{layers - 1} and decoder_sparse_step "
                              "be positive")
    for key in ("moe_intermediate_size", *(("shared_expert_intermediate_size",) if family == "qwen2_moe" else ())):
        if key not in raw:
            raise CheckpointError(f"{source}: missing required field {key!r}")
    return dict(num_experts=experts, experts_per_token=top_k, expert_intermediate_size=int(raw["moe_intermediate_size"]),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
                if family == "qwen2_moe" else 0,
                moe_layers=frozenset(i for i in range(layers) if i not in set(dense) and (i + 1) % step == 0))
