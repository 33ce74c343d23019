"""How much faster a converted package starts than its source checkpoint: the default model (a GGUF file) and a
~1B-parameter bf16 Llama-shaped checkpoint, each loaded as one CPU stage from a cold page cache.

    python -m bench.package_startup

For each model it converts the source once (`strata convert`, timed), then times, in this process, with the files
dropped from the page cache and with them cached, the stage's load until its first forward has run (reading, dequantizing, fusing and packing the source's weights; or checking
the package's checksums, mapping its shard and touching its pages), and prints the source's time, the package's and
their ratio; then the same from the outside: `strata`'s offline engine from construction to its first token.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from batching import SamplingParams
from bench.checkpoints import llama_1b_shaped
from engine import LLM, convert, default_model
from engine.model import package
from engine.model.attention import build_metadata
from engine.model.checkpoint import resolve_formats, tensor_source
from engine.model.config import ModelConfig
from engine.model.stage_model import StageModel
from engine.model.weight_formats import check_requested
from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes


def drop_page_cache(path: Path) -> None:
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def first_forward(model: StageModel) -> None:
    cfg = model.cfg
    kv = torch.zeros(len(model.layers), 2, 1, 16, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype)
    meta = build_metadata(16, [0], [], [], [(0, 1, 0, [0])], torch.device("cpu"))
    model.logits(model.forward(torch.tensor([1]), torch.tensor([0]), meta, kv))


def stage_from_source(source: Path, cold: bool) -> float:
    if cold:
        drop_page_cache(source)
    start = time.perf_counter()
    cfg = ModelConfig.from_dir(source)
    compute, weights = resolve_dtypes("auto", cfg.checkpoint_dtype, torch.device("cpu"))
    tensors = tensor_source(source, cfg)
    formats = resolve_formats(tensors, cfg, check_requested("auto"), {})
    model = StageModel(cfg, tensors, range(cfg.num_layers), True, True, TORCH_DTYPES[compute], torch.device("cpu"),
                       2048, TORCH_DTYPES[weights], wide_copy=False, formats=formats)
    first_forward(model)
    return time.perf_counter() - start


def stage_from_package(path: Path, cold: bool) -> float:
    gc.collect()  # the last run's mapping gone, or its pages could not be dropped
    if cold:
        drop_page_cache(path)
    start = time.perf_counter()
    pkg = package.read_package(path)
    (stage,) = pkg.stages
    package.verify(pkg, pkg.files + stage.files)
    index, shard, _ = package.stage_files(0)
    model = StageModel.from_package(path, package.read_index(path / index), shard, None, 2048)
    first_forward(model)
    seconds = time.perf_counter() - start
    del model
    return seconds


def engine_start(model: Path) -> float:
    drop_page_cache(model)
    start = time.perf_counter()
    with LLM(str(model), max_model_len=256) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1, temperature=0.0))
        return time.perf_counter() - start


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="strata-packages-", dir="/var/tmp"))
    try:
        for name, source in (("SmolLM2-135M-Instruct (GGUF)", default_model()), ("1B Llama shape (bf16)", llama_1b_shaped())):
            out = work / name.split()[0]
            start = time.perf_counter()
            convert(source, out, "cpu", max_model_len=256, say=lambda line: None)
            print(f"{name}: converted in {time.perf_counter() - start:.1f} s "
                  f"({sum(p.stat().st_size for p in out.iterdir()) / 1e9:.2f} GB)")
            for cold, how in ((True, "cold page cache"), (False, "files in the page cache")):
                src = min(stage_from_source(Path(source), cold) for _ in range(2))
                pkg = min(stage_from_package(out, cold) for _ in range(2))
                print(f"  stage load to its first forward, {how}: source {src:.2f} s, package {pkg:.2f} s: "
                      f"{src / pkg:.1f}x")
            src_e, pkg_e = engine_start(Path(source)), engine_start(out)
            print(f"  engine start to its first token: source {src_e:.2f} s, package {pkg_e:.2f} s: "
                  f"{src_e / pkg_e:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
