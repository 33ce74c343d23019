"""The model's shape, read from a Hugging Face `config.json` or a GGUF file's metadata."""
from __future__ import annotations

import json
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
}

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16", "float": "float32"}


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
    sliding_window: int | None
    checkpoint_dtype: str  # the dtype the weights are stored in
    bos_token_id: int | None
    eos_token_ids: frozenset[int]

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
        # Older configs say rope_theta + rope_scaling; newer ones fold both into rope_parameters.
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            # freq_factors: per-frequency divisors, as a GGUF file carries Llama 3's scaling
            if kind not in ("llama3", "linear", "freq_factors", "default", None):
                raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (llama3, linear)")
            if kind == "freq_factors" and len(scaling.get("factors") or ()) != int(head_dim) // 2:
                raise CheckpointError(f"{source}: {len(scaling.get('factors') or ())} rotary frequency factors "
                                      f"for a head of {head_dim}")
            if kind in ("default", None):
                scaling = None
        theta = raw.get("rope_theta")
        if theta is None and isinstance(raw.get("rope_parameters"), dict):
            theta = raw["rope_parameters"].get("rope_theta")
        sliding = (raw.get("sliding_window") if family in ("mistral", "phi3") or raw.get("use_sliding_window")
                   else None)
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
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            o_bias=family == "llama" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            fused_projections=family == "phi3",
            sliding_window=int(sliding) if sliding else None,
            checkpoint_dtype=DTYPES[dtype],
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=frozenset(int(e) for e in eos_ids),
        )

    def layer_weight_bytes(self, dtype_bytes: int) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return (attn + mlp + norms) * dtype_bytes

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int) -> int:
        return 2 * self.kv_size * dtype_bytes
