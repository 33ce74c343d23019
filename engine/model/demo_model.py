"""The built-in demo checkpoint `strata serve` uses when no model is given.

A real BPE tokenizer trained on text written here, a chat template, and Llama-family
weights drawn from a fixed seed: the same bytes on every machine. The weights are
random, and the name says so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.paths import cache_root

DEMO_NAME = "strata-demo-random"
DEMO_VERSION = 1

DEMO_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=704,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
)


def _corpus() -> list[str]:
    subjects = ["The server", "A pipeline stage", "The scheduler", "Each request", "The tokenizer", "Our GPU", "The CPU"]
    verbs = ["streams", "batches", "schedules", "caches", "splits", "measures", "serves"]
    objects = ["tokens to clients", "layers across devices", "blocks of keys and values", "prompts in order",
               "text in many languages", "the work of every step"]
    lines = [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    lines += ["Hello! How can I help you today?", "Bonjour, ça va ? Très bien, merci.", "こんにちは、元気ですか。",
              "Grüße aus München — schön, dich zu sehen.", "Emoji: 🚀 ✨ 👍", "def main():\n    return 42\n"]
    return lines * 4


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Create the demo checkpoint once; later calls return its directory."""
    out = (cache_dir or cache_root()) / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    from tokenization import train_bpe_tokenizer
    from tokenization.tokenizer import Tokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    train_bpe_tokenizer(_corpus(), 1024, tmp)
    tok = Tokenizer.from_dir(tmp)
    eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|im_end|>")]
    cfg = dict(DEMO_CONFIG, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=eos[0])
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(DEMO_VERSION)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.08

    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
        }
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": eos}, indent=2))
    (tmp / "README.md").write_text(f"# {DEMO_NAME}\n\nRandom weights for trying Strata out. Not a trained model: its output is noise.\n")
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
