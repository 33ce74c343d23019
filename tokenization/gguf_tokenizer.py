"""A tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, built as a `tokenizers.Tokenizer` that gives the ids
of the tokenizer the model was trained with, as llama.cpp reads the same metadata:

- `gpt2`: byte-level BPE from the vocabulary and merges, the text split first by the expression that
  `tokenizer.ggml.pre` names (llama.cpp's table of pre-tokenizers; a name outside it is refused);
- `llama`: sentencepiece's BPE (Llama 2, Mistral, TinyLlama): merges recovered from the tokens' scores, spaces as
  `▁`, bytes a piece lacks as `<0xXX>` tokens.

Control tokens become special added tokens and user-defined ones plain added tokens; BOS, EOS and the chat
template come from the metadata. Where transformers builds the same file otherwise (see _sentencepiece, the
`ignore_merges` of Llama 3's pre-tokenizer, llama.cpp's default split, and added tokens spelled outside the byte
alphabet, which transformers drops), it is the trained tokenizer that is followed."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

from tokenization.errors import TokenizerError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special and added tokens
SPACE = "\u2581"  # sentencepiece's spelling of a space

log = logging.getLogger("strata.tokenizer")

# The expressions a byte-level vocabulary's text is split by before its merges apply, by `tokenizer.ggml.pre`,
# as llama.cpp's llama-vocab.cpp reads the names (its regex_exprs per pre-tokenizer type).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """How a byte-level vocabulary reads text before its merges: the expressions that split it (in turn); whether
    a word the vocabulary holds whole is taken whole before any merge (Llama 3's `ignore_merges`); whether a BOS
    is added where the file does not say."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    bos: bool = False


_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's fallback for a file that names none: runs of punctuation, GPT-2's expression, then numbers in
    # threes.
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "phi-2"), PreTokenizer((_GPT2,))),
    "smollm": PreTokenizer((r"\p{N}", _GPT2)),  # every digit a word of its own, then GPT-2's expression
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), PreTokenizer((_QWEN2,))),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, bos=True),
    **dict.fromkeys(("gpt-4o", "llama4"), PreTokenizer((_GPT4O,))),
}


def gguf_tokenizer_parts(meta: dict[str, Any], source: str) -> tuple[tokenizers.Tokenizer, dict, str | None]:
    """(backend, tokenizer_config-style dict, chat template) from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []
    added_types = {i: t for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
    if kind == "gpt2":
        name = meta.get("tokenizer.ggml.pre")
        if name is None:
            log.warning("%s names no pre-tokenizer (tokenizer.ggml.pre): splitting text as llama.cpp does then, "
                        "which may not be how the model's tokenizer split it", source)
            name = "default"
        if (pre := PRE_TOKENIZERS.get(name)) is None:
            raise TokenizerError(f"{source}: GGUF pre-tokenizer {name!r} is not supported "
                                 f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        backend, bos_by_default = _byte_level(meta, tokens, pre, set(added_types)), pre.bos
    elif kind == "llama":
        # A sentencepiece vocabulary that does not say otherwise gets a BOS (llama.cpp's rule, and transformers').
        backend, bos_by_default = _sentencepiece(meta, tokens), True
    else:
        raise TokenizerError(f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    # Added tokens match the text whole, as spelled in the file (byte-level files write them in plain characters:
    # DeepSeek's `<｜User｜>`), each under its own id.
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in added_types.items() if t == CONTROL]
    added = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
             for i, t in added_types.items() if t == USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(added)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = token("bos")
    bos_id = backend.token_to_id(bos) if bos is not None else None
    if meta.get("tokenizer.ggml.add_bos_token", bos_by_default) and bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    # Only tokens the vocabulary holds under their spelling: a config token it lacks would be added anew, with an
    # id the model does not have.
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    config = {f"{name}_token": t for name, key in names.items()
              if (t := token(key)) is not None and backend.token_to_id(t) is not None}
    return backend, config, meta.get("tokenizer.chat_template")


def end_of_generation_ids(meta: dict[str, Any]) -> set[int]:
    """The ids that end a generation: EOS, and the end of a turn or of a message where the file names them (Llama
    3's `<|eot_id|>` and `<|eom_id|>`), as llama.cpp stops on each."""
    keys = ("eos", "eot", "eom")
    return {i for key in keys if isinstance(i := meta.get(f"tokenizer.ggml.{key}_token_id"), int)}


@cache
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_byte_spelling().values())


def _byte_level(meta: dict[str, Any], tokens: list[str], pre: PreTokenizer,
                added: set[int]) -> tokenizers.Tokenizer:
    # A token spelled in plain characters rather than the byte alphabet (some converters write them so) is
    # respelled by its UTF-8 bytes, as the merges that build it are; an added token keeps its spelling, which is
    # what it matches in the text.
    alphabet, spelling = _byte_alphabet(), _byte_spelling()
    vocab = {}
    for i, tok in enumerate(tokens):
        plain = i in added or set(tok) <= alphabet
        vocab.setdefault(tok if plain else "".join(spelling[b] for b in tok.encode("utf-8")), i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                                              ignore_merges=pre.ignore_merges))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    if pre.splits == (_GPT2,):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(expr), behavior="isolated") for expr in pre.splits),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


@cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet byte-level vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """Sentencepiece's BPE as a `tokenizers` BPE: merges from the file, or recovered from the scores (a piece's
    score ranks the merge that makes it), a byte a piece lacks as its `<0xXX>` token.

    Spaces become `▁` and, where `tokenizer.ggml.add_space_prefix` (default on) asks, each run of text gets one in
    front: at the start and after every added token, as sentencepiece, llama.cpp and the Llama tokenizer.json
    files do. (transformers, building a tokenizer from the same file, adds it only where the text does not
    already start with a space, so " Hello" is the one token `▁Hello` there, where the model was trained on the two
    tokens `▁` and `▁Hello`.)"""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), spaces]) if prefix else spaces
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, as a merge ranked by the whole piece's score
    (higher first; ties by the lengths of the parts, then by their ids), as transformers recovers them."""
    ranked = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((left, right, score) for left, right in splits)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]
