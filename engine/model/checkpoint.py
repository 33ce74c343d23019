"""Finds, checks and reads a checkpoint's weights: a Hugging Face checkpoint's safetensors files, or a GGUF file
(engine.model.gguf_checkpoint), both read through a tensor source under Hugging Face names.

Everything a checkpoint could get wrong is checked from the file headers alone, before
any process loads a byte of weights, so a bad checkpoint fails at start-up with one line
that names the file and the tensor.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from engine.errors import CheckpointError
from engine.model.config import ModelConfig
from engine.model.quantized import Codes, QuantizedWeight, pack, quantize
from engine.model.weight_formats import EMBEDDING, WeightFormat, by_ggml_type, product_names, tensor_formats

log = logging.getLogger("strata.checkpoint")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: missing, but {index.name} lists tensor {name!r} in it")
            files[name] = path
        return files
    single = model_dir / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not paths:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise CheckpointError(f"{model_dir}: only pickle weights (*.bin/*.pt) found; convert them to safetensors")
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
    files = {}
    for path in paths:
        for name in _open(path).keys():
            files[name] = path
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None


def expected_shapes(cfg: ModelConfig, layers: Iterable[int], first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """The tensors a stage holding `layers` needs, with their shapes."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if first or (last and cfg.tie_word_embeddings):
        shapes["model.embed_tokens.weight"] = (cfg.vocab_size, h)
    for i in layers:
        shapes.update((f"model.layers.{i}.{name}", shape) for name, shape in cfg.layer_shapes(i).items())
    if last:
        shapes["model.norm.weight"] = (h,)
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint's safetensors files, by name."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def where(self, name: str) -> str:
        return f"{self.files[name]}: tensor {name!r}"

    def stored_type(self, name: str) -> str:
        """The tensor's dtype as safetensors names it ("BF16", "F32"): the names GGUF's float types have too."""
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_slice(name).get_dtype()

    def read(self, name: str) -> torch.Tensor:
        # Opened per read: an open safetensors file is mapped, and every page read would stay resident until it
        # closes.
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def tensor_source(model_dir: Path, cfg: ModelConfig):
    """Where a checkpoint's tensors are read from: its GGUF file, or its safetensors files (Mixtral's under the names
    the engine reads, RenamedTensors); a checkpoint that stores projections fused is seen through SplitProjections."""
    from engine.model.gguf_checkpoint import GGUFSource, gguf_file

    path = gguf_file(model_dir)
    if path is not None:  # its experts are named as the engine names them
        source = GGUFSource(path, cfg.num_heads, cfg.num_kv_heads, cfg.num_experts)
    else:
        source = SafetensorsSource(weight_files(Path(model_dir)))
        if cfg.architecture == "MixtralForCausalLM":
            return RenamedTensors(source, mixtral_names(cfg))
    return SplitProjections(source, cfg) if cfg.fused_projections else source


def mixtral_names(cfg: ModelConfig) -> dict[str, str]:
    """Mixtral's names for its router and experts, under the names the engine reads (Qwen-MoE's)."""
    out = {}
    for i in range(cfg.num_layers):
        a, b = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        out[a + "gate.weight"] = b + "gate.weight"
        for e in range(cfg.num_experts):
            for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                out[f"{a}experts.{e}.{ours}.weight"] = f"{b}experts.{e}.{theirs}.weight"
    return out


class RenamedTensors:
    """A source whose checkpoint names some tensors otherwise than the engine does, seen under the engine's names."""

    def __init__(self, source, names: dict[str, str]) -> None:
        self.source, self.theirs = source, names  # ours -> theirs
        ours = {v: k for k, v in names.items()}
        self.ours = {ours.get(n, n) for n in source.names()}

    def names(self) -> set[str]:
        return self.ours

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.theirs.get(name, name))

    def where(self, name: str) -> str:
        return self.source.where(self.theirs.get(name, name))

    def stored_type(self, name: str) -> str:
        return self.source.stored_type(self.theirs.get(name, name))

    def read(self, name: str) -> torch.Tensor:
        return self.source.read(self.theirs.get(name, name))


