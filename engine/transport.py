"""Point-to-point messages between the driver and the stages over torch.distributed.

The rendezvous and the start-up handshake use the default process group (gloo, with the
rendezvous timeout). Steady-state traffic runs over one group per link of the ring
(driver → stage 0 → … → last stage → driver), so that a stage receives from its left
neighbour in one thread while it sends to its right neighbour from another, and a link
whose two ends are CUDA devices carries its activations over NCCL.

Objects (batches, step outputs, control messages) travel pickled in a frame of fixed size
that starts with their length; one that does not fit sends the rest in a second message.
A steady-state decode batch fits, so a hop costs one message: each message wakes threads in
both processes, which on a busy host costs more than its bytes. Activations travel as
tensors whose shape the receiver knows from the batch.
"""
from __future__ import annotations

import datetime
import pickle
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Bytes of an object's first message: its length (8 bytes), then the pickle, zero-padded. Batches of 64 decodes
# or of a 512-token prefill pickle to under 5 KiB; copying the padding costs microseconds.
FRAME_BYTES = 32 << 10
_LENGTH = struct.Struct("<q")
# An idle server sends nothing for hours; the ring's links must not time out on that.
_IDLE_TIMEOUT = datetime.timedelta(days=365)


def serve_rendezvous(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The driver's side: host the store the stages rendezvous at (returns at once)."""
    return dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def announce(store: dist.TCPStore, rank: int) -> None:
    store.set(f"strata/alive/{rank}", "1")


def joined(store: dist.TCPStore, ranks: range) -> bool:
    return store.check([f"strata/alive/{r}" for r in ranks])


def join_rendezvous(master_addr: str, master_port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A stage's side: reach the driver's store within timeout_s or raise."""
    return dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def init(rank: int, world_size: int, store: dist.TCPStore, timeout_s: float) -> None:
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


@dataclass(slots=True)
class Link:
    """One hop of the ring, src → dst: a gloo group for objects, and for tensors NCCL where both ends are CUDA."""

    src: int
    dst: int
    objects: object  # process group
    tensors: object
    nccl: bool


def make_links(ring: list[int], cuda_ranks: set[int]) -> list[Link]:
    """Every process calls this with the same ring (ranks in stage order, the driver first), in the same order:
    creating a group is collective over the whole world. Link i carries ring[i] → ring[i + 1] (wrapping)."""
    links = []
    for i, src in enumerate(ring):
        dst = ring[(i + 1) % len(ring)]
        objects = dist.new_group([src, dst], timeout=_IDLE_TIMEOUT, backend="gloo")
        nccl = src in cuda_ranks and dst in cuda_ranks
        tensors = dist.new_group([src, dst], timeout=_IDLE_TIMEOUT, backend="nccl") if nccl else objects
        links.append(Link(src, dst, objects, tensors, nccl))
    return links


def _pack(obj: object) -> list[torch.Tensor]:
    """The messages that carry obj: the frame, and the rest of the pickle if it did not fit."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    frame = bytearray(FRAME_BYTES)
    _LENGTH.pack_into(frame, 0, len(payload))
    head = min(len(payload), FRAME_BYTES - _LENGTH.size)
    frame[_LENGTH.size : _LENGTH.size + head] = payload[:head]
    messages = [torch.frombuffer(frame, dtype=torch.uint8)]
    if head < len(payload):
        messages.append(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8))
    return messages


def send_obj(obj: object, dst: int, group=None) -> None:
    for message in _pack(obj):
        dist.send(message, dst, group=group)


def isend_obj(obj: object, dst: int, group=None) -> tuple[list, list[torch.Tensor]]:
    """Post the send and return at once; keep the returned buffers alive until the works complete.

    A gloo send waits for the peer to post its receive, so a process that blocked on its
    sends would stall whenever its right neighbour is busy computing.
    """
    messages = _pack(obj)
    return [dist.isend(m, dst, group=group) for m in messages], messages


def recv_obj(src: int, group=None) -> object:
    return recv_obj_sized(src, group)[0]


def recv_obj_sized(src: int, group=None) -> tuple[object, int]:
    """The object and the bytes it took on the wire."""
    frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    dist.recv(frame, src, group=group)
    raw = frame.numpy()
    (length,) = _LENGTH.unpack_from(raw, 0)
    head = min(length, FRAME_BYTES - _LENGTH.size)
    payload = raw[_LENGTH.size : _LENGTH.size + head].tobytes()
    if head == length:
        return pickle.loads(payload), FRAME_BYTES
    rest = torch.empty(length - head, dtype=torch.uint8)
    dist.recv(rest, src, group=group)
    return pickle.loads(payload + rest.numpy().tobytes()), FRAME_BYTES + rest.numel()


def isend_tensor(t: torch.Tensor, link: Link) -> tuple[list, list[torch.Tensor]]:
    """Activations to the next stage: on a gloo link they travel from host memory."""
    t = t.contiguous() if link.nccl else t.detach().to("cpu").contiguous()
    return [dist.isend(t, link.dst, group=link.tensors)], [t]


def recv_tensor(shape: tuple[int, ...], dtype: torch.dtype, link: Link, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device if link.nccl else "cpu")
    dist.recv(t, link.src, group=link.tensors)
    return t.to(device, non_blocking=True)


class Outbox:
    """Sends posted without waiting, each kept alive with its buffers until it completes. A send that failed
    raises at the next post, so a process learns that its peer is gone without waiting for the peer's side."""

    def __init__(self) -> None:
        self._pending: list[tuple[object, list[torch.Tensor]]] = []

    def post(self, works: list, buffers: list[torch.Tensor]) -> None:
        pending = []
        for w, b in self._pending:
            if w.is_completed():
                w.wait()  # returns at once; raises the send's error if it failed
            else:
                pending.append((w, b))
        pending.extend((w, buffers) for w in works)
        self._pending = pending


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
