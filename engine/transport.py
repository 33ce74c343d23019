"""Point-to-point messages between the driver and the stages over torch.distributed.

Objects (batches, step outputs, control messages) travel pickled as a length and a byte
tensor; activations travel as tensors whose shape the receiver knows from the batch.
"""
from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

_SIZE_DTYPE = torch.int64
# An idle server sends nothing for hours; the ring's own group must not time out on that.
_IDLE_TIMEOUT = datetime.timedelta(days=365)
_ring = None


def serve_rendezvous(master_addr: str, master_port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The driver's side: host the store the stages rendezvous at (returns at once)."""
    return dist.TCPStore(master_addr, master_port, world_size, is_master=True, wait_for_workers=False,
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
    global _ring
    _ring = dist.new_group(list(range(world_size)), timeout=_IDLE_TIMEOUT, backend="gloo")


def send_obj(obj: object, dst: int) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=_SIZE_DTYPE), dst, group=_ring)
    dist.send(data, dst, group=_ring)


def isend_obj(obj: object, dst: int) -> tuple[list, list[torch.Tensor]]:
    """Post the send and return at once; keep the returned buffers alive until the works complete.

    A blocking send waits for the peer to post its receive, so two processes sending to
    each other at the same moment would wait forever; the driver never blocks on a send.
    """
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=_SIZE_DTYPE)
    works = [dist.isend(size, dst, group=_ring), dist.isend(data, dst, group=_ring)]
    return works, [size, data]


def recv_obj(src: int) -> object:
    size = torch.empty(1, dtype=_SIZE_DTYPE)
    dist.recv(size, src, group=_ring)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src, group=_ring)
    return pickle.loads(data.numpy().tobytes())


def send_tensor(t: torch.Tensor, dst: int) -> None:
    dist.send(t.contiguous(), dst, group=_ring)


def recv_tensor(shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, src, group=_ring)
    return t


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
