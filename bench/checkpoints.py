"""Benchmark checkpoints: real model shapes with random weights, written once to a cache folder."""
from __future__ import annotations

from pathlib import Path

from engine.paths import cache_root

SMOLLM2_135M_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=True,
    rms_norm_eps=1e-5, rope_theta=100000.0,
)


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
