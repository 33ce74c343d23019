"""Loading a stage holds its weights and little else: peak resident memory while a stage loads, measured in a
fresh process, stays within 1.15x of the stage's weight bytes plus a fixed slack."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SLACK = 32 << 20  # the libraries' own, and a matrix in flight

MEASURE = """
import json, sys
from pathlib import Path
import torch
from engine.model.checkpoint import validate
from engine.model.config import ModelConfig
from engine.model.stage_model import StageModel

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

model_dir, compute, weights = Path(sys.argv[1]), getattr(torch, sys.argv[2]), getattr(torch, sys.argv[3])
cfg = ModelConfig.from_dir(model_dir)
files = validate(model_dir, cfg)
torch.empty(1) @ torch.empty(1)  # the BLAS and allocator set up before the baseline
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak is counted from here
model = StageModel(cfg, files, range(cfg.num_layers), True, True, compute, torch.device("cpu"), 256, weights,
                   wide_copy=False)
print(json.dumps({"peak": status("VmHWM") - before, "weights": model.weight_bytes}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 45M parameters: a stage that size is well above the slack.
    return write_checkpoint(tmp_path_factory.mktemp("load"), "llama", hidden=1024, layers=4, heads=8, kv_heads=2,
                            intermediate=2816, vocab_size=512, dtype="bfloat16")


@pytest.mark.parametrize("compute, weights", [("float32", "bfloat16"), ("bfloat16", "bfloat16"),
                                              ("float32", "float32")])
def test_a_stage_loads_within_its_weights_plus_a_fixed_slack(checkpoint, compute, weights):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to read peak resident memory")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), compute, weights], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["weights"] > SLACK
    assert got["peak"] <= 1.15 * got["weights"] + SLACK, got
