"""Strata packages: a model converted once for the devices it will run on (`strata convert`), so that a stage starts
by mapping its shard rather than reading, fusing, quantizing and packing its weights.

A package is a folder that reads as a checkpoint (config.json and the tokenizer's files, with the chat template) plus:
- strata-package.json, the manifest: the plan it was made for (per stage its device, the dtypes and the product path
  its shard was packed for, its layers and those it streams from disk), the weight formats, and each file's size and
  checksum;
- per stage, stage-K.bin: the stage's objects (engine.model.stage_model.StageModel) as engine.model.packed_weights
  lays them out, memory-mapped at load; stage-K-disk.bin: the products of the layers it streams, read back every step
  (engine.model.layer_stream); stage-K.index: where each part lies in those files.

Every file's checksum is checked at every start (XXH3-128: damage, not tampering, is what it catches; the pickles a
package holds name only the engine's own types, engine.model.packed_weights).

A package is refused, with the reason, where a file's checksum differs from the manifest's, or where the devices
asked for are not the ones it was packed for (their kind, or the kernels their products need).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from engine.errors import CheckpointError
from engine.placement import parse_devices

MANIFEST = "strata-package.json"
FORMAT_VERSION = 3
DISK_SHARD = "-disk.bin"  # the suffix of a stage's disk shard: stage-K-disk.bin


def stage_files(k: int) -> tuple[str, str, str]:
    """Stage k's index, memory shard and disk shard (the last only where it streams layers)."""
    return f"stage-{k}.index", f"stage-{k}.bin", f"stage-{k}{DISK_SHARD}"
# Read from the source next to the weights: what a checkpoint folder holds besides its tensors.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja")


@dataclass(slots=True, frozen=True)
class PackedFile:
    name: str
    size: int
    xxh3_128: str  # checked at every start, so a fast hash (~8 GB/s on one core) rather than a cryptographic one


@dataclass(slots=True, frozen=True)
class PackageStage:
    device: str  # "cpu"
    dtype: str  # activations
    weight_dtype: str
    products: str  # the product path its shard was packed for (engine.model.linear.product_path)
    quant_kernel: bool  # quantized products packed for engine.kernels.quant_gemm
    layers: tuple[int, int]
    streamed_layers: tuple[int, ...]
    files: tuple[PackedFile, ...]  # stage_files: index, memory shard, and disk shard where it streams


@dataclass(slots=True, frozen=True)
class Package:
    path: Path
    source: str
    formats: dict[str, str]
    stages: tuple[PackageStage, ...]
    files: tuple[PackedFile, ...]  # the checkpoint files beside the shards


