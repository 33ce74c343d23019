"""Point-to-point messages between the driver and the stages over torch.distributed.

The rendezvous and the start-up handshake use the default process group (gloo, with the
rendezvous timeout). Steady-state traffic runs over one group per link of the ring
(driver → stage 0 → … → last stage → driver), so that a stage receives from its left
neighbour in one thread while it sends to its right neighbour from another, and a link
whose two ends are CUDA devices carries its activations over NCCL.

Objects (batches, step outputs, control messages) travel pickled in a frame of fixed size
that starts with their length; one that does not fit sends the rest in a second message.
Activations travel with their batch: inside the frame, after the pickle, where a link
between two CPU stages has room for a decode micro-batch's rows; else as a tensor message
of their own (over NCCL on a CUDA link), whose shape the receiver knows from the batch. A
steady-state decode hop thus costs one message: each message wakes threads in both
processes, and a second one behind the first waited up to milliseconds on a busy host.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import math
import pickle
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Bytes of an object's first message: its length (8 bytes), then the pickle, zero-padded. Batches of 64 decodes
# or of a 512-token prefill pickle to under 5 KiB; copying the padding costs microseconds.
FRAME_BYTES = 32 << 10
# Most room a link's frames get for activations besides: every message on the link pays for the frame.
MAX_INLINE_BYTES = 256 << 10
_LENGTH = struct.Struct("<q")
_ALIGN = 64  # activations inside a frame start at a multiple of this
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
    frame: int = FRAME_BYTES  # bytes of each message's first part


def make_links(ring: list[int], cuda_ranks: set[int], inline_bytes: int = 0) -> list[Link]:
    """Every process calls this with the same arguments: ring (ranks in stage order, the driver first),
    inline_bytes (room for a decode micro-batch's activations in the frames of gloo links between stages; none
    beyond MAX_INLINE_BYTES, where most steps would not fit and every message would carry the frame for nothing).
    Creating a group is collective over the whole world. Link i carries ring[i] → ring[i + 1] (wrapping)."""
    links = []
    for i, src in enumerate(ring):
        dst = ring[(i + 1) % len(ring)]
        objects = dist.new_group([src, dst], timeout=_IDLE_TIMEOUT, backend="gloo")
        nccl = src in cuda_ranks and dst in cuda_ranks
        tensors = dist.new_group([src, dst], timeout=_IDLE_TIMEOUT, backend="nccl") if nccl else objects
        between_stages = src != ring[0] and dst != ring[0]
        room = inline_bytes if between_stages and not nccl and inline_bytes <= MAX_INLINE_BYTES else 0
        links.append(Link(src, dst, objects, tensors, nccl, FRAME_BYTES + room))
    return links


# The frames of the link that carries sampled tokens (last stage → first): a few bytes per sequence.
TOKEN_FRAME_BYTES = 4 << 10


def make_token_link(ring: list[int]) -> Link | None:
    """The last stage → the first, for sampled tokens, where they are two stages (None else). Collective over the
    whole world like make_links, so every process calls it, right after."""
    if len(ring) < 3:
        return None
    group = dist.new_group([ring[-1], ring[1]], timeout=_IDLE_TIMEOUT, backend="gloo")
    return Link(ring[-1], ring[1], group, group, False, TOKEN_FRAME_BYTES)


def _inline_at(payload_len: int, nbytes: int, frame: int) -> int | None:
    """Where activations of nbytes sit in a frame after a pickle of payload_len bytes; None: they do not fit."""
    at = -(-(_LENGTH.size + payload_len) // _ALIGN) * _ALIGN
    return at if at + nbytes <= frame else None


def _pack(obj: object, frame_bytes: int = FRAME_BYTES,
          tensor: torch.Tensor | None = None) -> tuple[list[torch.Tensor], bool]:
    """The messages that carry obj: the frame, and the rest of the pickle if it did not fit; and whether the
    (contiguous, host) tensor rides inside the frame."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    raw = bytearray(frame_bytes)
    _LENGTH.pack_into(raw, 0, len(payload))
    head = min(len(payload), frame_bytes - _LENGTH.size)
    raw[_LENGTH.size : _LENGTH.size + head] = memoryview(payload)[:head]
    frame = torch.frombuffer(raw, dtype=torch.uint8)
    messages = [frame]
    if head < len(payload):
        messages.append(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8))
    at = None if tensor is None else _inline_at(len(payload), tensor.numel() * tensor.element_size(), frame_bytes)
    if at is not None:
        frame[at : at + tensor.numel() * tensor.element_size()] = tensor.view(-1).view(torch.uint8)
    return messages, at is not None


def _unpack(frame: torch.Tensor, src: int, group) -> tuple[object, int, int]:
    """The object whose frame arrived (receiving the rest of its pickle if any), its pickle's length, and the
    bytes it took on the wire."""
    raw = frame.numpy()
    (length,) = _LENGTH.unpack_from(raw, 0)
    head = min(length, frame.numel() - _LENGTH.size)
    payload = raw[_LENGTH.size : _LENGTH.size + head].tobytes()
    if head == length:
        return pickle.loads(payload), length, frame.numel()
    rest = torch.empty(length - head, dtype=torch.uint8)
    dist.recv(rest, src, group=group)
    return pickle.loads(payload + rest.numpy().tobytes()), length, frame.numel() + rest.numel()


