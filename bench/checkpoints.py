"""Benchmark checkpoints: real model shapes with random weights, written once to a cache folder."""
from __future__ import annotations

from pathlib import Path

from engine.paths import cache_root

SMOLLM2_135M_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=True,
    rms_norm_eps=1e-5, rope_theta=100000.0,
)


LLAMA3_8B_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
    rms_norm_eps=1e-5, rope_theta=500000.0,
)


# TinyLlama-1.1B: 22 layers of ~88 MB in bf16, 2.2 GB in all.
LLAMA_1B_SHAPE = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    rms_norm_eps=1e-5, rope_theta=10000.0,
)


LLAMA3_70B_SHAPE = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
    rms_norm_eps=1e-5, rope_theta=500000.0,
)


# Qwen3-30B-A3B's structure at a size this machine holds: 64 experts of which each token takes 8, every layer a
# mixture, q/k norms; 1.7B parameters (3.5 GB in bf16), 0.27B of them active per token. SmolLM2's vocabulary, so the
# tokenizer is one llama.cpp's converter knows.
QWEN3_MOE_SHAPE = dict(
    hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=True, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)


def config_only(shape: dict, folder: Path, dtype: str = "bfloat16") -> Path:
    """A checkpoint directory holding a Llama config alone: the planner plans from it (no weights)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**shape, "architectures": ["LlamaForCausalLM"],
                                                    "model_type": "llama", "torch_dtype": dtype}))
    return folder


def _corpus() -> list[str]:
    """Varied enough text that BPE learns the full vocabulary."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(30000)]
    return [" ".join(rng.choice(words) for _ in range(20)) for _ in range(6000)]


def smollm2_135m_shaped(dtype: str = "bfloat16") -> Path:
    """A SmolLM2-135M-shaped Llama checkpoint (random weights, not a trained model)."""
    out = cache_root() / f"bench-smollm2-135m-shape-random-{dtype}-v2"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenization import train_bpe_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_SHAPE, bos_token_id=0, eos_token_id=1)).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    train_bpe_tokenizer(_corpus(), SMOLLM2_135M_SHAPE["vocab_size"], tmp)
    from tokenization import Tokenizer

    # Every id the model can emit must decode to text, or streams carry empty deltas.
    assert Tokenizer.from_dir(tmp).vocab_size == SMOLLM2_135M_SHAPE["vocab_size"]
    tmp.rename(out)
    return out


def llama3_8b_shaped(dtype: str = "bfloat16", device: str = "cpu") -> Path:
    """A Llama-3-8B-shaped checkpoint (random weights, no tokenizer: prompts are token ids)."""
    return random_sharded(LLAMA3_8B_SHAPE, f"bench-llama3-8b-shape-random-{dtype}-v1", dtype, device)


def llama_1b_shaped(dtype: str = "bfloat16") -> Path:
    """A TinyLlama-1.1B-shaped checkpoint (random weights, no tokenizer: prompts are token ids)."""
    return random_sharded(LLAMA_1B_SHAPE, f"bench-llama-1b-shape-random-{dtype}-v1", dtype, "cpu")


def qwen3_moe_shaped(dtype: str = "bfloat16") -> Path:
    """A Qwen3-MoE-shaped checkpoint (QWEN3_MOE_SHAPE, random weights) with the default model's tokenizer."""
    out = cache_root() / f"bench-qwen3-moe-shape-random-{dtype}-v1"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoTokenizer, Qwen3MoeConfig

    from engine.model.default_model import default_model

    def tokenizer(folder: Path) -> None:
        gguf = default_model()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    config = Qwen3MoeConfig(**QWEN3_MOE_SHAPE, bos_token_id=1, eos_token_id=2, torch_dtype=dtype,
                            architectures=["Qwen3MoeForCausalLM"])
    return random_sharded(config, out.name, dtype, "cpu", tokenizer)


def random_sharded(shape, name: str, dtype: str, device: str, tokenizer=None) -> Path:
    """A checkpoint of this shape with random weights, written one layer per shard with its tensors made on
    `device` (a GPU makes 8B random values in seconds), never all in memory at once. shape: a Llama shape's fields,
    or a transformers config of any family the engine runs; tokenizer(folder), where given, writes its tokenizer."""
    out = cache_root() / name
    if (out / "config.json").is_file():
        return out
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from engine.model.checkpoint import expected_shapes
    from engine.model.config import ModelConfig

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    if isinstance(shape, dict):
        special = (128000, 128001) if shape["vocab_size"] > 128001 else (1, 2)
        shape = LlamaConfig(**shape, bos_token_id=special[0], eos_token_id=special[1], torch_dtype=dtype,
                            architectures=["LlamaForCausalLM"])
    shape.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer(tmp)
    cfg = ModelConfig.from_dir(tmp)
    g = torch.Generator(device).manual_seed(0)
    weight_map: dict[str, str] = {}
    groups = [("embed", expected_shapes(cfg, [], True, False))]
    groups += [(f"layer{i:02d}", expected_shapes(cfg, [i], False, False)) for i in range(cfg.num_layers)]
    groups += [("head", {k: v for k, v in expected_shapes(cfg, [], False, True).items()})]
    for name, shapes in groups:
        tensors = {}
        for key, shape in shapes.items():
            t = (torch.ones(shape, device=device) if key.endswith("norm.weight")
                 else torch.randn(shape, generator=g, device=device) * 0.02)
            tensors[key] = t.to(getattr(torch, dtype)).cpu().contiguous()
        fname = f"model-{name}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(out)
    return out
