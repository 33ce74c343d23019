"""Per-request sampling parameters, validated once when a request arrives."""
from __future__ import annotations

from dataclasses import dataclass, field


class ParamError(ValueError):
    """A request parameter is out of range; `param` names it for the API error, `code` says what kind of error."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str = "prompt") -> None:
    """The one rule for what fits the context: the prompt and at least one generated token, and the prompt plus
    max_tokens where a request sets it. ParamError names `param` (the prompt's) or max_tokens."""
    if prompt_len >= max_model_len:
        raise ParamError(param, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                         f"{prompt_len} tokens (at least one more is needed for the answer).", "context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise ParamError("max_tokens", f"This model's maximum context length is {max_model_len} tokens; the prompt "
                         f"has {prompt_len} tokens and max_tokens asks for {max_tokens} more.",
                         "context_length_exceeded")


def check_token_ids(ids, vocab_size: int, param: str, what: str = "token id") -> None:
    """The one rule for token ids a client sends: each inside the vocabulary, else ParamError naming `param`."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ParamError(param, f"{what} {bad} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: until the context is full
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and k alternatives
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # What the output must follow: an llguidance grammar (engine.model.grammar builds and checks them), enforced
    # where the last stage samples. The grammar decides where the output ends, with one of the model's stop tokens.
    grammar: str | None = None
    # Special tokens whose text the answer keeps though skip_special_tokens drops the others: a tool-call format's
    # markers, where a vocabulary holds them as special tokens, without which the calls could not be read back.
    kept_special_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be between 0 and 100"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1, 0 (disabled) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64, "must fit in 64 bits"),
        ]
        for param, ok, why in checks:
            if not ok:
                raise ParamError(param, f"{param} {why}, got {getattr(self, param)!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.grammar is not None and (self.ignore_eos or self.min_tokens):
            param = "ignore_eos" if self.ignore_eos else "min_tokens"
            raise ParamError(param, f"{param} cannot be combined with structured output: its grammar decides where "
                             "the output ends")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                if not -100.0 <= bias <= 100.0:
                    raise ParamError("logit_bias", f"logit_bias for token {tok} must be in [-100, 100], got {bias}")

    def check_vocab(self, vocab_size: int) -> None:
        """The token ids these parameters name (logit_bias keys, stop_token_ids) against a model's vocabulary."""
        check_token_ids(self.logit_bias or (), vocab_size, "logit_bias", "logit_bias token id")
        check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids", "stop_token_ids entry")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
