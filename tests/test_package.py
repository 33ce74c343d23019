"""`strata convert` packages: served, they answer as their source does; damaged or asked for other devices, they are
refused with the reason."""
from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from openai import AsyncOpenAI

from engine.model.package import MANIFEST, read_package
from http_calls import greedy_texts
from server_process import ServerProcess, running_server, strata_command
from tiny_models import write_checkpoint

MODEL = "tiny"
FLAGS = ("--served-model-name", MODEL, "--max-model-len", "256", "--threads-per-stage", "1")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("six"), "llama", layers=6)


def convert(source, out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*strata_command(), "convert", str(source), "--out", str(out), "--max-model-len", "256",
                           "--threads-per-stage", "1", *args], capture_output=True, text=True, timeout=300)


async def answers(url: str) -> list[str]:
    """Greedy completions, and a chat answer (the package's tokenizer and chat template at work)."""
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                    max_tokens=8, temperature=0.0)
    return [*await greedy_texts(url, MODEL), chat.choices[0].message.content]


@pytest.fixture(scope="module")
def source_answers(six_layers):
    with running_server(six_layers, *FLAGS) as s:
        return asyncio.run(answers(s.url))


@pytest.mark.parametrize("devices", ["cpu", "cpu=700KiB,cpu=1000KiB"])
def test_a_package_answers_as_its_source(six_layers, source_answers, tmp_path, devices):
    done = convert(six_layers, tmp_path / "pkg", "--devices", devices)
    assert done.returncode == 0, done.stderr
    package = read_package(tmp_path / "pkg")
    assert [s.device for s in package.stages] == [d.split("=")[0] for d in devices.split(",")]
    assert any(s.streamed_layers for s in package.stages) == ("=" in devices)
    with running_server(tmp_path / "pkg", *FLAGS, "--devices", devices) as s:
        assert asyncio.run(answers(s.url)) == source_answers
    # strata plan shows the package's own plan: its split and the layers it reads from disk.
    shown = subprocess.run([*strata_command(), "plan", "--model", str(tmp_path / "pkg"), "--devices", devices,
                            "--max-model-len", "256", "--threads-per-stage", "1", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    stages = json.loads(shown.stdout)["stages"]
    assert [(tuple(s["layers"]), tuple(s["streamed_layers"])) for s in stages] == [
        ((s.layers[0], s.layers[1] - 1), s.streamed_layers) for s in package.stages]


def refused(package, *args: str) -> str:
    server = ServerProcess(package, *FLAGS, *args)
    try:
        with pytest.raises(RuntimeError, match="exited with code") as failure:
            server.wait_ready(120)
    finally:
        server.stop()
    return str(failure.value)


def test_a_damaged_package_or_other_devices_are_refused_saying_which(six_layers, tmp_path):
    pkg = tmp_path / "pkg"
    assert convert(six_layers, pkg, "--devices", "cpu,cpu").returncode == 0
    assert "packed for --devices cpu,cpu, asked for cpu" in refused(pkg, "--devices", "cpu")
    shard = pkg / "stage-1.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "stage-1.bin: its checksum differs from the manifest's" in refused(pkg, "--devices", "cpu,cpu")
    manifest = json.loads((pkg / MANIFEST).read_text())
    manifest["stages"][0]["products"] = "half-kernel" if manifest["stages"][0]["products"] != "half-kernel" else "plain"
    (pkg / MANIFEST).write_text(json.dumps(manifest))
    assert "stage 0 was packed for" in refused(pkg, "--devices", "cpu,cpu")


def test_convert_refuses_a_folder_that_is_not_empty(six_layers, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    done = convert(six_layers, tmp_path / "pkg")
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (tmp_path / "pkg" / "keep.txt").read_text() == "mine"


CLUSTER = """
[[host]]
name = "a"
gpus = ["L4"]
cpu = {memory = "8GiB", bandwidth = "40GB/s"}
"""


def test_a_package_for_a_described_gpu_is_packed_here_as_the_gpu_builds_it(tmp_path):
    """`strata convert --cluster`: the GPU stage is packed on this CPU with the products a GPU stage builds (plain, at
    the checkpoint's dtype), and loaded from the package it computes what that stage computes; serving it here, with
    no GPU, says so."""
    import torch

    from engine import LLM
    from engine.model.attention import build_metadata
    from engine.model.checkpoint import validate
    from engine.model.config import ModelConfig
    from engine.model.linear import Linear
    from engine.model.package import read_index, stage_files
    from engine.model.stage_model import StageModel

    source = write_checkpoint(tmp_path / "bf16", "llama", layers=4, dtype="bfloat16")
    (tmp_path / "cluster.toml").write_text(CLUSTER)
    out = tmp_path / "pkg"
    done = convert(source, out, "--cluster", str(tmp_path / "cluster.toml"))
    assert done.returncode == 0, done.stderr
    packed = read_package(out)
    devices = [s.device for s in packed.stages]
    assert sorted(devices) == ["cpu", "cuda:0"], devices
    assert f"--devices {','.join(devices)}" in done.stdout
    k = devices.index("cuda:0")
    gpu = packed.stages[k]
    assert (gpu.products, gpu.dtype, gpu.weight_dtype, gpu.quant_kernel) == ("plain", "bfloat16", "bfloat16", False)
    index, shard, _ = stage_files(k)
    loaded = StageModel.from_package(out, read_index(out / index), shard, None, 64)
    assert isinstance(loaded.layers[0].products.qkv, Linear)
    cfg = ModelConfig.from_dir(source)
    built = StageModel(cfg, validate(source, cfg), range(*gpu.layers), k == 0, k == len(devices) - 1,
                       torch.bfloat16, torch.device("cpu"), 64, torch.bfloat16)
    x = torch.arange(3, 10) if k == 0 else torch.randn(7, cfg.hidden_size, dtype=torch.bfloat16)
    n = gpu.layers[1] - gpu.layers[0]

    def run(model):
        kv = torch.zeros(n, 2, 1, 16, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16)
        meta = build_metadata(16, list(range(7)), [], [], [(0, 7, 0, [0])], torch.device("cpu"))
        return model.forward(x, torch.arange(7), meta, kv)

    assert torch.equal(run(loaded), run(built))
    with pytest.raises(Exception, match="CUDA"):
        LLM(out, devices=",".join(devices), threads=1)
