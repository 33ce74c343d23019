"""Layers whose products live on disk and are read in for every step: a reader thread fetches them ahead, in the order
the stage computes them, into a ring of slots, while the compute thread runs the layers before.

The file is read with direct I/O (O_DIRECT), in one large aligned read per layer, so the page cache holds none of it:
what a stage holds in memory is what it was given, and the bandwidth measured is the disk's, even on a machine whose
spare memory could cache the whole file. Where the file system refuses direct I/O (tmpfs), reads are buffered and the
pages dropped after each (posix_fadvise), which the log says.

A step's layers are taken strictly in order (acquire, compute, release), one step after the next; the slot of the
g-th fetch since start is g mod the ring's size on both sides, so neither side passes the other.
"""
from __future__ import annotations

import collections
import logging
import mmap
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.model.packed_weights import PackedPart, aligned, unpack_objects, write_at
from engine.placement.cost import STREAM_SLOTS

log = logging.getLogger("strata.layer_stream")
# Layers read ahead of the one computing, as the planner counts them: two keep the disk busy through a resident layer
# between.
SLOTS = STREAM_SLOTS
MAX_RECORDS = 4096  # fetches kept for spans until the stage drains them


@dataclass(slots=True, frozen=True)
class StoredLayer:
    """Where a layer's products are in a tier file."""

    layer: int  # the model's layer index
    offset: int  # in the file, a multiple of ALIGN
    part: PackedPart


@dataclass(slots=True)
class Fetch:
    """One layer read in: for a span (engine.pipeline.worker)."""

    layer: int
    tier: str
    nbytes: int
    start_ns: int
    end_ns: int
    overlapped: bool  # it was in before the compute asked for it


