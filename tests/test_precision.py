"""Precision chosen per layer by the planner (--precision, --max-layer-error): each layer's error at each format,
measured once; the bound it sets; the plan `strata plan` prints is the one `strata serve` runs; and what is served
is what those formats named by hand, or packed by `strata convert`, serve."""
from __future__ import annotations

import asyncio
import json

import pytest

from batching.sampling_params import SamplingParams
from engine.model import calibration
from engine.model.checkpoint import validate
from engine.model.config import ModelConfig
from engine.placement import ModelCost
from engine.placement.precision import Precision, count_vectors
from http_calls import call, greedy_texts
from server_process import running_server
from tiny_models import write_checkpoint

MODEL = "tiny"
FLAGS = ("--served-model-name", MODEL, "--max-model-len", "256", "--threads-per-stage", "1")
CHOICES = "auto,q8_0,q4_k"
# Two stages whose budgets hold the six bf16 layers only with some of them at fewer bits.
TIGHT = "cpu=320KiB,cpu=320KiB"
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def six_bf16(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("six-bf16"), "llama", layers=6, dtype="bfloat16")


def test_each_layers_error_grows_with_fewer_bits_and_is_measured_once(six_bf16, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    cfg = ModelConfig.from_dir(six_bf16)
    source = validate(six_bf16, cfg)
    choices = ("auto", "q8_0", "q4_k", "q4_0")
    errors = calibration.layer_errors(six_bf16, cfg, source, choices)
    assert errors["auto"] == [0.0] * 6
    for i in range(6):
        assert 0 < errors["q8_0"][i] < errors["q4_k"][i] < errors["q4_0"][i]
    assert list((tmp_path / "quality").iterdir())

    def measured_again(*args, **kw):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "measure_layer_errors", measured_again)
    assert calibration.layer_errors(six_bf16, cfg, source, choices) == errors


def test_the_bound_sets_how_few_bits_each_layer_may_take():
    cost = ModelCost(num_layers=3, hidden_size=64, vocab_size=100, layer_params=1000, layer_out_features=256,
                     kv_elems_per_token=32, elementwise_elems_per_token=100, fused_elementwise_elems_per_token=50,
                     embed_params=6400, head_params=6464, tied_embeddings=False, compute_dtype="float32",
                     weight_dtype="bfloat16")
    import dataclasses

    costs = {"q4_k": dataclasses.replace(cost, layer_bits=4.5), "auto": cost,
             "q8_0": dataclasses.replace(cost, layer_bits=8.5)}
    errors = {"auto": [0, 0, 0], "q8_0": [0.001, 0.02, 0.001], "q4_k": [0.01, 0.2, 0.05]}
    prec = Precision.build(costs, errors, 0.01)
    assert prec.names == ("auto", "q8_0", "q4_k")  # most bits first
    assert prec.floors == (2, 0, 1)  # layer 1 keeps the checkpoint's; layer 2 may go to q8_0
    assert Precision.build(costs, errors, None).floors == (2, 2, 2)
    # Layers 0-2 may put at most one layer at q4_k and at most two at q8_0 or below.
    assert sorted(count_vectors(3, prec.reach(0, 3))) == [(1, 1, 1), (1, 2, 0), (2, 0, 1), (2, 1, 0), (3, 0, 0)]
    with pytest.raises(ValueError, match="needs the checkpoint's weights"):
        Precision.build(costs, None, 0.01)


def test_options_that_do_not_combine_are_refused(six_bf16):
    from engine.placement.planning import plan_here

    for kw, says in ((dict(precision=CHOICES, quantization="q8_0"), "does not combine"),
                     (dict(max_layer_error=0.01), "give both"),
                     (dict(precision="auto,fp16"), "not a format a layer can be chosen to run at"),
                     (dict(precision="q8_0,q8_0"), "named twice"),
                     (dict(precision="q8_0,q4_k,q4_0"), "at most 2 formats besides auto"),
                     (dict(precision="auto", max_layer_error=0.01), "no format to bound"),
                     (dict(precision=CHOICES, cpu_offload_gb=-1.0), "cpu_offload_gb"),
                     (dict(precision=CHOICES, max_layer_error=-1.0), "at least 0")):
        with pytest.raises(ValueError, match=says):
            plan_here(six_bf16, "cpu", threads=1, max_model_len=256, **kw)


def test_strata_plan_prints_the_formats_strata_serve_runs(six_bf16):
    from engine import LLM
    from engine.placement.planning import plan_here

    options = dict(threads=1, max_model_len=256, max_num_seqs=8, precision=CHOICES)
    printed = plan_here(six_bf16, TIGHT, **options)
    assert any(f != "auto" for s in printed.plan.stages for f in s.formats)
    with LLM(six_bf16, devices=TIGHT, **options) as llm:
        ran = llm.engine.plan
        assert llm.engine.weight_formats == printed.formats
        want = llm.generate("The planner chose", GREEDY)[0].text
    assert [s.layers for s in ran.stages] == [s.layers for s in printed.plan.stages]
    assert [s.formats for s in ran.stages] == [s.formats for s in printed.plan.stages]
    assert [s.kv_blocks for s in ran.stages] == [s.kv_blocks for s in printed.plan.stages]
    # The same formats named by hand load the same weights (on one stage: a pipeline answers as one stage does).
    named = ",".join(f"{i}={f}" for s in ran.stages for i, f in zip(range(*s.layers), s.formats) if f != "auto")
    with LLM(six_bf16, threads=1, max_model_len=256, max_num_seqs=8, layer_quantization=named) as llm:
        assert llm.generate("The planner chose", GREEDY)[0].text == want


def served_formats(url: str) -> list[str]:
    _, _, body = call("GET", f"{url}/v1/models")
    return json.loads(body)["data"][0]["weight_formats"]["layers"]


def by_hand(layers: list[str]) -> str:
    """--layer-quantization naming the formats each layer runs at."""
    return ",".join(f"{i}={f}" for i, f in enumerate(layers) if f != "bfloat16") or "0=bf16"


def test_served_and_packed_with_formats_chosen_per_layer(six_bf16, tmp_path, monkeypatch):
    """A package converted with a bound serves, over HTTP, formats within the bound, and answers as those formats
    named by hand do."""
    from engine import convert

    cfg = ModelConfig.from_dir(six_bf16)
    errors = calibration.layer_errors(six_bf16, cfg, validate(six_bf16, cfg), ("auto", "q8_0", "q4_k"))
    bound = sorted(errors["q4_k"])[2]  # some layers may take q4_k, others may not
    # A disk this slow makes reading layers from the package's folder dearer than fewer bits.
    (tmp_path / "profile.json").write_text(json.dumps({"disk": {"disk_bandwidth": 1e6}}))
    monkeypatch.setenv("STRATA_DEVICE_PROFILE", str(tmp_path / "profile.json"))
    out = tmp_path / "pkg"
    convert(six_bf16, out, TIGHT, threads=1, max_model_len=256, precision=CHOICES, max_layer_error=bound,
            say=lambda line: None)
    with running_server(out, *FLAGS, "--devices", TIGHT) as s:
        packed = served_formats(s.url)
        got = asyncio.run(greedy_texts(s.url, MODEL))
    assert len(packed) == 6 and set(packed) - {"bfloat16"}, packed
    assert all(f == "bfloat16" or errors[f][i] <= bound for i, f in enumerate(packed)), packed
    with running_server(six_bf16, *FLAGS, "--layer-quantization", by_hand(packed)) as s:
        assert asyncio.run(greedy_texts(s.url, MODEL)) == got
