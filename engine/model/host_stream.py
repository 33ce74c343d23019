"""A GPU stage's host tier: layers whose products live in pinned host memory and are copied to the device for every
step, on a copy stream of their own, ahead of the compute that needs them (--cpu-offload-gb).

The interface is the layer stream's (engine.model.layer_stream): acquire() gives the next streamed layer's products,
release() hands its slot back. On the device, a ring of SLOTS buffers; each layer's objects are built once per slot
over views of it. The g-th fetch since start goes to slot g mod SLOTS. A copy is queued on the copy stream as soon as
the slot's previous layer was released (its release recorded an event on the compute stream, which the copy stream
waits for), so the copies run SLOTS - 1 layers ahead of the compute, and the compute stream waits on each copy's
event only where it uses that layer: the host never blocks. Each copy's start and end are CUDA events, placed on the
host clock from an anchor event taken when the stream is made, and read for the fetch's span once they have
happened.

On a CPU (tests; a CPU stage's tier is the disk), the copies are plain and timed on the host.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch

from engine.model.layer_stream import MAX_RECORDS, SLOTS, Fetch, StreamedLayers
from engine.model.packed_weights import PackedPart, unpack_objects


@dataclass(slots=True, frozen=True)
class HostLayer:
    """A layer's products in host memory: its part (engine.model.packed_weights) and the bytes of its tensors."""

    layer: int
    part: PackedPart
    data: torch.Tensor  # uint8, part.nbytes long; page-locked on a machine with CUDA


def host_layer(layer: int, part: PackedPart, tensors: list[torch.Tensor]) -> HostLayer:
    """The tensors copied, at the part's offsets, into one host buffer, page-locked where CUDA is present."""
    data = torch.empty(part.nbytes, dtype=torch.uint8)
    for entry, t in zip(part.tensors, tensors):
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        data[entry.offset: entry.offset + flat.numel()].copy_(flat)
    if torch.cuda.is_available():
        pin(data)
    return HostLayer(layer, part, data)


def read_host_layer(path, stored) -> HostLayer:
    """A layer a package's disk shard holds (engine.model.layer_stream.StoredLayer), read into host memory."""
    data = torch.empty(stored.part.nbytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(stored.offset)
        if f.readinto(memoryview(data.numpy())) != stored.part.nbytes:
            raise OSError(f"{path}: ends inside layer {stored.layer}")
    if torch.cuda.is_available():
        pin(data)
    return HostLayer(stored.layer, stored.part, data)


def pin(data: torch.Tensor) -> None:
    """Page-lock a host tensor's memory where it is (cudaHostRegister), so copies from it run at the bus's rate.
    Not through torch's pinned allocator, which rounds every block up to a power of two: a 300 MiB layer would
    lock 512 MiB."""
    err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel() * data.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cannot page-lock {data.numel() * data.element_size()} bytes of host memory "
                           f"(cudaHostRegister returned {int(err)}); lower --cpu-offload-gb")


def unpin(data: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(data.data_ptr())


class HostStream(StreamedLayers):
    tier = "host"

    def __init__(self, layers: list[HostLayer], device: torch.device, slots: int = SLOTS,
                 shared: dict | None = None) -> None:
        if not layers:
            raise ValueError("a host stream needs at least one layer")
        self.layers, self.device = layers, device
        self.slots = max(1, min(slots, len(layers)))
        self.slot_bytes = max(h.part.nbytes for h in layers)
        self._buffers = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(self.slots)]
        self._objects = [[unpack_objects(h.part, buf[: h.part.nbytes], shared) for buf in self._buffers]
                         for h in layers]
        self.cuda = device.type == "cuda"
        self._copy = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:  # device time zero, on the host clock: every fetch's events are placed from it
            torch.cuda.synchronize(device)
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record(self._copy)
            self._anchor.synchronize()
            self._anchor_ns = time.time_ns()
        self._released: list = [None] * self.slots  # per slot: the event its last layer's release recorded
        self._timing: dict[int, tuple] = {}  # fetch -> (start, end) of its copy: events on a GPU, ns on a CPU
        self._issued = 0  # fetches queued
        self._taken = 0  # fetches the compute side has acquired
        self._held = False
        # (layer, bytes, start, end, asked) of fetches not yet drained; the oldest dropped beyond MAX_RECORDS.
        self._pending: collections.deque[tuple] = collections.deque(maxlen=MAX_RECORDS)

    @property
    def memory_bytes(self) -> int:
        """Device memory the slots hold."""
        return self.slots * self.slot_bytes

    def _queue(self, last: int) -> None:
        """Queue the copies of fetches up to `last` whose slots have been released."""
        while self._issued <= last:
            g = self._issued
            s = g % self.slots
            h = self.layers[g % len(self.layers)]
            target = self._buffers[s][: h.part.nbytes]
            if self.cuda:
                with torch.cuda.stream(self._copy):
                    if self._released[s] is not None:
                        self._copy.wait_event(self._released[s])
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(self._copy)
                    target.copy_(h.data, non_blocking=True)
                    end.record(self._copy)
                self._timing[g] = (start, end)
            else:
                start = time.time_ns()
                target.copy_(h.data)
                self._timing[g] = (start, time.time_ns())
            self._issued += 1

    def acquire(self):
        """The next streamed layer's products; on a GPU, the compute stream waits for their copy."""
        if self._held:
            raise RuntimeError("acquire() twice without release()")
        g = self._taken
        self._queue(g + self.slots - 1)  # every slot but this one's was released by the fetches before it
        start, end = self._timing.pop(g)
        h = self.layers[g % len(self.layers)]
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            asked = torch.cuda.Event(enable_timing=True)
            asked.record(compute)
            compute.wait_event(end)
        else:
            asked = time.time_ns()
        self._pending.append((h.layer, h.part.nbytes, start, end, asked))
        self._held = True
        return self._objects[g % len(self.layers)][g % self.slots]

    def release(self) -> None:
        s = self._taken % self.slots
        if self.cuda:
            self._released[s] = torch.cuda.current_stream(self.device).record_event()
        self._held = False
        self._taken += 1
        # The slot just released can take the fetch SLOTS ahead: queue it now, so the copy starts as soon as the
        # compute that read this slot is done.
        self._queue(self._taken + self.slots - 1)

    def drain_fetches(self, read: bool = True) -> list[Fetch]:
        """The fetches whose copies have finished (on a GPU, those still running stay for the next call: the host
        never waits here); read False: every fetch so far forgotten, for steps nothing traces."""
        out: list[Fetch] = []
        if not read:
            self._pending.clear()
            return out
        while self._pending:
            layer, nbytes, start, end, asked = self._pending[0]
            if self.cuda:
                if not (end.query() and asked.query()):
                    break
                start_ns, end_ns = self._host_ns(start), self._host_ns(end)
                overlapped = asked.elapsed_time(end) <= 0
            else:
                start_ns, end_ns, overlapped = start, end, end <= asked
            self._pending.popleft()
            out.append(Fetch(layer, self.tier, nbytes, start_ns, end_ns, overlapped))
        return out

    def _host_ns(self, event) -> int:
        """A finished event's time on the host clock, from the anchor taken when the stream was made."""
        return self._anchor_ns + int(self._anchor.elapsed_time(event) * 1e6)

    def close(self) -> None:
        if self.cuda:
            self._copy.synchronize()
            for h in self.layers:
                unpin(h.data)
