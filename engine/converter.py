"""`strata convert`: a checkpoint turned into a package for the devices it will run on (engine.model.package), each
stage's weights at their formats, packed as its kernels read them, with the layers it streams in a shard of their own.
The plan is the one `strata plan` prints and `strata serve` would run with the same options (plan_here)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from engine.model.hub import resolve_model
from engine.kernels import quant_gemm
from engine.model import package as pkg
from engine.model.checkpoint import validate
from engine.model.layer_stream import SpillFile
from engine.model.linear import product_path
from engine.model.packed_weights import pack_objects, write_part
from engine.model.stage_model import StageModel
from engine.model.weight_formats import FORMATS
from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes
from engine.placement.planning import PlanHere, plan_here


def convert(source: str | Path, out: str | Path, devices: str = "cpu", *, dtype: str = "auto",
            threads: int | None = None, max_num_seqs: int = 256, max_model_len: int | None = None,
            quantization: str = "auto", layer_quantization: str | None = None, kv_cache_memory: int | None = None,
            memory_fraction: float = 0.9, precision: str | None = None, max_layer_error: float | None = None,
            cluster: str | Path | None = None, cpu_offload_gb: float = 0.0, say=print) -> PlanHere:
    """Write the package to `out` (a new folder); the plan it was made for, on --devices or on the devices a
    `cluster` file describes (GPU stages are packed here, on the CPU, as a GPU builds them). Layers a CPU stage's
    budget cannot hold go to its disk shard in `out`, whose read bandwidth the plan is priced by; those a GPU stage
    keeps in host memory (cpu_offload_gb) wait there too, and are read into host memory when it loads."""
    source, out = resolve_model(source), Path(out)
    if pkg.is_package(source):
        raise ValueError(f"{source} is a package already; convert its source checkpoint")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; convert into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        here = plan_here(source, devices, dtype=dtype, threads=threads, memory_fraction=memory_fraction,
                         max_num_seqs=max_num_seqs, max_model_len=max_model_len, quantization=quantization,
                         layer_quantization=layer_quantization, kv_cache_memory=kv_cache_memory, offload_dir=str(out),
                         precision=precision, max_layer_error=max_layer_error, cluster=cluster,
                         cpu_offload_gb=cpu_offload_gb, say=say)
        _convert(source, out, here, dtype, say)
        return here
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _convert(source: Path, out: Path, here: PlanHere, dtype: str, say) -> None:
    cfg = here.model_config
    tensors = validate(source, cfg)
    formats = here.formats
    files = pkg.copy_checkpoint_files(source, out)
    quantized = any(FORMATS[f].quantized for f in formats.values())
    stages, P = [], len(here.plan.stages)
    cpu = torch.device("cpu")
    for k, st in enumerate(here.plan.stages):
        device = torch.device(st.device.name)
        compute, weights = resolve_dtypes(dtype, cfg.checkpoint_dtype, device)
        if device.type != "cpu" and product_path(device, TORCH_DTYPES[weights], TORCH_DTYPES[compute]) != "plain":
            raise ValueError(f"stage {k} on {device} computes at {compute} over {weights} weights; a GPU stage is "
                             "packed with one dtype for both (--dtype)")
        if st.host_experts:
            raise ValueError(f"stage {k} on {device} would keep the experts of layers "
                             f"{','.join(map(str, st.host_experts))} in host memory, run by the host's CPU, which a "
                             "package does not hold; serve the checkpoint itself, or give the GPU more memory")
        index, shard, disk = pkg.stage_files(k)
        spill = SpillFile(out, disk) if st.streamed_layers else None
        say(f"stage {k} ({device}): layers {st.layers[0]}-{st.layers[1] - 1}"
            + (f", {len(st.streamed_layers)} of them to {disk}" if st.streamed_layers else ""))
        # A GPU stage is built here, on the CPU, as the GPU builds it (plain products at its dtype, quantized weights
        # in the engine's layout) and loaded there with one copy of its shard (StageModel.from_package); the layers
        # it keeps in host memory wait in its disk shard.
        model = StageModel(cfg, tensors, range(*st.layers), k == 0, k == P - 1, TORCH_DTYPES[compute], cpu, 1,
                           TORCH_DTYPES[weights], wide_copy=False, formats=formats, streamed=st.streamed_layers,
                           offload=spill, tier="disk")
        stored = []
        if model.stream is not None:
            stored = model.stream.layers
            model.stream.close()
        part, held = pack_objects(model)
        write_part(out / shard, part, held)
        del model, held
        pkg.write_index(out / index, part, stored)
        names = [index, shard] + ([disk] if stored else [])
        stages.append(pkg.PackageStage(
            str(device), compute, weights, product_path(device, TORCH_DTYPES[weights], TORCH_DTYPES[compute]),
            quantized and device.type == "cpu" and quant_gemm.available(device), st.layers, st.streamed_layers,
            tuple(pkg.packed_file(out / n) for n in names)))
    pkg.write_manifest(out, str(source), formats, stages, files)