def is_package(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_package(path: str | Path) -> Package:
    path = Path(path)
    manifest = path / MANIFEST
    try:
        raw = json.loads(manifest.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{manifest}: package format {raw.get('format_version')!r}; this release reads "
                                  f"{FORMAT_VERSION}: convert the model again")
        stages = tuple(PackageStage(
            s["device"], s["dtype"], s["weight_dtype"], s["products"], s["quant_kernel"], tuple(s["layers"]),
            tuple(s["streamed_layers"]), tuple(PackedFile(**f) for f in s["files"])) for s in raw["stages"])
        return Package(path, raw["source"], dict(raw["formats"]), stages,
                       tuple(PackedFile(**f) for f in raw["files"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: not a Strata package manifest ({e})") from None


def file_digest(path: Path, keep_cached: bool = True) -> str:
    """The file's XXH3-128, read in large blocks. keep_cached False: its pages are dropped from the cache after (a
    disk shard, read back each step with direct I/O, must not sit in memory because it was checked); a shard about
    to be mapped keeps them, so the mapping finds them there."""
    digest = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        block = bytearray(16 << 20)
        view = memoryview(block)
        while n := f.readinto(block):
            digest.update(view[:n])
        if not keep_cached and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return digest.hexdigest()


def verify(package: Package, files: tuple[PackedFile, ...]) -> None:
    """Each file's size and checksum against the manifest; CheckpointError naming the first that differs."""
    for f in files:
        path = package.path / f.name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the package")
        size = path.stat().st_size
        if size != f.size:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {f.size}: the package is damaged")
        if file_digest(path, keep_cached=not f.name.endswith(DISK_SHARD)) != f.xxh3_128:
            raise CheckpointError(f"{path}: its checksum differs from the manifest's: the package is damaged")


def check_request(package: Package, devices: str, quantization: str, layer_quantization: str | None,
                  layers, precision: str | None = None, max_layer_error: float | None = None) -> None:
    """What `strata serve` and `strata plan` are asked for, against what the package fixed when it was converted:
    its devices (in order; budgets may differ), its formats and its split."""
    check_devices(package, devices)
    if quantization != "auto" or layer_quantization or layers or precision or max_layer_error is not None:
        raise ValueError(f"{package.path} is a package: its layers and formats were chosen when it was converted "
                         "(--quantization, --layer-quantization, --precision, --max-layer-error and --layers do not "
                         "apply)")


def check_devices(package: Package, devices: str) -> None:
    packed = [s.device for s in package.stages]
    asked = [r.name for r in parse_devices(devices)]
    if asked != packed:
        raise CheckpointError(f"{package.path}: packed for --devices {','.join(packed)}, asked for "
                              f"{','.join(asked)}: serve it on the devices it was converted for, or convert again")


def check_stage_here(package: Package, index: int, products: str, quant_kernel: bool) -> PackageStage:
    """Stage `index` of the package, if this process's device runs the products its shard holds."""
    stage = package.stages[index]
    if stage.products != products:
        raise CheckpointError(f"{package.path}: stage {index} was packed for {stage.products} products on "
                              f"{stage.device}, and this {stage.device} runs {products}: convert the model on this "
                              f"machine")
    if stage.quant_kernel and not quant_kernel:
        raise CheckpointError(f"{package.path}: stage {index} holds quantized products packed for the engine's "
                              f"CPU kernel, which this {stage.device} cannot run: convert the model on this machine")
    return stage


# ---- writing ----------------------------------------------------------------------------------------------------

def write_index(path: Path, model_part, streamed: list) -> None:
    """The stage's parts: the model's (engine.model.packed_weights.PackedPart) and each streamed layer's
    (engine.model.layer_stream.StoredLayer)."""
    path.write_bytes(pickle.dumps({"model": model_part, "streamed": streamed}, protocol=pickle.HIGHEST_PROTOCOL))


def read_index(path: Path) -> dict:
    from engine.model.packed_weights import restricted_load

    return restricted_load(path.read_bytes())


def packed_file(path: Path) -> PackedFile:
    return PackedFile(path.name, path.stat().st_size, file_digest(path, keep_cached=False))


def copy_checkpoint_files(source: Path, out: Path) -> list[PackedFile]:
    """config.json and the tokenizer's files, as the source has them (a GGUF file's metadata written out as them)."""
    from engine.model.gguf_checkpoint import config_dict, gguf_file, metadata

    written = []
    gguf = gguf_file(source)
    if gguf is not None:
        from tokenization.gguf_tokenizer import end_of_generation_ids, gguf_tokenizer_parts

        meta = metadata(gguf)
        backend, config, template = gguf_tokenizer_parts(dict(meta), str(gguf))
        (out / "config.json").write_text(json.dumps(config_dict(gguf), indent=1))
        backend.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}, indent=1))
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(end_of_generation_ids(meta))}))
        names = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    else:
        names = [n for n in CHECKPOINT_FILES if (source / n).is_file()]
        for n in names:
            shutil.copyfile(source / n, out / n)
    for n in names:
        written.append(packed_file(out / n))
    return written


def write_manifest(out: Path, source: str, formats: dict[str, str], stages: list[PackageStage],
                   files: list[PackedFile]) -> None:
    raw = {"format_version": FORMAT_VERSION, "source": source, "formats": formats,
           "stages": [{**asdict(s), "files": [asdict(f) for f in s.files]} for s in stages],
           "files": [asdict(f) for f in files]}
    (out / MANIFEST).write_text(json.dumps(raw, indent=1))