# ---- control: the start-up handshake over the default group ----------------------------------------------------------
def send_obj(obj: object, dst: int, group=None) -> None:
    for message in _pack(obj)[0]:
        dist.send(message, dst, group=group)


def isend_obj(obj: object, dst: int, group=None) -> tuple[list, list[torch.Tensor]]:
    """Post the send and return at once; keep the returned buffers alive until the works complete."""
    messages = _pack(obj)[0]
    return [dist.isend(m, dst, group=group) for m in messages], messages


def recv_obj(src: int, group=None) -> object:
    frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    dist.recv(frame, src, group=group)
    return _unpack(frame, src, group)[0]


# ---- steady state: batches, their activations and results over the ring's links ------------------------------------
def isend(obj: object, link: Link, tensor: torch.Tensor | None = None) -> tuple[list, list[torch.Tensor]]:
    """Post obj (and the activations that go with it) and return at once; keep the returned buffers alive until the
    works complete (Outbox). A gloo send waits for the peer to post its receive, so a process that blocked on its
    sends would stall whenever its right neighbour is busy computing."""
    if tensor is not None:
        tensor = tensor.detach().contiguous() if link.nccl else _to_host(tensor)
    messages, inline = _pack(obj, link.frame, None if link.nccl else tensor)
    works = [dist.isend(m, link.dst, group=link.objects) for m in messages]
    if tensor is not None and not inline:
        works.append(dist.isend(tensor, link.dst, group=link.tensors))
        messages.append(tensor)
    return works, messages


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Activations for a gloo link, in host memory: from a GPU through a pinned buffer, at the link's full speed
    (a copy to pageable memory is staged through a driver buffer at a fraction of it). gloo reads the buffer when
    the send is posted, so the copy is waited for: the step's compute has to end first either way."""
    if not tensor.is_cuda:
        return tensor.detach().contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach(), non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def send(obj: object, link: Link) -> None:
    for work in isend(obj, link)[0]:
        work.wait()


def recv(link: Link, expect=None, device: torch.device | str = "cpu", timeout_s: float | None = None,
         stream=None) -> tuple[object, torch.Tensor | None, int]:
    """The next object on the link, the activations that came with it, and the bytes both took on the wire.
    expect(obj) gives the activations' (shape, dtype), or None when none follow; they land on `device`.
    With timeout_s, a frame that has not begun to arrive by then raises TimeoutError, and the link is closed.
    stream: on a GPU, the CUDA stream the activations arrive on (an NCCL receive, or the copy from a pinned host
    buffer), so that they need not wait behind the compute queued on the current one; the caller makes its compute
    wait for that stream before it reads them."""
    device = torch.device(device)
    pinned = device.type == "cuda"  # host buffers a GPU copies from are pinned, so the copy is asynchronous
    frame = torch.empty(link.frame, dtype=torch.uint8, pin_memory=pinned)
    if timeout_s is None:
        dist.recv(frame, link.src, group=link.objects)
    else:
        try:
            dist.irecv(frame, link.src, group=link.objects).wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as e:
            if "timed out" in str(e).lower():
                raise TimeoutError(f"nothing arrived from rank {link.src} within {timeout_s:.0f} s") from None
            raise
    obj, length, wire = _unpack(frame, link.src, link.objects)
    spec = expect(obj) if expect is not None else None
    if spec is None:
        return obj, None, wire
    shape, dtype = spec
    nbytes = math.prod(shape) * dtype.itemsize
    at = None if link.nccl else _inline_at(length, nbytes, link.frame)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if at is not None:
            tensor = frame[at : at + nbytes].view(dtype).view(shape)
        else:
            tensor = (torch.empty(shape, dtype=dtype, device=device) if link.nccl
                      else torch.empty(shape, dtype=dtype, pin_memory=pinned))
            dist.recv(tensor, link.src, group=link.tensors)
            wire += nbytes
        return obj, tensor.to(device, non_blocking=True), wire


# Sends an Outbox holds before it waits on the oldest. gloo reports a send complete only once it is waited on, so
# without a bound an Outbox would keep every message it ever sent. A gloo send is done once the peer has taken it,
# and every peer takes what its links bring from a thread of its own (the server takes each step's results in
# order, with only a few steps in flight), so the oldest of this many was taken long ago: waiting returns at once.
MAX_PENDING_SENDS = 32


class Outbox:
    """Sends posted without waiting, each kept alive with its buffers until it is known to be complete: at once
    where the backend says so (NCCL), else when it is the oldest of more than max_pending. A send that failed
    raises there."""

    def __init__(self, max_pending: int = MAX_PENDING_SENDS) -> None:
        self.max_pending = max_pending
        self._pending: collections.deque[tuple[object, list[torch.Tensor]]] = collections.deque()

    def __len__(self) -> int:
        return len(self._pending)

    def post(self, works: list, buffers: list[torch.Tensor]) -> None:
        self._pending.extend((w, buffers) for w in works)
        pending = self._pending
        while pending and (len(pending) > self.max_pending or pending[0][0].is_completed()):
            pending.popleft()[0].wait()  # returns at once; raises the send's error if it failed


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
