"""What crosses the ring each step: a Batch out to the stages, a StepOutput back, and the sampled tokens from
the last stage to the first (TokensForFirstStage), which a step scheduled ahead of them computes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from batching.sampling_params import SamplingParams


@dataclass(slots=True)
class SeqInit:
    """Sent the first time the stages see a sequence; the last stage keeps it to sample."""

    params: SamplingParams
    prompt_token_ids: list[int]
    seed: int


# In SeqWork.token_ids: the token the sequence's step before this one samples. The step was scheduled before that
# token was known; the first stage takes it from the last stage's TokensForFirstStage.
PENDING = -1


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: list[int]  # tokens to compute this step; [PENDING] for the one its previous step samples
    start_pos: int  # position of token_ids[0]; tokens before it are already in the KV cache
    blocks_from: int  # the stage sets block_table[blocks_from:] = blocks
    blocks: list[int]
    sample: bool  # this chunk ends at the sequence's last known token, so sample the next
    init: SeqInit | None = None


@dataclass(slots=True, frozen=True)
class TraceContext:
    """A traced step's context, as it rides with the step: each hop passes on a new one (its own send time, and
    the spans its export queue has dropped), never editing the one it received."""

    trace_id: int
    step_id: int  # the driver's span for the step, parent of every stage's spans
    layers: bool  # whether each decoder layer gets a span
    sent_by: str  # "driver" or a stage's label: where the step last left a process
    sent_ns: int
    spans_dropped: tuple[tuple[int, int], ...] = ()  # (stage index, spans its queue has dropped so far)

    def passed_on(self, by: str, at_ns: int, stage: int, dropped: int) -> "TraceContext":
        counts = dict(self.spans_dropped)
        counts[stage] = dropped
        return replace(self, sent_by=by, sent_ns=at_ns, spans_dropped=tuple(sorted(counts.items())))


class StepTiming(NamedTuple):
    """One stage step's compute: on a GPU its device time (CUDA events), not its launch."""

    stage: int
    seconds: float
    num_seqs: int
    # A mixture of experts' load since the stage last sent it: tokens routed to each expert of each of its layers, as
    # the flat indices (layer within the stage * experts + expert) of the non-zero counts and the counts; None where
    # the stage sent none (a dense model, or a GPU stage between its readings).
    expert_load: tuple[tuple[int, ...], tuple[int, ...]] | None = None


@dataclass(slots=True)
class Batch:
    batch_id: int
    seqs: list[SeqWork]
    # Finished or aborted sequences whose per-sequence state the stages may drop.
    released: list[int] = field(default_factory=list)
    trace: TraceContext | None = None  # set when a sampled request rides in this step
    # Appended by each stage as the batch passes: the timings of its steps that have completed since the last batch
    # it sent (a GPU stage's step may still be running when its batch leaves; its timing follows with a later one).
    timings: list[StepTiming] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(w.token_ids) for w in self.seqs)


@dataclass(slots=True)
class TokensForFirstStage:
    """From the last stage to the first: what a step sampled, and at which position each token goes."""

    seq_ids: list[int]
    positions: list[int]
    token_ids: list[int]


@dataclass(slots=True)
class StepOutput:
    batch_id: int
    seq_ids: list[int]  # the sequences that sampled, in Batch order
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    timings: list[StepTiming] = field(default_factory=list)  # the Batch's, as it reached the last stage
    trace: TraceContext | None = None  # the Batch's, as the last stage passed it on
    # Sequences the last stage could not sample, and why; each fails alone (its token is a placeholder).
    errors: dict[int, str] | None = None