def open_for_reading(path: str | Path) -> tuple[int, bool]:
    """(fd, whether reads bypass the page cache)."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


class SpillFile:
    """A tier file: the products of a stage's streamed layers, written as it loads. Without a name, the stage's own
    file in the offload folder, unlinked as soon as it is made, so that nothing is left behind however the process
    ends; with one, a package's disk shard (engine.model.package)."""

    def __init__(self, folder: str | Path, name: str | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.size = 0
        if name is not None:
            self.fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            return
        try:
            self.fd = os.open(folder, os.O_RDWR | os.O_TMPFILE, 0o600)
        except (AttributeError, OSError):  # no O_TMPFILE here, or not on this file system
            self.fd, name = tempfile.mkstemp(prefix="strata-offload-", dir=folder)
            os.unlink(name)

    def append(self, layer: int, part: PackedPart, tensors: list[torch.Tensor]) -> StoredLayer:
        """A layer's part (engine.model.packed_weights.pack_objects) at the end of the file."""
        offset = self.size
        write_at(self.fd, offset, part, tensors)
        self.size = offset + aligned(part.nbytes)
        return StoredLayer(layer, offset, part)

    def reader(self) -> tuple[int, bool]:
        """The file flushed, its pages dropped from the cache, and opened again for direct reads."""
        os.ftruncate(self.fd, self.size)  # every part's padding in the file, so each read is whole
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        fd, direct = open_for_reading(f"/proc/self/fd/{self.fd}") if Path("/proc/self/fd").is_dir() else (
            os.dup(self.fd), False)
        os.close(self.fd)
        return fd, direct


def _slot(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """A page-aligned buffer (anonymous memory map), as direct reads need, and a uint8 tensor over it."""
    region = mmap.mmap(-1, nbytes)
    return region, torch.frombuffer(region, dtype=torch.uint8)


class StreamedLayers:
    """What every tier's stream shares: a pass takes the streamed layers in order, acquire() then release() each."""

    layers: list
    _held: bool

    def acquire(self):
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def finish_pass(self, consumed: int) -> None:
        """After a forward that stopped early (an error), take and hand back the layers it did not reach, so the next
        pass starts at the first streamed layer again."""
        if self._held:
            self.release()
        for _ in range(consumed, len(self.layers)):
            self.acquire()
            self.release()


class LayerStream(StreamedLayers):
    """The streamed layers of one stage, in compute order: acquire() gives the next one's products (waiting for its
    read if it is not in yet), release() hands its slot back to the reader."""

    def __init__(self, fd: int, direct: bool, layers: list[StoredLayer], tier: str = "disk", slots: int = SLOTS,
                 shared: dict | None = None) -> None:
        if not layers:
            raise ValueError("a layer stream needs at least one layer")
        self.fd, self.direct, self.layers, self.tier = fd, direct, layers, tier
        if not direct:
            log.warning("the offload file system refuses direct I/O: streamed layers are read through the page "
                        "cache and dropped from it after each read")
        self.slots = max(1, min(slots, len(layers)))
        self.slot_bytes = max(s.part.nbytes for s in layers)
        self._buffers = [_slot(self.slot_bytes) for _ in range(self.slots)]
        # Each layer's objects once per slot it may be read into: views, built once, so a step unpickles nothing.
        self._objects = [[unpack_objects(s.part, buf[: s.part.nbytes], shared) for _, buf in self._buffers]
                         for s in layers]
        self._free = [threading.Semaphore(1) for _ in range(self.slots)]
        self._ready = [threading.Semaphore(0) for _ in range(self.slots)]
        self._fetched_ns = [0] * self.slots  # when each slot's current read ended
        self._started_ns = [0] * self.slots
        self._taken = 0  # fetches the compute side has acquired
        self._held = False
        self._closed = False
        self.fetches: collections.deque[Fetch] = collections.deque(maxlen=MAX_RECORDS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read_loop, name="layer-stream", daemon=True)
        self._thread.start()

    @property
    def memory_bytes(self) -> int:
        return self.slots * self.slot_bytes

    def _read_loop(self) -> None:
        g = 0
        try:
            while True:
                s = g % self.slots
                self._free[s].acquire()
                if self._closed:
                    return
                stored = self.layers[g % len(self.layers)]
                self._started_ns[s] = time.time_ns()
                self._read(stored, self._buffers[s][0])
                self._fetched_ns[s] = time.time_ns()
                self._ready[s].release()
                g += 1
        except BaseException as e:  # reaches the compute thread at its next acquire
            self._error = e
            for ready in self._ready:
                ready.release()

    def _read(self, stored: StoredLayer, region: mmap.mmap) -> None:
        view = memoryview(region)
        n, done = stored.part.nbytes, 0
        while done < n:
            got = os.preadv(self.fd, [view[done:n]], stored.offset + done)
            if got <= 0:
                raise OSError(f"the offload file ended {n - done} bytes into layer {stored.layer}'s read")
            done += got
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, stored.offset, n, os.POSIX_FADV_DONTNEED)

    def acquire(self):
        """The next streamed layer's products, once read."""
        if self._held:
            raise RuntimeError("acquire() twice without release()")
        s = self._taken % self.slots
        asked = time.time_ns()
        self._ready[s].acquire()
        if self._error is not None:
            raise RuntimeError(f"reading streamed layers failed: {self._error}") from self._error
        stored = self.layers[self._taken % len(self.layers)]
        self.fetches.append(Fetch(stored.layer, self.tier, stored.part.nbytes, self._started_ns[s],
                                  self._fetched_ns[s], self._fetched_ns[s] <= asked))
        self._held = True
        return self._objects[self._taken % len(self.layers)][s]

    def release(self) -> None:
        s = self._taken % self.slots
        self._held = False
        self._taken += 1
        self._free[s].release()

    def drain_fetches(self, read: bool = True) -> list[Fetch]:
        """The fetches since the last call (read False: only forgotten)."""
        out = list(self.fetches) if read else []
        self.fetches.clear()
        return out

    def close(self) -> None:
        self._closed = True
        for free in self._free:
            free.release()
        self._thread.join(5)
        os.close(self.fd)


def measure_read_bandwidth(folder: str | Path, nbytes: int = 256 << 20, read_bytes: int = 64 << 20) -> float:
    """Bytes/s of reading a file in `folder` as a stream reads one: its pages dropped from the cache first, then read
    in large direct reads, one after the other on one thread. The best of two passes."""
    spill = SpillFile(folder)
    chunk = torch.full((read_bytes,), 7, dtype=torch.uint8)
    view = memoryview(chunk.numpy())
    for offset in range(0, nbytes, read_bytes):
        os.pwrite(spill.fd, view, offset)
    spill.size = nbytes
    fd, direct = spill.reader()
    region = mmap.mmap(-1, read_bytes)
    target = memoryview(region)
    best = float("inf")
    try:
        for _ in range(2):
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            for offset in range(0, nbytes, read_bytes):
                if os.preadv(fd, [target], offset) <= 0:
                    raise OSError(f"{folder}: the probe file ended early")
            best = min(best, time.perf_counter() - start)
    finally:
        os.close(fd)
        target.release()
        region.close()
    return nbytes / best
