"""Tiny GGUF files written as llama.cpp's converter (convert_hf_to_gguf.py) writes a Hugging Face checkpoint: its
tensors under GGUF's names (the gguf package's own name map), Llama's q/k rows permuted for ggml's rotary layout,
Llama 3's rotary scaling as a rope_freqs tensor, matrices quantized by the gguf package, and the byte-level
tokenizer's vocabulary and merges."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

CONTROL, NORMAL = 3, 1


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from rotate-half order into interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: dict, layer_type: str = "full_attention") -> dict:
    """The rotary parameters, under either name transformers writes them (a layer type's, where they differ)."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return rope.get(layer_type) or {} if "full_attention" in rope else rope


def _rope_factors(cfg: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors: Llama 3's scaling as a divisor per frequency."""
    s = _rope(cfg)
    base = s.get("rope_theta", cfg.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_tokenizer(w, hf_dir: Path, pre: str) -> None:
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if i in special else NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    config = json.loads((hf_dir / "config.json").read_text())
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    template = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template:
        w.add_chat_template(template)


# One expert's part (Mixtral's names, then Qwen-MoE's) -> the stacked tensor llama.cpp keeps every expert's in.
_EXPERT_PARTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
                 "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def _expert_part(name: str) -> str | None:
    parts = name.split(".")  # model.layers.L.(mlp|block_sparse_moe).experts.E.part.weight
    if len(parts) == 8 and parts[4] == "experts":
        return f"blk.{parts[2]}.{_EXPERT_PARTS[parts[6]]}.weight"
    return None


def _expert_order(name: str):
    """Tensors in name order, but experts by their number (so that stacking puts expert 10 after expert 9)."""
    parts = name.split(".")
    return (name, 0) if _expert_part(name) is None else (".".join(parts[:5] + parts[6:]), int(parts[5]))


def write_gguf(hf_dir: Path, path: Path, matrix_type: str = "F32", pre: str = "default") -> Path:
    """hf_dir (tests/tiny_models.write_checkpoint, llama, qwen2 or qwen3, one safetensors file) as a GGUF file at path;
    matrix_type: the GGML type of its 2-D tensors (F32, F16, Q8_0, Q4_0, ...), where their rows allow it."""
    import gguf
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Phi3ForCausalLM": "phi3", "Gemma3ForCausalLM": "gemma3", "MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe",
            "Qwen3MoeForCausalLM": "qwen3moe"}[cfg["architectures"][0]]
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads, head_dim = cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(hf_dir.name)
    w.add_block_count(layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(_rope(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if arch == "gemma3":  # as llama.cpp's converter writes it
        w.add_sliding_window(cfg["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        w.add_rope_freq_base_swa(_rope(cfg, "sliding_attention").get("rope_theta", 10000.0))
        if _rope(cfg).get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(_rope(cfg)["factor"])
    _write_tokenizer(w, hf_dir, pre)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    stacked: dict[str, list[np.ndarray]] = {}  # the experts' parts of a layer, stacked as llama.cpp stores them
    for name, value in sorted(load_file(str(hf_dir / "model.safetensors")).items(), key=lambda kv: _expert_order(kv[0])):
        data = value.astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # the converter stores Gemma's norms as the 1 + w they scale by
        expert = _expert_part(name)
        if expert is not None:
            stacked.setdefault(expert, []).append(data)
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {name}")
        if data.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,) and data.shape[1] % block == 0:
            w.add_tensor(gguf_name, quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data)
    for gguf_name, parts in stacked.items():
        data = np.stack(parts)
        if qtype not in (gguf.GGMLQuantizationType.F32,) and data.shape[-1] % block == 0:
            w.add_tensor(gguf_name, quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data)
    if _rope(cfg).get("rope_type") == "longrope":  # as llama.cpp's converter writes Phi-3's
        rope = _rope(cfg)
        original = rope["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    if arch == "llama" and _rope(cfg).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _rope_factors(cfg, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
