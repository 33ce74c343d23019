"""What the engine hands back per sequence: deltas while running, and the whole at the end."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass(slots=True)
class SeqDelta:
    """One step's news for one sequence."""

    seq_id: int
    text: str  # new text, safe to show (no broken characters, no partial stop string)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    queued_s: float = 0.0  # from arrival to the first step that scheduled it
    error: str | None = None  # the engine could not go on with this sequence (finish_reason "abort")


@dataclass(slots=True)
class CompletionOutput:
    """A finished sequence, as the offline API returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None  # why the engine gave up on it, when it did
