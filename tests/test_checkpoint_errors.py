"""A checkpoint the engine cannot serve fails at start-up with one line naming the file and tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, CheckpointError


@pytest.fixture()
def broken(tmp_path, llama_dir):
    """A writable copy of the good checkpoint to break."""
    d = tmp_path / "ckpt"
    shutil.copytree(llama_dir, d)
    return d


def start_error(model_dir) -> str:
    with pytest.raises(CheckpointError) as e:
        LLM(model_dir)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path):
    assert "no such checkpoint directory" in start_error(tmp_path / "nope")


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    assert "no model.safetensors or model.safetensors.index.json" in start_error(broken)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    msg = start_error(broken)
    assert "config.json" in msg and "not found" in msg


def test_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = start_error(broken)
    assert "GPT2LMHeadModel" in msg and "not supported" in msg and "config.json" in msg


def test_missing_tensor(broken):
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    msg = start_error(broken)
    assert "model.safetensors" in msg and "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg


def test_wrong_shape(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    msg = start_error(broken)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[7, 64]" in msg and "[32, 64]" in msg


def test_shard_listed_in_index_is_missing(tmp_path):
    from tiny_models import write_checkpoint

    d = write_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    msg = start_error(d)
    assert shard.name in msg and "missing" in msg


def test_corrupt_safetensors_header(broken):
    (broken / "model.safetensors").write_bytes(b"\x00\x01garbage")
    msg = start_error(broken)
    assert "model.safetensors" in msg and "cannot read" in msg


@pytest.mark.parametrize("method, named", [("gptq", "GPTQ"), ("awq", "AWQ"), ("fp8", "FP8"),
                                           ("bitsandbytes", "bitsandbytes")])
def test_a_checkpoint_quantized_by_a_method_strata_cannot_run_is_refused_by_name(broken, method, named):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = start_error(broken)
    assert f"quantized with {named}" in msg and "config.json" in msg and "q_proj" not in msg


def test_strata_serve_and_plan_refuse_a_quantized_checkpoint_in_one_line_and_leave_no_stage_behind(broken):
    """serve starts its stages before it reads the checkpoint: they go when it refuses it."""
    import subprocess
    import uuid

    import psutil
    from server_process import strata_command

    cfg = json.loads((broken / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (broken / "config.json").write_text(json.dumps(cfg))
    mark = uuid.uuid4().hex
    for command in (["serve", "--devices", "cpu,cpu", "--port", "0"], ["plan", "--devices", "cpu"]):
        done = subprocess.run([*strata_command(), *command, "--model", str(broken)], capture_output=True, text=True,
                              timeout=120, env={**__import__("os").environ, "STRATA_TEST_MARK": mark})
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "quantized with GPTQ" in lines[0], done.stderr
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("STRATA_TEST_MARK") == mark:
                left.append(p.pid)
        except (psutil.Error, OSError):
            pass
    assert not left
