"""When a stage's step started and ended, when each of its layers ended, and when a mixture-of-experts layer's experts
started.

On a CPU these are host clock readings, complete when the step returns. On a GPU the step returns once its kernels
are queued, so the host clock would time the launch: the clock records CUDA events on the stage's compute stream
instead, and they are read only once they have completed (done()), by the span export thread or by a later step,
never by waiting on the hot path. Readings are placed on the host clock from the step's start.
"""
from __future__ import annotations

import time

import torch


class StepClock:
    __slots__ = ("cuda", "start_ns", "layers", "_marks", "_experts", "_start", "_end", "_end_ns", "_stream")

    def __init__(self, device: torch.device, layers: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.layers = layers  # whether mark() is called for each layer
        self._marks: list = []
        self._experts: list = []  # (layer, when its experts started)
        self._end = None
        self._end_ns = 0
        self.start_ns = time.time_ns()
        self._start = self._stream = None
        if self.cuda:
            self._stream = torch.cuda.current_stream(device)  # the stream the step's kernels are queued on
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(self._stream)

    def mark(self, layer: int, part: str | None = None) -> None:
        """Layer `layer` of the stage has been computed (-1: the embedding); with part "experts", its experts start
        (engine.model.stage_model's on_layer)."""
        marks = self._experts if part == "experts" else self._marks
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self._stream)
            marks.append((layer, ev))
        else:
            marks.append((layer, time.time_ns()))

    def finish(self) -> None:
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record(self._stream)
        else:
            self._end_ns = time.time_ns()

    def done(self) -> bool:
        """Whether reading the clock would not wait for the device."""
        return not self.cuda or self._end.query()

    def _device_ns(self, event) -> int:
        return self.start_ns + int(self._start.elapsed_time(event) * 1e6)

    def end_ns(self) -> int:
        if not self.cuda:
            return self._end_ns
        self._end.synchronize()
        return self._device_ns(self._end)

    def seconds(self) -> float:
        return (self.end_ns() - self.start_ns) / 1e9

    def layer_ends_ns(self) -> list[tuple[int, int]]:
        """(layer, end) on the host clock, for each mark."""
        return self._read(self._marks)

    def experts_starts_ns(self) -> dict[int, int]:
        """layer -> when its experts started, on the host clock, for each layer with experts."""
        return dict(self._read(self._experts))

    def _read(self, marks: list) -> list[tuple[int, int]]:
        if not self.cuda:
            return marks
        self._end.synchronize()
        return [(layer, self._device_ns(ev)) for layer, ev in marks]