class SplitProjections:
    """A source whose checkpoint stores each layer's q, k and v projections as one qkv_proj and its gate and up
    projections as one gate_up_proj (Phi-3), seen under the separate names the engine reads: each a slice of rows of
    the fused tensor. The engine fuses them again as it loads; quantizing at load sees each on its own."""

    def __init__(self, source, cfg: ModelConfig) -> None:
        self.source = source
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        self.parts: dict[str, tuple[str, int, int]] = {}  # name -> (fused name, first row, end row)
        for i in range(cfg.num_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            for name, (start, end) in (("q_proj", (0, q)), ("k_proj", (q, q + kv)), ("v_proj", (q + kv, q + 2 * kv))):
                self.parts[f"{a}{name}.weight"] = (f"{a}qkv_proj.weight", start, end)
            self.parts[f"{m}gate_proj.weight"] = (f"{m}gate_up_proj.weight", 0, inter)
            self.parts[f"{m}up_proj.weight"] = (f"{m}gate_up_proj.weight", inter, 2 * inter)

    def names(self) -> set[str]:
        names = self.source.names()
        return names | {n for n, (fused, _, _) in self.parts.items() if fused in names}

    def _split(self, name: str) -> tuple[str, int, int] | None:
        part = self.parts.get(name)
        return part if part is not None and part[0] in self.source.names() else None

    def shape(self, name: str) -> tuple[int, ...]:
        part = self._split(name)
        if part is None:
            return self.source.shape(name)
        fused, start, end = part
        rows, *rest = self.source.shape(fused)
        return (min(end, rows) - min(start, rows), *rest)

    def where(self, name: str) -> str:
        part = self._split(name)
        return self.source.where(name if part is None else part[0])

    def stored_type(self, name: str) -> str:
        part = self._split(name)
        return self.source.stored_type(name if part is None else part[0])

    def read(self, name: str) -> torch.Tensor:
        part = self._split(name)
        if part is None:
            return self.source.read(name)
        fused, start, end = part
        return self.source.read(fused)[start:end].clone()

    def read_codes(self, name: str):
        """A quantized matrix's codes (a GGUF source's), its rows of the fused matrix where it is one's part."""
        part = self._split(name)
        if part is None:
            return self.source.read_codes(name)
        fused, start, end = part
        return self.source.read_codes(fused).rows(np.arange(start, end))


def checkpoint_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer: its tokenizer.json, or its GGUF file's metadata; None where it has neither."""
    from engine.model.gguf_checkpoint import gguf_file, metadata
    from tokenization import Tokenizer

    path = gguf_file(model_dir)
    if path is not None:
        return Tokenizer.from_gguf(path, metadata(path))
    return Tokenizer.from_dir(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None


def stop_token_ids(cfg: ModelConfig, tokenizer) -> frozenset[int]:
    """The tokens generation stops at: the model config's end-of-sequence ids and the tokenizer's (its EOS, and a
    chat model's end-of-turn tokens)."""
    return frozenset(cfg.eos_token_ids | (tokenizer.eos_token_ids if tokenizer else frozenset()))


def validate(model_dir: Path, cfg: ModelConfig):
    """Check that every tensor the model needs is present with the right shape; the tensors' source."""
    source = tensor_source(model_dir, cfg)
    names = source.names()
    for name, shape in expected_shapes(cfg, range(cfg.num_layers), first=True, last=True).items():
        if name not in names:
            where = Path(model_dir)
            if where.is_dir():
                where = where / (INDEX_FILE if (where / INDEX_FILE).is_file() else SINGLE_FILE)
            raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape {list(shape)})")
        got = source.shape(name)
        if got != shape:
            raise CheckpointError(f"{source.where(name)} has shape {list(got)}, the model's config implies "
                                  f"{list(shape)}")
    return source


def resolve_formats(source, cfg: ModelConfig, quantization: str, per_layer: dict[int, str]) -> dict[str, str]:
    """The weights that run at another format than their stage's weight dtype (weight_formats.tensor_formats), from
    what the checkpoint stores (source None: a config alone, whose weights are taken to be floats). Tensors stored
    in a type no kernel runs are dequantized at load, said in one line."""
    products = product_names(cfg)
    names = source.names() if source is not None else set()
    stored = {n: source.stored_type(n) for n in [*products, EMBEDDING] if n in names}
    shapes = expected_shapes(cfg, range(cfg.num_layers), first=True, last=True)
    in_features = {n: shapes[n][1] for n in products}
    formats = tensor_formats(products, in_features, stored, quantization, per_layer, cfg.tie_word_embeddings)
    unrun = sorted({t for n, t in stored.items() if by_ggml_type(t) is None})
    if unrun:
        count = sum(1 for t in stored.values() if t in unrun)
        log.warning("%d tensors stored as %s have no kernel of their own: dequantized at load", count, ", ".join(unrun))
    return formats


# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which tensors that
# size come from the heap, and what a load frees there (parts read before fusing or packing) is kept, not returned:
# loading a stage ended 1.5x its weights resident. Trimming the heap as the load goes returns it. (Fixing the
# threshold instead would keep every step's large temporaries mmapped: a page fault per page, 3x slower on a CPU.)
@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system, where the C library is glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class TensorReader:
    """Reads a stage's tensors one at a time from its source (SafetensorsSource, GGUFSource), onto its device at the
    weight dtype, so that loading holds at most one tensor beyond the weights already placed. Fused matrices are
    written part by part into their final tensor, never concatenated from copies."""

    def __init__(self, source, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> None:
        self.source, self.shapes = source, shapes  # shapes: what the stage needs (expected_shapes), checked already
        self.dtype, self.device = dtype, device

    def __call__(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        raw = self.source.read(name)
        out = raw.to(self.device, dtype or self.dtype)
        # Already where and as it should be, it would still be a view of the file's private mapping: pages the
        # system may drop and read again, and a file rewritten in place would change the weights under it.
        out = out.clone() if out is raw else out
        del raw
        return_freed_memory()
        return out

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor where the stage needs it (an optional bias), else None."""
        return self(name) if name in self.shapes else None

    def fused(self, names: list[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensors stacked along their first dimension, read one at a time into the result."""
        rows = sum(self.shapes[n][0] for n in names)
        out = torch.empty((rows, *self.shapes[names[0]][1:]), dtype=dtype or self.dtype, device=self.device)
        start = 0
        for name in names:
            part = self.source.read(name)
            out[start : start + part.shape[0]].copy_(part)
            start += part.shape[0]
            del part
        return_freed_memory()
        return out

    def quantized(self, names: list[str], fmt: WeightFormat) -> QuantizedWeight:
        """The matrices stacked along their outputs in a quantized format, on the stage's device: their stored codes
        where the checkpoint holds them in it, else their float weights quantized here."""
        parts = []
        for name in names:
            if by_ggml_type(self.source.stored_type(name)) is fmt:
                parts.append(self.source.read_codes(name))
            else:
                weight = self.source.read(name)
                parts.append(quantize(weight, fmt))
                del weight
        packed = pack(parts[0] if len(parts) == 1 else Codes.stack(parts))
        del parts
        return_freed_memory()
        return packed.to(self.device) if self.device.type != "cpu" else packed
