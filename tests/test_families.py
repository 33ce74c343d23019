"""Model families beyond Llama and Qwen2, each against transformers on a tiny random checkpoint it builds: greedy
output through the HTTP API for requests sent all at once (so they share steps), on one stage and on two, the second
from the same weights as a GGUF file where llama.cpp names the family."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from http_calls import call, post
from server_process import running_server
from tiny_gguf import write_gguf
from tiny_models import hf_greedy, write_checkpoint
from tokenization import Tokenizer

PROMPTS = [[1, 2, 3], [7] * 20, list(range(40, 90)), [5], list(range(300, 240, -3)), [9, 8] * 6, [100], [400, 2]]
TOKENS = 16
FLAGS = ("--served-model-name", "tiny", "--max-model-len", "256", "--threads-per-stage", "1", "--dtype", "float32")


def served_texts(url: str) -> list[str]:
    def one(p: list[int]) -> str:
        status, _, body = post(f"{url}/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": TOKENS,
                                                         "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        return body["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


# Phi-3's LongRoPE with an original context of 40 tokens: the prompts longer than it run at the long frequencies, the
# others (which stay within it) at the short ones. (One that grows past it as it decodes is not compared: the
# reference computes its earlier keys again at the long frequencies, the engine keeps them.)
LONG_ROPE = dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 40,
                                  "short_factor": [1.0 + i / 8 for i in range(8)],
                                  "long_factor": [2.0 + i for i in range(8)]}, original_max_position_embeddings=40)


# Mistral attending to its last 8 positions: the decodes' windows start inside a block, and prompts longer than it
# are masked to it, whole and in chunks.
WINDOW = dict(sliding_window=8)


# llama.cpp scales Gemma 3's queries by its head size (but for the 27B model), as the real models' configs say; a GGUF
# file does not carry query_pre_attn_scalar.
GEMMA_SCALE = dict(query_pre_attn_scalar=32)
# llama.cpp's qwen3moe has experts in every layer (the dense first layer is served in the expert-load test below).
ALL_EXPERTS = dict(mlp_only_layers=[])


# (family, config overrides, the GGUF pre-tokenizer name where llama.cpp names the family, or None)
CASES = [("qwen3", {}, "qwen2"), ("phi3", LONG_ROPE, "default"), ("mistral", WINDOW, None), ("gemma2", {}, None),
         ("gemma3", GEMMA_SCALE, "default"), ("mixtral", {}, "default"), ("qwen2_moe", {}, "qwen2"),
         ("qwen3_moe", ALL_EXPERTS, "qwen2")]


@pytest.mark.parametrize("family, overrides, pre", CASES)
def test_a_family_answers_as_transformers_over_http_on_one_stage_and_two(tmp_path, family, overrides, pre):
    """The checkpoint on one stage; on two, the same weights as the GGUF file llama.cpp would write (F32: its
    names, Llama's permuted q/k rows, experts stacked in one tensor per part, Gemma's 1 + w norms), where it names
    the family, else the checkpoint again. Transformers on the checkpoint is the reference for both (its own GGUF
    reader takes a Qwen3 file's head size to be its config default, and reads no file's experts)."""
    (tmp_path / "hf").mkdir()
    model_dir = write_checkpoint(tmp_path / "hf", family, max_position_embeddings=256, **overrides)
    tok = Tokenizer.from_dir(model_dir)
    want = [tok.decode(ids) for ids in hf_greedy(model_dir, PROMPTS, TOKENS)]
    two = write_gguf(model_dir, tmp_path / f"{family}.gguf", "F32", pre=pre) if pre is not None else model_dir
    # LongRoPE's long prompts also in chunks (each at the long frequencies, as the whole prompt is longer); a
    # window's prompts also in chunks, over a cache the requests fit in only by giving back what leaves the window.
    chunked = ("--max-num-batched-tokens", "16") if overrides in (LONG_ROPE, WINDOW) else ()
    if overrides is WINDOW:
        chunked += ("--block-size", "4", "--num-kv-blocks", "40", "--max-model-len", "96")
    for model, devices, more in ((model_dir, "cpu", ()), (two, "cpu,cpu", ("--quantization", "none", *chunked))):
        with running_server(model, *FLAGS, "--devices", devices, *more) as s:
            assert served_texts(s.url) == want, devices
            if overrides is WINDOW and chunked:
                status, _, text = call("GET", f"{s.url}/metrics")
                assert 'strata:num_preemptions_total{model_name="tiny"} 0' in text.decode()


def test_quantized_parts_are_read_from_the_tensors_llama_cpp_stacks_or_fuses_them_in(tmp_path):
    """Each expert of a stacked tensor (Qwen2-MoE), each of q/k/v and gate/up of a fused one (Phi-3): its own rows
    of the stored codes, as the gguf package dequantizes them; and the mixture serves."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from engine.model.checkpoint import tensor_source
    from engine.model.config import ModelConfig
    from engine.model.quantized import dequantize as unpack, pack

    def stored(path, name: str, index) -> torch.Tensor:
        t = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
        return torch.from_numpy(np.ascontiguousarray(dequantize(t.data[index], t.tensor_type)))

    cases = {"qwen2_moe": [(f"model.layers.1.mlp.experts.{e}.down_proj.weight", "blk.1.ffn_down_exps.weight", e)
                           for e in (0, 5, 7)],
             "phi3": [("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_qkv.weight", slice(64, 96)),
                      ("model.layers.2.mlp.up_proj.weight", "blk.2.ffn_up.weight", slice(128, 256))]}
    for family, parts in cases.items():
        (tmp_path / family).mkdir()
        hf = write_checkpoint(tmp_path / family, family, max_position_embeddings=256)
        path = write_gguf(hf, tmp_path / f"{family}.gguf", "Q8_0", pre="qwen2" if family == "qwen2_moe" else "default")
        cfg = ModelConfig.from_dir(path)
        source = tensor_source(path, cfg)
        for name, gguf_name, index in parts:
            want = stored(path, gguf_name, index)
            assert source.stored_type(name) == "Q8_0" and source.shape(name) == tuple(want.shape)
            assert torch.equal(source.read(name), want)
            assert torch.equal(unpack(pack(source.read_codes(name)), torch.float32), want)
        if family == "qwen2_moe":  # its quantized experts serve
            with running_server(path, *FLAGS, "--devices", "cpu,cpu") as s:
                assert all(served_texts(s.url))
    assert (cfg.num_experts, cfg.experts_per_token) == (0, 0)  # Phi-3's, last


