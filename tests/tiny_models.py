"""Tiny random checkpoints written by transformers' own save_pretrained, with a trained tokenizer."""
from __future__ import annotations

from pathlib import Path

from tokenization import train_bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs! Sphinx of black quartz, judge my vow.",
    "Übermäßig schöne Grüße aus Köln; déjà vu, naïve café, señor piñata.",
    "東京都は日本の首都です。猫が好きです。こんにちは世界。",
    "Emoji time: 🚀🔥😀👍🏽 and 🇯🇵 flags, then plain words again.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
] * 8

FAMILIES = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], tie_word_embeddings=True, head_dim=32),
    "phi3": dict(architectures=["Phi3ForCausalLM"], tie_word_embeddings=False, pad_token_id=0),
    "mistral": dict(architectures=["MistralForCausalLM"], tie_word_embeddings=False, sliding_window=None),
    # Gemma 3: every other layer slides over 8 positions, at its own rotary base; the others are global, scaled.
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], tie_word_embeddings=False, head_dim=32, sliding_window=8,
                   query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1000000.0}}),
    # Gemma 2: soft caps on the attention's scores (low enough to change them) and the logits, every other layer sliding
    # over 8 positions.
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], tie_word_embeddings=False, head_dim=32, sliding_window=8,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=30.0),
    # Mixtures of experts: 8 experts, 2 per token; a shared expert and unnormalised weights (Qwen2-MoE), a dense
    # first layer (Qwen3-MoE).
    "mixtral": dict(architectures=["MixtralForCausalLM"], tie_word_embeddings=False, num_local_experts=8,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(architectures=["Qwen2MoeForCausalLM"], tie_word_embeddings=False, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96,
                      norm_topk_prob=False),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], tie_word_embeddings=True, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, head_dim=32,
                      mlp_only_layers=[0]),
}


def write_tokenizer(out: Path, vocab_size: int = 400) -> None:
    train_bpe_tokenizer(CORPUS, vocab_size, out)


def write_checkpoint(out: Path, family: str = "llama", *, vocab_size: int = 512, hidden: int = 64, layers: int = 3,
                     heads: int = 4, kv_heads: int = 2, intermediate: int = 128, dtype: str = "float32",
                     max_shard_size: str | None = None, seed: int = 0, max_position_embeddings: int = 1024,
                     **overrides) -> Path:
    """overrides: config fields beyond the family's (FAMILIES)."""
    import torch
    import transformers

    write_tokenizer(out)
    from tokenization import Tokenizer

    tok = Tokenizer.from_dir(out)
    kw = {**FAMILIES[family], **overrides}
    arch = kw.pop("architectures")[0]
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config, "phi3": transformers.Phi3Config,
                  "mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig,
                  "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
                  "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig}[family]
    config = config_cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        # Wide weights make the logits peaked, so greedy argmax is not decided by rounding noise.
        initializer_range=0.25, bos_token_id=tok.bos_token_id, eos_token_id=sorted(tok.eos_token_ids)[0], **kw,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(getattr(torch, dtype))
    if family.startswith("gemma"):
        # Its norms start at w = 0 (a scale of 1 + w = 1) and its embeddings are scaled up: random norms make each
        # layer count, so that greedy output depends on all of it.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, dtype: str = "float32",
              gguf_file: str | None = None) -> list[list[int]]:
    """Reference continuations from transformers' generate, one prompt at a time (no padding effects); gguf_file:
    a GGUF file in model_dir to load instead (transformers dequantizes it)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **kwargs).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs
