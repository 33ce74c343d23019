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


def init(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    global _ring
    _ring = dist.new_group(list(range(world_size)), timeout=_IDLE_TIMEOUT, backend="gloo")


def send_obj(obj: object, dst: int) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=_SIZE_DTYPE), dst, group=_ring)
    dist.send(data, dst, group=_ring)


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