def test_expert_load_is_counted_in_the_metrics_and_dashboard_and_the_experts_are_traced(tmp_path):
    """A Qwen3-MoE with a dense first layer answers as transformers does on two stages. Every token a step computes
    goes through every layer: each mixture-of-experts layer counts experts_per_token routings per token, summed over
    both stages; the dense first layer counts none. At layer detail each mixture-of-experts layer's span holds its
    experts' span."""
    import json
    import re
    import time
    import urllib.request

    from bench.otlp_receiver import OTLPReceiver

    model_dir = write_checkpoint(tmp_path, "qwen3_moe", max_position_embeddings=256)
    tok = Tokenizer.from_dir(model_dir)
    want = [tok.decode(ids) for ids in hf_greedy(model_dir, PROMPTS, TOKENS)]
    with OTLPReceiver() as rx, running_server(model_dir, *FLAGS, "--devices", "cpu,cpu", "--trace-detail", "layer",
                                              "--otlp-traces-endpoint", rx.endpoint,
                                              env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as s:
        assert served_texts(s.url) == want  # the dense first layer too, as transformers has it
        # Each request computes its prompt and every generated token but the last.
        tokens = sum(len(p) + TOKENS - 1 for p in PROMPTS)
        counts: dict[int, dict[int, int]] = {}
        text = urllib.request.urlopen(f"{s.url}/metrics").read().decode()
        for layer, expert, n in re.findall(r'strata:expert_tokens_total\{[^}]*layer="(\d+)",expert="(\d+)"\} (\d+)',
                                           text):
            counts.setdefault(int(layer), {})[int(expert)] = int(n)
        deadline = time.monotonic() + 30  # the dashboard samples once a second
        while not (experts := json.loads(urllib.request.urlopen(f"{s.url}/dashboard/data").read())["experts"])["layers"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert experts["layers"] == [1, 2] and len(experts["tokens_per_s"][0]) == 8
    assert sorted(counts) == [1, 2]
    for layer in (1, 2):
        assert sorted(counts[layer]) == list(range(8))
        assert sum(counts[layer].values()) == 2 * tokens
    spans = rx.spans()
    by_id = {x.span_id: x for x in spans}
    expert_spans = [x for x in spans if x.name.startswith("experts ")]
    assert {x.attributes["strata.layer"] for x in expert_spans} == {1, 2}
    for x in expert_spans:
        layer = by_id[x.parent_span_id]
        assert layer.name == f"layer {x.attributes['strata.layer']}"
        assert layer.start_ns <= x.start_ns <= x.end_ns <= layer.end_ns
    # The server left what it routed for the next plan of this checkpoint: each layer's experts' shares, busiest
    # first, over every choice it made, as the metrics counted them.
    from engine.placement.planning import plan_here
    from engine.placement.routing import measured_routing

    shares, routed = measured_routing(model_dir, 3, 8)
    assert routed == 2 * 2 * tokens and sum(shares) == pytest.approx(1.0) and list(shares) == sorted(shares)[::-1]
    mean_top = sum(max(counts[layer].values()) for layer in (1, 2)) / (2 * 2 * tokens)
    assert shares[0] == pytest.approx(mean_top)
    assert plan_here(model_dir, "cpu").routed == routed


def test_a_longrope_config_without_what_it_needs_is_refused_by_name():
    from engine.errors import CheckpointError
    from engine.model.config import ModelConfig

    base = dict(architectures=["Phi3ForCausalLM"], vocab_size=64, hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256)
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    cfg = ModelConfig.from_dict({**base, "rope_scaling": rope, "original_max_position_embeddings": 64})
    # A context 4x the original: cos and sin scaled by sqrt(1 + ln 4 / ln 64)
    assert cfg.rope_scaling["attention_factor"] == pytest.approx((4 / 3) ** 0.5)
    with pytest.raises(CheckpointError, match="original_max_position_embeddings"):
        ModelConfig.from_dict({**base, "rope_scaling": rope})
    with pytest.raises(CheckpointError, match="long_factor has 3 values for a head of 16"):
        ModelConfig.from_dict({**base, "rope_scaling": {**rope, "long_factor": [1.0] * 3},
                               "original_max_position_embeddings": 64})


def test_a_prompt_sharing_a_prefix_with_a_longer_one_is_rotated_as_its_own_length_says(tmp_path):
    """LongRoPE: a prompt that stays within the original context, after a longer one with the same first 16 tokens
    (whose keys were rotated at the long frequencies), answers as it does alone."""
    model_dir = write_checkpoint(tmp_path, "phi3", max_position_embeddings=256, **LONG_ROPE)
    long, short = list(range(100, 160)), list(range(100, 116)) + [7, 8, 9, 10]
    tok = Tokenizer.from_dir(model_dir)
    want = tok.decode(hf_greedy(model_dir, [short], TOKENS)[0])
    with running_server(model_dir, *FLAGS, "--devices", "cpu") as s:
        for p in (long, short):
            status, _, body = post(f"{s.url}/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": TOKENS,
                                                                "temperature": 0, "ignore_eos": True})
            assert status == 200, body
        assert body["choices"][0]["text"] == want


def test_configs_as_published_read_as_the_reference_reads_them():
    """Gemma configs without layer_types slide on all but every n-th layer (6 for Gemma 3, 2 for Gemma 2); a window
    as long as the context never slides; what a mixture of experts needs is checked."""
    from engine.errors import CheckpointError
    from engine.model.config import ModelConfig

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    gemma3 = ModelConfig.from_dict({**base, "architectures": ["Gemma3ForCausalLM"], "sliding_window": 512})
    assert sorted(set(range(12)) - gemma3.window_layers) == [5, 11] and gemma3.local_rope_theta == 10000.0
    assert gemma3.attention_scale == 256**-0.5  # query_pre_attn_scalar's default, not the head size
    gemma2 = ModelConfig.from_dict({**base, "architectures": ["Gemma2ForCausalLM"], "sliding_window": 512})
    assert sorted(gemma2.window_layers) == [0, 2, 4, 6, 8, 10]
    phi3 = ModelConfig.from_dict({**base, "architectures": ["Phi3ForCausalLM"], "sliding_window": 262144})
    assert phi3.sliding_window is None and not phi3.window_layers
    with pytest.raises(CheckpointError, match="layer_types"):
        ModelConfig.from_dict({**base, "architectures": ["Gemma3ForCausalLM"], "sliding_window": 8,
                               "layer_types": ["sliding_attention"] * 11})
    moe = {**base, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32}
    with pytest.raises(CheckpointError, match="shared_expert_intermediate_size"):
        ModelConfig.from_dict(moe)
    with pytest.raises(CheckpointError, match="mlp_only_layers"):
        ModelConfig.from_dict({**moe, "shared_expert_intermediate_size": 64, "mlp_only_layers": [12]})


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_experts_stacked_for_the_grouped_gemm_compute_what_one_product_each_computes(tmp_path, family):
    """What a GPU stage does with plain experts, run here on the CPU's grouped GEMM: every expert's weights in one
    tensor per product and all blocks through one call, without the host reading the routing. A prompt and a single
    token compute the logits the per-expert products compute, and the load is counted alike."""
    import torch

    from engine.model.attention import build_metadata
    from engine.model.checkpoint import validate
    from engine.model.config import ModelConfig
    from engine.model.stage_model import StageModel

    model_dir = write_checkpoint(tmp_path, family, layers=3)
    cfg = ModelConfig.from_dir(model_dir)
    models = [StageModel(cfg, validate(model_dir, cfg), range(3), True, True, torch.float32, torch.device("cpu"), 64)
              for _ in range(2)]
    moe = [layer.products.experts for layer in models[1].layers if layer.products.experts is not None]
    assert moe and all(e.stack() for e in moe) and all(e.stacked is not None for e in moe)
    logits = []
    for model in models:
        kv = torch.zeros(3, 2, 4, 16, cfg.num_kv_heads, cfg.head_dim)
        prompt = build_metadata(16, list(range(7)), [], [], [(0, 7, 0, [0])], torch.device("cpu"))
        model.forward(torch.arange(3, 10), torch.arange(7), prompt, kv)
        decode = build_metadata(16, [7], [], [], [(0, 1, 7, [0])], torch.device("cpu"))
        logits.append(model.logits(model.forward(torch.tensor([11]), torch.tensor([7]), decode, kv)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert models[0].take_expert_load().equal(models[1].take_expert_load())
