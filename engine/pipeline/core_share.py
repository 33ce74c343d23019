"""How many compute threads a CPU stage runs, given what else runs on its cores.

A CPU stage's products split each operation across its threads, which all meet at the end of it. Where another
process keeps one of those cores busy, the thread on it gets a share of that core in scheduler slices of
milliseconds, and every other thread waits for it at each of the hundreds of meeting points of a step: measured
on two cores with one taken, decode fell from about 106 to 1.1 tok/s. Fewer threads than cores, each on a core of
its own, lose only the work of the core given up.

So, at most every SAMPLE_S, a stage measures the time its cores spent busy on others' work (the cores' busy time
in /proc/stat less this process's own CPU time) and runs one thread fewer for each core's worth of it, keeping at
least one; when the others' share falls back, the threads come back. The hysteresis keeps a stage from flapping
on a neighbour that uses part of a core. Linux only; elsewhere the thread count stays as it was set.
"""
from __future__ import annotations

import os
import time

import torch

from telemetry.host_cpu import cpu_seconds

SAMPLE_S = 0.5  # the shortest interval over which the others' share is measured
GIVE_UP = 0.6  # a core's worth of others' work at which a thread is given up ...
TAKE_BACK = 0.3  # ... and below which, with a thread given up, it is taken back


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CoreShare:
    """The compute threads of this process's stage, adjusted to the cores others leave it."""

    def __init__(self, threads: int) -> None:
        self.threads = self.wanted = max(1, threads)
        try:
            self.cores = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            self.cores = set()
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        read = cpu_seconds(self.cores) if self.cores else None
        return None if read is None else (time.monotonic(), read[0], _own_seconds())

    def adjust(self) -> int:
        """Called before each step: the threads to run it with (torch's are set to match)."""
        if self._last is None or self.wanted == 1:
            return self.threads
        now = time.monotonic()
        if now - self._last[0] < SAMPLE_S:
            return self.threads
        sample = self._sample()
        if sample is None:
            return self.threads
        (t0, busy0, own0), (t1, busy1, own1) = self._last, sample
        self._last = sample
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)  # cores' worth of others' work
        threads, given_up = self.threads, self.wanted - self.threads
        if threads > 1 and others >= given_up + GIVE_UP:
            threads -= 1
        elif given_up and others < given_up - 1 + TAKE_BACK:
            threads += 1
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)
        return self.threads
