"""A sequence: one prompt and the tokens generated for it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from batching.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or the server gave up on it


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Tokens whose KV is in the cache (or will be once the in-flight step lands).
    num_computed_tokens: int = 0
    # Of the prompt, how many tokens the prefix cache supplied on first admission.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Hash of each full block of tokens, in order; the chain makes a hash stand for its whole prefix.
    block_hashes: list[bytes] = field(default_factory=list)
    # How many entries of block_table the stages already know; the next Batch sends the rest.
    num_blocks_sent: int = 0
    # The leading entries of block_table it no longer holds: every position in them has left every layer's sliding
    # window (their ids stay in the table, which the stages index by position, but the blocks may serve others).
    num_dropped_blocks: int = 0
    num_in_flight: int = 0  # steps of this sequence in flight
    # Whether the stages hold this sequence's sampling state (sent once, dropped on finish).
    known_to_stages: bool = False
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def in_flight(self) -> bool:
        return self.num_in_flight > 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
