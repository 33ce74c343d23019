"""Point-to-point messages between the driver and the stages over torch.distributed.

The rendezvous and the start-up handshake use the default process group (gloo, with the
rendezvous timeout). Steady-state traffic runs over one group per link of the ring
(driver → stage 0 → … → last stage → driver), so that a stage receives from its left
neighbour in one thread while it sends to its right neighbour from another, and a link
whose two ends are CUDA devices carries its activations over NCCL.

Objects (batches, step outputs, control messages) travel pickled as a length and a byte
tensor; activations travel as tensors whose shape the receiver knows from the batch.
"""
from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

_SIZE_DTYPE = torch.int64
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


def _pack(obj: object) -> tuple[torch.Tensor, torch.Tensor]:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return torch.tensor([data.numel()], dtype=_SIZE_DTYPE), data


def send_obj(obj: object, dst: int, group=None) -> None:
    size, data = _pack(obj)
    dist.send(size, dst, group=group)
    dist.send(data, dst, group=group)


def isend_obj(obj: object, dst: int, group=None) -> tuple[list, list[torch.Tensor]]:
    """Post the send and return at once; keep the returned buffers alive until the works complete.

    A gloo send waits for the peer to post its receive, so a process that blocked on its
    sends would stall whenever its right neighbour is busy computing.
    """
    size, data = _pack(obj)
    works = [dist.isend(size, dst, group=group), dist.isend(data, dst, group=group)]
    return works, [size, data]


def recv_obj(src: int, group=None) -> object:
    return recv_obj_sized(src, group)[0]


def recv_obj_sized(src: int, group=None) -> tuple[object, int]:
    """The object and the bytes it took on the wire."""
    size = torch.empty(1, dtype=_SIZE_DTYPE)
    dist.recv(size, src, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src, group=group)
    return pickle.loads(data.numpy().tobytes()), data.numel() + size.numel() * size.element_size()


def isend_tensor(t: torch.Tensor, link: Link) -> tuple[list, list[torch.Tensor]]:
    """Activations to the next stage: on a gloo link they travel from host memory."""
    t = t.contiguous() if link.nccl else t.detach().to("cpu").contiguous()
    return [dist.isend(t, link.dst, group=link.tensors)], [t]


def recv_tensor(shape: tuple[int, ...], dtype: torch.dtype, link: Link, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device if link.nccl else "cpu")
    dist.recv(t, link.src, group=link.tensors)
    return t.to(device, non_blocking=True)


class Outbox:
    """Sends posted without waiting, each kept alive with its buffers until it completes."""

    def __init__(self) -> None:
        self._pending: list[tuple[object, list[torch.Tensor]]] = []

    def post(self, works: list, buffers: list[torch.Tensor]) -> None:
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]
        self._pending.extend((w, buffers) for w in works)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
