"""Counting tokens as the served model does, for prompts of an exact length (--random-input-len counts tokens, as
vLLM's does): a local tokenizer.json (--tokenizer), or the server's own /tokenize and /detokenize (Strata's and
vLLM's). Imports nothing of the engine."""
from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from pathlib import Path

from loadtest.workloads import words


def server_root(base_url: str) -> str:
    """The server's address without the API's /v1, however --base-url was given."""
    return base_url.rstrip("/").removesuffix("/v1")


class TokenCounter:
    """encode(text) -> ids without special tokens; decode(ids) -> text."""

    def __init__(self, tokenizer: str | None, base_url: str, api_key: str | None) -> None:
        self._local = None
        if tokenizer:
            import tokenizers

            path = Path(tokenizer)
            path = path / "tokenizer.json" if path.is_dir() else path
            try:
                self._local = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust side raises a bare Exception
                raise ValueError(f"--tokenizer {tokenizer}: cannot read {path} ({e})") from None
        self._root = server_root(base_url)
        self._headers = {"Content-Type": "application/json"} | (
            {"Authorization": f"Bearer {api_key}"} if api_key else {})

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self._root + path, json.dumps(body).encode(), self._headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def encode(self, text: str) -> list[int]:
        if self._local is not None:
            return self._local.encode(text, add_special_tokens=False).ids
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]

    def decode(self, ids: list[int]) -> str:
        if self._local is not None:
            return self._local.decode(ids)
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def text_of(self, n: int, rng: random.Random) -> str:
        """Random words that come to n tokens (re-encoding a cut may move a boundary by a token or so)."""
        text = words(rng, n)
        ids = self.encode(text)
        while len(ids) < n:
            text += " " + words(rng, n - len(ids))
            ids = self.encode(text)
        return self.decode(ids[:n]).strip()


def token_counter(tokenizer: str | None, base_url: str, api_key: str | None) -> TokenCounter | None:
    """A counter, or None where there is no local tokenizer and the server has no /tokenize (lengths are then
    counted in words)."""
    counter = TokenCounter(tokenizer, base_url, api_key)
    if tokenizer:
        return counter
    try:
        counter.encode("probe")
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None
    return counter


def served_context(base_url: str, model: str, api_key: str | None) -> int | None:
    """The model's context as the server's /v1/models lists it (max_model_len, as Strata and vLLM give it)."""
    req = urllib.request.Request(server_root(base_url) + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = json.loads(r.read()).get("data") or []
    except (urllib.error.URLError, OSError, ValueError):
        return None
    for card in data:
        if isinstance(card, dict) and card.get("id") == model and isinstance(card.get("max_model_len"), int):
            return card["max_model_len"]
    return None
