"""A tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, built as a `tokenizers.Tokenizer`, as transformers
builds it when it loads the same file: gpt2-style byte-level BPE from the vocabulary and merges, control tokens as
special added tokens, BOS/EOS and the chat template from the metadata."""
from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from tokenization.errors import TokenizerError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special and added tokens


def gguf_tokenizer_parts(meta: dict[str, Any], source: str) -> tuple[tokenizers.Tokenizer, dict, str | None]:
    """(backend, tokenizer_config-style dict, chat template) from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    if kind != "gpt2":
        raise TokenizerError(f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2)")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == CONTROL]
    added = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
             for i, t in enumerate(types) if t == USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(added)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    config = {f"{k}_token": t for k in ("bos", "eos", "unk", "pad") if (t := token(k)) is not None}
    return backend, config, meta.get("tokenizer.chat_template")
