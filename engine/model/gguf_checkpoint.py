"""GGUF checkpoints, read with the `gguf` package (ggml's own reader): the model's shape from the file's metadata
and its tensors under the names the engine uses (those of a Hugging Face checkpoint), either dequantized or as
quantized codes for the engine's packed layout (engine.model.quantized).

llama.cpp's converter permutes the rows of Llama-family q/k projections for its rotary layout; they are put back
here, as transformers does when it loads a GGUF, so the engine computes what the original checkpoint computed.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

from engine.errors import CheckpointError
from tokenization.gguf_tokenizer import end_of_generation_ids

# general.architecture -> the Hugging Face architecture the engine runs it as
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                 "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
# llama.cpp's mixtures of experts: whether each token's expert weights are renormalised over its chosen experts, as
# its graph for the architecture does (a Mixtral file is a "llama" with experts).
NORMALISED_EXPERTS = {"llama": True, "qwen2moe": False, "qwen3moe": True}
# Layer tensors: GGUF's name within blk.N -> the Hugging Face name within model.layers.N
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight", "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
PER_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight")
GEMMA_NORMS = {"post_attention_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
# A mixture of experts' experts, stacked in one tensor each: GGUF's name within blk.N -> the name of one expert's
# part within model.layers.N.mlp.experts.E
EXPERT_TENSORS = {"ffn_gate_exps.weight": "gate_proj.weight", "ffn_up_exps.weight": "up_proj.weight",
                  "ffn_down_exps.weight": "down_proj.weight"}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder without config.json."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{p}: holds {len(found)} GGUF files; name one of them with --model")
        return found[0] if found else None
    return None


def open_gguf(path: Path):
    """A reader over the file. It maps the file and holds an object per element of each metadata array (some 160 MB
    for a 49k-token vocabulary), so it lives only as long as what reads from it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError or struct errors for files that are not GGUF
        raise CheckpointError(f"{path}: cannot read it as GGUF ({type(e).__name__}: {e})") from None


# Tensors of a few dozen rotary frequency factors that the config needs: Llama 3's divisors, LongRoPE's two sets.
FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@functools.lru_cache(maxsize=4)
def _header(path: Path) -> tuple[dict, dict[str, tuple[str, int]], dict[str, list[float]]]:
    """The file's key-value metadata as Python values, each tensor's GGML type and number of dimensions, and the
    rotary frequency factors the file holds (FACTOR_TENSORS), by tensor name."""
    reader = open_gguf(path)
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field type this reader version cannot decode: nothing the engine reads
            continue
    factors = {t.name: [float(f) for f in np.asarray(t.data, dtype=np.float32)] for t in reader.tensors
               if t.name in FACTOR_TENSORS}
    return meta, {t.name: (t.tensor_type.name, len(t.shape)) for t in reader.tensors}, factors


def metadata(path: Path) -> dict:
    """The file's key-value metadata, arrays of tokens and merges included, as Python values (shared: not to be
    changed)."""
    return _header(path)[0]


def config_dict(path: Path) -> dict:
    """The file's metadata as the fields of a Hugging Face config.json."""
    meta = metadata(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tensors = _header(path)[1]
    names = set(tensors)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise CheckpointError(f"{path}: rotary embedding over {rotary} of {head_dim} head dimensions is not "
                              "supported (partial rotary)")
    raw = {
        "architectures": [ARCHITECTURES[arch]],
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim, "vocab_size": vocab,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": _wide_dtype(tensors),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted(end_of_generation_ids(meta)),
    }
    raw["rope_scaling"] = _rope_scaling(path, meta, arch)
    if meta.get(f"{arch}.attention.sliding_window"):
        raw["sliding_window"] = int(meta[f"{arch}.attention.sliding_window"])
    if meta.get(f"{arch}.final_logit_softcapping"):
        raw["final_logit_softcapping"] = float(meta[f"{arch}.final_logit_softcapping"])
    if arch == "gemma3":
        raw.update(_gemma3(meta, raw))
    experts = int(meta.get(f"{arch}.expert_count") or 0)
    if experts:
        if arch not in NORMALISED_EXPERTS:
            raise CheckpointError(f"{path}: GGUF architecture {arch!r} with experts is not supported")
        raw.update(num_experts=experts, num_experts_per_tok=int(need("expert_used_count")),
                   norm_topk_prob=NORMALISED_EXPERTS[arch],
                   moe_intermediate_size=int(meta.get(f"{arch}.expert_feed_forward_length") or
                                             raw["intermediate_size"]),
                   shared_expert_intermediate_size=int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0))
        if arch == "llama":
            raw["architectures"] = ["MixtralForCausalLM"]
            raw["intermediate_size"] = raw["moe_intermediate_size"]
    return raw


def _gemma3(meta: dict, raw: dict) -> dict:
    """Gemma 3's fields as llama.cpp reads them: which layers slide (a flag per layer, or every n-th layer global,
    config.json's sliding_window_pattern, 6 unless said), the sliding layers' rotary base (10000 unless said), the
    query scale its graph uses, and norms whose 1 + w the converter has already added."""
    layers = raw["num_hidden_layers"]
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    # The 27B model (62 layers) scales queries by its hidden size per head rather than its head size.
    scalar = raw["hidden_size"] // raw["num_attention_heads"] if layers == 62 else raw["head_dim"]
    out = {"rope_local_base_freq": float(meta.get("gemma3.rope.freq_base_swa") or 10000.0),
           "query_pre_attn_scalar": scalar, "hidden_activation": "gelu_pytorch_tanh", "norms_include_offset": True}
    if isinstance(pattern, list) or int(pattern) == 0:  # 0: every layer slides
        flags = pattern if isinstance(pattern, list) else [True] * layers
        out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in flags]
    else:
        out["sliding_window_pattern"] = int(pattern)
    return out


def _rope_scaling(path: Path, meta: dict, arch: str) -> dict | None:
    """The rotary scaling as config.json would say it. llama.cpp's converter writes Llama 3's as a tensor of
    per-frequency divisors (rope_freqs), which the engine applies as they are; linear scaling as a factor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factors = _header(path)[2]
    if "rope_factors_long.weight" in factors:  # LongRoPE (Phi-3)
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if not original or "rope_factors_short.weight" not in factors:
            raise CheckpointError(f"{path}: GGUF LongRoPE factors without rope_factors_short and "
                                  f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                "short_factor": factors["rope_factors_short.weight"], "original_max_position_embeddings": int(original),
                "attention_factor": meta.get(f"{arch}.rope.scaling.attn_factor")}
    if "rope_freqs.weight" in factors:
        if kind not in (None, "none"):
            raise CheckpointError(f"{path}: GGUF rope scaling {kind!r} beside rope_freqs is not supported")
        return {"rope_type": "freq_factors", "factors": factors["rope_freqs.weight"]}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise CheckpointError(f"{path}: GGUF linear rope scaling without a positive {arch}.rope.scaling.factor")
        return {"rope_type": "linear", "factor": float(factor)}
    raise CheckpointError(f"{path}: GGUF rope scaling {kind!r} is not supported (linear, or Llama 3's rope_freqs)")


def _wide_dtype(tensors: dict[str, tuple[str, int]]) -> str:
    """The dtype the file's matrices are held in where they do not stay quantized (the checkpoint's torch_dtype):
    float32 or float16 where every matrix is stored so, else bfloat16. A quantized file thus runs as a bf16
    checkpoint does (fp32 activations on a CPU, a bf16 KV cache); `--dtype float32` asks for fp32 throughout."""
    types = {ggml_type for ggml_type, dims in tensors.values() if dims == 2}
    for wide in ("F32", "F16"):
        if types <= {"F32", wide}:
            return {"F32": "float32", "F16": "float16"}[wide]
    return "bfloat16"


class GGUFSource:
    """The tensors of a GGUF file under Hugging Face names, each dequantized to fp32 when read."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int, num_experts: int = 0) -> None:
        self.path = path
        reader = open_gguf(path)
        self.arch = metadata(path).get("general.architecture")
        # Phi-3's file keeps q, k and v as one attn_qkv, and gate and up as one ffn_up, as its checkpoint does.
        fused = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}
        names = {**LAYER_TENSORS, **fused} if self.arch == "phi3" else LAYER_TENSORS
        if self.arch == "gemma3":  # four norms a layer: ffn_norm is the one before the MLP
            names = {**LAYER_TENSORS, **GEMMA_NORMS}
        self.heads, self.kv_heads = num_heads, num_kv_heads
        self.tensors = {}
        self.expert: dict[str, int] = {}  # a name that is one expert of a stacked tensor -> its index there
        for t in reader.tensors:
            if PER_EXPERT.fullmatch(t.name):
                raise CheckpointError(f"{path}: tensor {t.name!r} holds one expert, an older llama.cpp layout; convert "
                                      "the model again (experts stacked in ffn_gate_exps, ffn_up_exps, ffn_down_exps)")
            name = _hf_name(t.name, names)
            if name is not None:
                self.tensors[name] = t
            elif t.name.startswith("blk.") and t.name.split(".", 2)[2] in EXPERT_TENSORS:
                _, index, rest = t.name.split(".", 2)
                if int(t.shape[-1]) != num_experts:
                    raise CheckpointError(f"{path}: tensor {t.name!r} stacks {int(t.shape[-1])} experts; the metadata "
                                          f"says {num_experts}")
                for e in range(num_experts):
                    expert = f"model.layers.{index}.mlp.experts.{e}.{EXPERT_TENSORS[rest]}"
                    self.tensors[expert], self.expert[expert] = t, e

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists dimensions innermost first
        if name in self.expert:
            return shape[1:]
        return (1, *shape) if name.endswith("shared_expert_gate.weight") and len(shape) == 1 else shape

    def _data(self, name: str):
        """The tensor's stored values (one expert's, of a stacked tensor)."""
        t = self.tensors[name]
        return t.data[self.expert[name]] if name in self.expert else t.data

    def where(self, name: str) -> str:
        return f"{self.path}: tensor {name!r}"

    def stored_type(self, name: str) -> str:
        """The tensor's GGML type: "Q4_K", "F32", ..."""
        return self.tensors[name].tensor_type.name

    def read(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t, data = self.tensors[name], self._data(name)
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = np.array(data, dtype=np.float32)  # a copy: the file is mapped read-only
        else:
            values = dequantize(data, t.tensor_type)
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape(name))
        order = self._row_order(name, out.shape[0])
        return out[torch.from_numpy(order)].contiguous() if order is not None else out

    def read_codes(self, name: str):
        """A quantized matrix's codes as stored (engine.model.quantized.Codes), rows in the engine's order."""
        from engine.model.quantized import from_ggml
        from engine.model.weight_formats import by_ggml_type

        t = self.tensors[name]
        shape = self.shape(name)
        codes = from_ggml(by_ggml_type(t.tensor_type.name), self._data(name).reshape(shape[0], -1), shape)
        order = self._row_order(name, shape[0])
        return codes.rows(order) if order is not None else codes

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """Where llama.cpp's converter permuted a Llama q/k projection's rows, the order that puts them back."""
        if self.arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            return rotary_row_order(rows, self.heads if "q_proj" in name else self.kv_heads)
        return None


def _hf_name(name: str, layer_tensors: dict[str, str]) -> str | None:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if rest in layer_tensors:
            return f"model.layers.{index}.{layer_tensors[rest]}"
    return None  # rope_freqs and the like: what the engine computes itself


def rotary_row_order(rows: int, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row permutation: within each head, rows back from (half, pair) order."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)
