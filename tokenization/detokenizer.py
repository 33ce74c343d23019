"""Streaming token-to-text conversion for one generated sequence.

Decoding the whole sequence after every token costs O(length) per token. Instead only a short window
is decoded: the tokens emitted in the previous step (the anchor) plus everything after them. The
anchor gives context-sensitive decoders what they need to produce the same text they would inside
the full sequence: SentencePiece decoders drop the leading space of the *first* token only, so a
window must never start at a token whose text has not been emitted yet. The text beyond what the
anchor decodes to is the delta.

A character can span several byte-level tokens; until it is complete the window decodes to a
trailing U+FFFD, and that tail is withheld rather than streamed as a broken character.

One known limit: a SentencePiece byte-fallback decoder turns a whole run of byte tokens into U+FFFD
when any byte in the run is invalid, so garbage bytes generated right after a completed character
change how a full decode renders that character; the stream has already sent it as it was.
"""
from __future__ import annotations

from tokenization.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes, so at most 4 tokens can be waiting on one; a U+FFFD tail
# that survives this many withheld tokens is invalid output, not an unfinished character.
_MAX_WITHHELD = 8


class IncrementalDetokenizer:
    __slots__ = ("_tokenizer", "_skip_special", "_skipped_ids", "_ids", "_prefix_offset", "_read_offset",
                 "_sent", "_chunks", "_text_cache")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 kept: frozenset[int] = frozenset()) -> None:
        """kept: special tokens whose text stays though skip_special_tokens drops the others."""
        self._tokenizer = tokenizer
        # Skipped tokens contribute nothing to decode(skip_special_tokens=True), so they are dropped
        # before they reach the window; otherwise one could become a window's first token and make
        # a SentencePiece decoder strip the space of the real token after it. With some kept, the windows
        # hold no other special token, and decode them all.
        self._skipped_ids = tokenizer.skipped_ids - kept if skip_special_tokens else frozenset()
        self._skip_special = skip_special_tokens and not kept
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: first token of the anchor
        self._read_offset = 0  # end of the anchor: tokens from here on have not been emitted
        self._sent = 0  # characters of decode(ids[prefix_offset:]) already emitted
        self._chunks: list[str] = []
        self._text_cache: str | None = ""

    @property
    def text(self) -> str:
        """Everything emitted so far (deltas plus any flush)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text it completes (possibly "")."""
        if token_id in self._skipped_ids:
            return ""
        ids = self._ids
        ids.append(token_id)
        window = self._tokenizer.decode(ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if window.endswith(_REPLACEMENT) and len(ids) - self._read_offset <= _MAX_WITHHELD:
            return ""
        if len(window) <= self._sent:
            # Nothing new yet (e.g. a token that decodes to ""): keep the anchor, which still has text.
            return ""
        return self._emit(window)

    def flush(self) -> str:
        """Whatever is still withheld (e.g. an invalid byte tail) once generation has ended."""
        if self._read_offset == len(self._ids):
            return ""
        window = self._tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if len(window) <= self._sent:
            return ""
        return self._emit(window)

    def _emit(self, window: str) -> str:
        delta = window[self._sent:]
        ids = self._ids
        # The tokens just emitted become the next anchor; its decoded length is what a later window
        # will start with, so only text past it is new.
        new_prefix = self._read_offset
        self._prefix_offset = new_prefix
        self._read_offset = len(ids)
        self._sent = len(self._tokenizer.decode(ids[new_prefix:], skip_special_tokens=self._skip_special))
        self._chunks.append(delta)
        self._text_cache = None
        return delta
