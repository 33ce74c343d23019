"""A part of a model (a layer's products, a whole stage) as bytes: its tensors laid out one after another, already in
the layout the kernels read, and a small pickle of the objects around them. Read back, the objects hold views of
whatever buffer the bytes were put in: a memory map of a package's shard (engine.model.package), or a slot a streamed
layer was read into (engine.model.layer_stream). Nothing is repacked on the way back.

The pickle names only the engine's own classes (a file that names any other is refused): a shard is data the engine
wrote, not code to run.
"""
from __future__ import annotations

import inspect
import io
import os
import pickle
from dataclasses import dataclass

import torch

ALIGN = 4096  # each part starts on a page: what direct reads (O_DIRECT) need, and the kernels' vector loads like
TENSOR_ALIGN = 64  # each tensor within a part starts on a cache line

# Globals a pickle may name beyond the engine's own modules.
_ALLOWED_TORCH = {"bfloat16", "float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
                  "device"}
_ALLOWED_BUILTINS = {"range", "frozenset", "set", "slice", "complex"}


@dataclass(slots=True, frozen=True)
class TensorEntry:
    offset: int  # bytes from the part's start
    dtype: str  # torch's name, "bfloat16"
    shape: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class PackedPart:
    """What reading a part back needs beside its bytes."""

    objects: bytes  # the pickle; tensors in it are references into `tensors`
    tensors: tuple[TensorEntry, ...]
    nbytes: int  # the bytes' length, padded to ALIGN


def aligned(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class _Pickler(pickle.Pickler):
    def __init__(self, file, shared: dict[int, object], any_device: bool = False) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self.index: dict[int, int] = {}
        self.shared = shared  # id -> name: live objects a part refers to but does not own (a stage's scratch)
        self.any_device = any_device

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            if (obj.device.type != "cpu" and not self.any_device) or obj.layout != torch.strided or obj.is_quantized:
                raise ValueError(f"cannot pack a {obj.device.type} {obj.layout} tensor; only host-memory strided "
                                 "tensors are stored")
            key = id(obj)
            if key not in self.index:
                self.index[key] = len(self.tensors)
                self.tensors.append(obj)
            return ("tensor", self.index[key])
        name = self.shared.get(id(obj))
        return ("shared", name) if name is not None else None


def pack_objects(obj, shared: dict[str, object] | None = None,
                 any_device: bool = False) -> tuple[PackedPart, list[torch.Tensor]]:
    """obj's pickle and the tensors it holds (each once, however often it is referred to), with where each goes.
    shared: objects obj refers to that stay live and are not stored (given back to unpack_objects by name).
    any_device: the tensors may be on a GPU (the caller copies them out; the part itself records no device)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf, {id(v): k for k, v in (shared or {}).items()}, any_device)
    pickler.dump(obj)
    entries, offset = [], 0
    for t in pickler.tensors:
        offset = aligned(offset, TENSOR_ALIGN)
        entries.append(TensorEntry(offset, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
        offset += t.numel() * t.element_size()
    return PackedPart(buf.getvalue(), tuple(entries), aligned(offset)), pickler.tensors


def write_at(fd: int, offset: int, part: PackedPart, tensors: list[torch.Tensor]) -> None:
    """The part's tensors into an open file from `offset`, a tensor at a time (never a copy of the whole part); the
    gaps between them are left for the file system to read back as zeros."""
    for entry, t in zip(part.tensors, tensors):
        data = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + entry.offset + written)


def write_part(path, part: PackedPart, tensors: list[torch.Tensor]) -> None:
    """The part's bytes as a file of their own, part.nbytes long."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_at(fd, 0, part, tensors)
        os.ftruncate(fd, part.nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, views: list[torch.Tensor], shared: dict[str, object]) -> None:
        super().__init__(file)
        self.views, self.shared = views, shared

    def persistent_load(self, pid):
        kind, key = pid
        if kind == "tensor":
            return self.views[key]
        if kind == "shared" and key in self.shared:
            return self.shared[key]
        raise pickle.UnpicklingError(f"a packed part refers to {kind} {key!r}, which this stage does not have")

    def find_class(self, module: str, name: str):
        if (module == "torch" and name in _ALLOWED_TORCH) or (module == "builtins" and name in _ALLOWED_BUILTINS):
            return super().find_class(module, name)
        if module.split(".")[0] == "engine":
            found = super().find_class(module, name)
            # A class or function the engine defines, not a module or function another module imported there.
            if (isinstance(found, type) or inspect.isfunction(found)) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"a packed part names {module}.{name}, which is not one of the engine's types")


def restricted_load(data: bytes):
    """A pickle of the engine's own types and plain values, holding no tensors (a package's index)."""
    return _Unpickler(io.BytesIO(data), [], {}).load()


def unpack_objects(part: PackedPart, buffer: torch.Tensor, shared: dict[str, object] | None = None):
    """The objects pack_objects stored, their tensors views of `buffer` (uint8, the part's bytes), which they keep
    alive."""
    views = []
    for entry in part.tensors:
        dtype = getattr(torch, entry.dtype)
        count = 1
        for n in entry.shape:
            count *= n
        size = count * dtype.itemsize
        views.append(buffer[entry.offset : entry.offset + size].view(dtype).view(entry.shape))
    return _Unpickler(io.BytesIO(part.objects), views, shared or {}).load()

