"""A Hugging Face checkpoint's tokenizer, loaded with `tokenizers` alone.

The goal is id-for-id and string-for-string agreement with transformers' `AutoTokenizer` for the
same directory, without importing transformers (slow to import, heavy) on a server's hot path.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from tokenization import chat_template as chat
from tokenization.errors import TokenizerError

__all__ = ["Tokenizer", "TokenizerError"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_added_token(value: Any) -> AddedToken:
    if isinstance(value, Mapping):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            special=True,
        )
    return AddedToken(value, special=True, normalized=False)


def _read_chat_template_file(directory: Path) -> str | None:
    # A standalone chat_template.jinja overrides the config entry, as in transformers.
    jinja_file = directory / "chat_template.jinja"
    if not jinja_file.is_file():
        return None
    try:
        return jinja_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{jinja_file}: not readable ({exc})") from exc


def _config_chat_template(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def _eos_ids_from_generation_config(config: Mapping[str, Any]) -> set[int]:
    value = config.get("eos_token_id")
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class Tokenizer:
    """Encode, decode and chat-render for one checkpoint; build with `Tokenizer.from_dir`.

    `chat_template` overrides the one in `config` (from_dir passes chat_template.jinja this way).
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None,
                 generation_config: Mapping[str, Any] | None = None, chat_template: str | None = None,
                 name: str = "tokenizer") -> None:
        config = dict(config or {})
        self._tok = backend
        self.name = name
        # A server must never silently cut or pad a prompt; length limits are enforced elsewhere.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._max_token_bytes: int | None = None

        # bos_token, eos_token, pad_token, ... and model-specific ones like image_token: transformers
        # treats every "*_token" entry holding a token the same way.
        special_values = {k: v for k, v in config.items() if k.endswith("_token") and _token_content(v) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        extra_values = [v for v in extra if _token_content(v) is not None] if isinstance(extra, list) else []
        self._add_missing_special_tokens([*special_values.values(), *extra_values])

        # What templates see as bos_token, eos_token, ... (transformers passes its special_tokens_map)
        self.special_tokens_map: dict[str, str] = {k: _token_content(v) for k, v in special_values.items()}
        self.bos_token: str | None = self.special_tokens_map.get("bos_token")
        self.eos_token: str | None = self.special_tokens_map.get("eos_token")
        self.bos_token_id: int | None = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = _eos_ids_from_generation_config(generation_config or {})
        if self.eos_token and (eos_id := self._tok.token_to_id(self.eos_token)) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        # transformers ignores the config's add_bos_token when tokenizer.json exists (its post-processor
        # decides), so report what encoding actually does instead of what the config claims.
        self.add_bos_token: bool = self.bos_token_id is not None and self._tok.encode("").ids[:1] == [
            self.bos_token_id
        ]
        # transformers skips this cleanup for BPE models because it corrupts their output
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and not isinstance(
            self._tok.model, tokenizers.models.BPE
        )

        decoder = self._tok.get_added_tokens_decoder()
        special = {i for i, tok in decoder.items() if tok.special}
        for content in [*self.special_tokens_map.values(), *(_token_content(v) for v in extra_values)]:
            if (tid := self._tok.token_to_id(content)) is not None:
                special.add(tid)
        self.all_special_ids: list[int] = sorted(special)
        # Exactly what `decode(skip_special_tokens=True)` drops; the detokenizer filters on it.
        self.skipped_ids: frozenset[int] = frozenset(i for i, tok in decoder.items() if tok.special)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.model_max_length: int | None = (
            config["model_max_length"] if isinstance(config.get("model_max_length"), int) else None
        )

        self._chat_template = chat_template if chat_template is not None else _config_chat_template(config)
        self._compiled_template: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json found (a Hugging Face fast-tokenizer file is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"{tokenizer_file}: cannot be loaded ({exc})") from exc
        config = _read_json(directory / "tokenizer_config.json")
        generation_config = _read_json(directory / "generation_config.json")
        return cls(backend, config, generation_config, _read_chat_template_file(directory), name=str(directory))

    @classmethod
    def from_gguf(cls, path: str | Path, meta: Mapping[str, Any]) -> Tokenizer:
        """From a GGUF file's metadata (engine.model.gguf_checkpoint.metadata reads it)."""
        from tokenization.gguf_tokenizer import end_of_generation_ids, gguf_tokenizer_parts

        backend, config, template = gguf_tokenizer_parts(dict(meta), str(path))
        stops = sorted(end_of_generation_ids(dict(meta)))
        return cls(backend, config, {"eos_token_id": stops}, template, name=str(path))

    def _add_missing_special_tokens(self, values: Iterable[Any]) -> None:
        # transformers registers config special tokens that tokenizer.json lacks as added tokens;
        # doing the same keeps ids (and vocab_size) in agreement with it.
        present = {tok.content for tok in self._tok.get_added_tokens_decoder().values()}
        missing = []
        for value in values:
            content = _token_content(value)
            if content is not None and content not in present:
                missing.append(_as_added_token(value))
                present.add(content)
        if missing:
            self._tok.add_special_tokens(missing)

    # -- hot path -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        # The batch call lets go of the GIL while it works, where a single encode holds it (seconds for megabytes
        # of text, every other thread of the process waiting); the fast one computes no character offsets, which
        # are never read here and which cost as much again to free (under the GIL) as the ids to build.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            text = _clean_up_tokenization(text)
        return text

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes any one token decodes to (a byte-level token that ends inside a character counts
        as the 3 bytes of U+FFFD): text of more bytes than n times this cannot fit in n tokens."""
        if self._max_token_bytes is None:
            n = self._tok.get_vocab_size(with_added_tokens=True)
            pieces = self._tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
            self._max_token_bytes = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=1) or 1
        return self._max_token_bytes

    def to_json(self) -> str:
        """The tokenizer as a tokenizer.json document (what a grammar library reads the vocabulary from)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        id_to_token = self._tok.id_to_token
        return [id_to_token(i) for i in ids]

    # -- chat -------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self._chat_template = source
        self._compiled_template = None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs: Any) -> str:
        """Render a conversation to the prompt string (not tokenized).

        Encode the result with `add_special_tokens=False`, as transformers does: templates that want
        a BOS write `{{ bos_token }}` themselves.
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.name} has no chat template; use a completion request or a chat model")
        if self._compiled_template is None:
            self._compiled_template = chat.compile_template(self.chat_template)
        return chat.render(self._compiled_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens_map, tools=tools, **template_kwargs)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _clean_up_tokenization(text: str) -> str:
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        .replace(" 've", "'ve").replace(" 're", "'re")
    )
