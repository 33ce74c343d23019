"""Runs the engine loop on its own thread and bridges it to asyncio.

The event loop never waits on the model: requests go to the engine thread through a
queue, and each step's deltas come back to the loop with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

from batching.sampling_params import SamplingParams
from engine import (EngineConfig, EngineDeadError, EngineInfo, EngineStats, GrammarCompiler, LLMEngine, SeqDelta,
                    background_this_thread)


@dataclass(slots=True)
class _Add:
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: "RequestStream"
    trace: tuple[int, int] | None


@dataclass(slots=True)
class _Abort:
    stream: "RequestStream"


@dataclass(slots=True, eq=False)
class RequestStream:
    """One sequence; its deltas go to `sink` as (tag, SeqDelta or Exception) on the event loop."""

    sink: asyncio.Queue
    tag: int
    seq_id: int | None = None
    aborted: bool = False


IDLE_CHECK_S = 0.5


class EngineError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, config: EngineConfig, started=None) -> None:
        """started: the stages started ahead for this config (LLMEngine's)."""
        self.engine = LLMEngine(config, started)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.tracing = self.engine.tracing
        # Structured outputs' grammars, checked against the vocabulary the last stage masks with.
        self.grammars = (GrammarCompiler(self.tokenizer.to_json(), self.model_config.vocab_size,
                                         self.engine.eos_token_ids) if self.tokenizer is not None else None)
        self.info: EngineInfo = self.engine.info()
        self.stats: EngineStats = self.engine.stats()  # replaced whole by the engine thread, read by the loop
        self.dead: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, RequestStream] = {}
        self._pending_adds = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_step = None  # callback(deltas, stats) run on the event loop, for metrics

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="strata-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side ---------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting + self._pending_adds

    def add(self, prompt_token_ids: list[int], params: SamplingParams, sink: asyncio.Queue, tag: int,
            trace: tuple[int, int] | None = None) -> RequestStream:
        if self.dead:
            raise EngineError(self.dead)
        stream = RequestStream(sink, tag)
        self._pending_adds += 1
        self._commands.put(_Add(prompt_token_ids, params, stream, trace))
        return stream

    def abort(self, stream: RequestStream) -> None:
        if not stream.aborted:
            stream.aborted = True
            self._commands.put(_Abort(stream))

    async def stop(self) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.engine.shutdown()

    # ---- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        # Its wake-ups (a step's results arriving) do not preempt a CPU stage's compute (engine.pipeline.thread_policy).
        background_this_thread()
        try:
            while not self._stopping:
                self._drain(block=eng.idle)
                if self._stopping:
                    break
                deltas = eng.step()
                self._publish(deltas)
        except EngineDeadError as e:
            self._fail(str(e))
        except Exception as e:  # the engine loop must not die silently
            self._fail(f"engine loop failed: {type(e).__name__}: {e}")

    def _drain(self, block: bool) -> None:
        while True:
            try:
                # An idle engine still looks at its stage processes now and then, so /health tells the truth.
                cmd = self._commands.get(block=block, timeout=IDLE_CHECK_S if block else None)
            except queue.Empty:
                if block:
                    self.engine.check_stages()
                    continue
                return
            block = False
            if cmd is None:
                return
            if isinstance(cmd, _Add):
                if not cmd.stream.aborted:
                    try:
                        seq_id = self.engine.add_request(cmd.prompt_token_ids, cmd.params, cmd.trace)
                    except ValueError as e:
                        self._loop.call_soon_threadsafe(cmd.stream.sink.put_nowait, (cmd.stream.tag, e))
                    else:
                        cmd.stream.seq_id = seq_id
                        self._streams[seq_id] = cmd.stream
                # Only once num_waiting counts the sequence may the pending count drop, or admission
                # control would briefly see neither and let a burst past --max-queue.
                self._update_stats()
                self._loop.call_soon_threadsafe(self._added)
                continue
            elif isinstance(cmd, _Abort):
                if cmd.stream.seq_id is not None and self._streams.pop(cmd.stream.seq_id, None) is not None:
                    self.engine.abort_request(cmd.stream.seq_id)
            self._update_stats()

    def _added(self) -> None:
        self._pending_adds -= 1

    def _publish(self, deltas: list[SeqDelta]) -> None:
        self._update_stats()
        stats = self.stats
        routed = []
        for d in deltas:
            stream = self._streams.get(d.seq_id)
            if stream is None:
                continue
            if d.finished:
                del self._streams[d.seq_id]
            routed.append((stream, d))
        self._loop.call_soon_threadsafe(self._deliver, routed, deltas, stats)

    def _deliver(self, routed, deltas, stats) -> None:
        for stream, d in routed:
            stream.sink.put_nowait((stream.tag, d))
        if self.on_step is not None:
            self.on_step(deltas, stats)

    def _update_stats(self) -> None:
        self.stats = self.engine.stats()

    def predicted_step_s(self, stage: int, batch_size: int) -> float:
        """The planner's time for a step on a stage (from the plan alone: safe on the event loop)."""
        return self.engine.predicted_step_s(stage, batch_size)

    def _fail(self, why: str) -> None:
        self.dead = why
        err = EngineError(why)
        streams = list(self._streams.values())
        self._streams.clear()

        def fail_all():
            for st in streams:
                st.sink.put_nowait((st.tag, err))

        self._loop.call_soon_threadsafe(fail_all)
