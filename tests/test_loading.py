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


def test_a_step_at_the_largest_batch_is_measured_before_the_cache_is_sized(tmp_path):
    """What the KV cache leaves room for on a GPU: the peak of one step at max_step_tokens with max_num_seqs rows
    sampled. On the CPU the same step is measured by peak resident memory; it holds at least its logits."""
    import torch

    from engine.pipeline.messages import StageSpec
    from engine.pipeline.runner import StageRunner

    model_dir = write_checkpoint(tmp_path, "llama", vocab_size=4096, hidden=256, layers=2, heads=4, kv_heads=2,
                                 intermediate=512)
    spec = StageSpec(stage_index=0, num_stages=1, ring=[0, 1], cuda_ranks=[], model_dir=str(model_dir),
                     layers=(0, 2), dtype="float32", weight_dtype="float32", input_dtype="float32", block_size=16,
                     max_model_len=1024, kv_cache_memory=None, kv_cache_fraction=0.9, max_kv_tokens=4096,
                     max_step_tokens=512, max_num_seqs=256)
    runner = StageRunner(spec, "cpu")
    peak = runner.step_peak_bytes()
    logits = 256 * 4096 * torch.float32.itemsize
    if Path("/proc/self/clear_refs").exists():
        assert peak >= logits
    assert runner.capacity_blocks() > 0
