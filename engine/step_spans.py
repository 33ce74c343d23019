"""The spans the engine writes for traced steps (--trace-detail step or layer).

A step is a trace of its own (`engine step`, with each stage's forward and each hop under it): one step carries many
requests, so it cannot sit inside one request's trace, and it links to every request it carries. A request's own
trace shows where its time went without holding a span per token: under its GenAI span, one `prefill` span per chunk
of its prompt and one `decode` span from its first decode step to its last, each linked to the step traces that
carried it (the decode span to its first and last steps where they are more than the link limit), so that from a slow
request a user reaches the steps, their stages and their layers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batching.batch import Batch, SeqWork, StepOutput
from telemetry.tracing import SpanRecord, link_limit, new_span_id, transfer_span


@dataclass(slots=True)
class StepTrace:
    """A traced step in flight: its ids, when it left, and the requests it links to."""

    trace_id: int
    step_id: int
    start_ns: int
    links: list[tuple[int, int]]
    batch: Batch

    def spans(self, out: StepOutput, received_ns: int, received_bytes: int) -> list[SpanRecord]:
        b = self.batch
        limit = link_limit()
        decodes = sum(1 for w in b.seqs if len(w.token_ids) == 1)
        step = SpanRecord("engine step", self.trace_id, self.step_id, None, self.start_ns, received_ns, {
            "strata.step.batch_id": b.batch_id, "strata.step.num_seqs": len(b.seqs),
            "strata.step.num_tokens": b.num_tokens, "strata.step.num_decodes": decodes,
            "strata.step.num_prefill_tokens": b.num_tokens - decodes,
            "strata.step.links_dropped": max(0, len(self.links) - limit),
        }, links=self.links[:limit])
        back = transfer_span(self.trace_id, self.step_id, out.trace.sent_by, "driver", out.trace.sent_ns, received_ns,
                             received_bytes) if out.trace else None
        return [step] + ([back] if back else [])


class RequestSteps:
    """One traced sequence's steps, as its request's trace shows them: a span now for each prefill chunk, and one at
    its end over its decode steps."""

    __slots__ = ("trace", "prompt_len", "seq_id", "start_ns", "end_ns", "steps", "first", "last")

    def __init__(self, trace: tuple[int, int], prompt_len: int, seq_id: int) -> None:
        self.trace, self.prompt_len, self.seq_id = trace, prompt_len, seq_id  # trace: (trace id, GenAI span id)
        self.start_ns = self.end_ns = 0
        self.steps = 0
        half = max(1, link_limit() // 2)
        self.first: list[tuple[int, int]] = []
        self.last: deque[tuple[int, int]] = deque(maxlen=half)

    def on_step(self, work: SeqWork, step: StepTrace, end_ns: int) -> SpanRecord | None:
        """A prefill chunk's span; a decode step is only counted (its span comes at the end)."""
        link = (step.trace_id, step.step_id)
        if len(work.token_ids) > 1 or work.start_pos < self.prompt_len:
            return SpanRecord("prefill", self.trace[0], new_span_id(), self.trace[1], step.start_ns, end_ns, {
                "strata.prefill.tokens": len(work.token_ids), "strata.prefill.start_position": work.start_pos,
                "strata.step.batch_id": step.batch.batch_id, "strata.step.num_seqs": len(step.batch.seqs),
                "strata.seq_id": self.seq_id,
            }, links=[link])
        if not self.steps:
            self.start_ns = step.start_ns
        self.end_ns = end_ns
        self.steps += 1
        if len(self.first) < self.last.maxlen:
            self.first.append(link)
        else:
            self.last.append(link)
        return None

    def finish(self) -> SpanRecord | None:
        """The decode span, once the sequence has ended; None where it decoded nothing in a traced step."""
        if not self.steps:
            return None
        kept = len(self.first) + len(self.last)
        return SpanRecord("decode", self.trace[0], new_span_id(), self.trace[1], self.start_ns, self.end_ns, {
            "strata.decode.steps": self.steps, "strata.decode.links_dropped": self.steps - kept,
            "strata.seq_id": self.seq_id,
        }, links=self.first + list(self.last))
