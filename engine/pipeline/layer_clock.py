"""When each layer of a stage's forward pass ended, for its layer spans."""
from __future__ import annotations

import time

import torch


class LayerClock:
    """When each layer of a forward pass ended. On a CPU, the host clock; on a GPU, CUDA events, read later by
    the export thread (waiting on an event there stalls nothing) and placed on the host clock from the start."""

    __slots__ = ("cuda", "marks", "start")

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.start = None
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()

    def mark(self, layer: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((layer, ev))
        else:
            self.marks.append((layer, time.time_ns()))

    def ends_ns(self, start_ns: int) -> list[tuple[int, int]]:
        if not self.cuda:
            return self.marks
        if self.marks:
            self.marks[-1][1].synchronize()
        return [(layer, start_ns + int(self.start.elapsed_time(ev) * 1e6)) for layer, ev in self.marks]
