"""Quantized weights: GGUF's blocks read exactly into the engine's packed layout, the products (the CPU kernel and
the portable dequantize-then-multiply path that GPUs take) against a float reference, quantization at load, the
per-layer formats a user asks for, and what the planner counts them at."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as ggml_dequantize
from gguf.quants import quantize as ggml_quantize

from batching import SamplingParams
from engine import LLM
from engine.kernels import quant_gemm
from engine.model import quantized
from engine.model.config import ModelConfig
from engine.model.linear import QuantLinear
from engine.model.weight_formats import (FORMATS, QUANTIZED, check_requested, describe_layers, parse_layer_formats,
                                         product_names, tensor_formats)
from http_calls import call
from server_process import ServerProcess

# Where each format keeps its fp16 scales within a block: random bytes there could be inf or NaN.
SCALE_BYTES = {"q8_0": [(0, 2)], "q4_0": [(0, 2)], "q4_1": [(0, 2), (2, 4)], "q4_k": [(0, 2), (2, 4)],
               "q6_k": [(208, 210)]}


def random_blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """GGUF blocks of an [n, k] matrix with every quantized bit random and sane fp16 scales: any bits are valid."""
    rng = np.random.default_rng(seed)
    ggml_type = GGMLQuantizationType[FORMATS[name].ggml_type]
    block, size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for a, b in SCALE_BYTES[name]:
        scales = rng.uniform(-0.05, 0.05, size=(n, k // block)).astype(np.float16)
        raw[..., a:b] = scales.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("name", QUANTIZED)
def test_gguf_blocks_unpack_to_exactly_what_ggml_dequantizes(name):
    n, k = 70, 512  # 70 rows: a partial block of 32 output features
    raw = random_blocks(name, n, k)
    want = torch.from_numpy(ggml_dequantize(raw, GGMLQuantizationType[FORMATS[name].ggml_type]).reshape(n, k))
    packed = quantized.pack(quantized.from_ggml(FORMATS[name], raw, (n, k)))
    assert torch.equal(quantized.dequantize(packed), want.float())
    rows = torch.tensor([0, 69, 33, 5, 5])
    assert torch.equal(quantized.dequantize_rows(packed, rows, torch.float32), want[rows].float())
    if quant_gemm.available(torch.device("cpu")):  # the kernel's embedding lookups: the same values
        product = quant_gemm.Product(packed, None)
        assert torch.equal(product.rows(rows), want[rows].float())
        with pytest.raises(IndexError, match="row ids must lie in"):
            product.rows(torch.tensor([70]))
    # Memory at the format's size (the 70 rows pad to 96).
    assert packed.nbytes * 8 == pytest.approx(96 * k * FORMATS[name].bits_per_weight)


@pytest.mark.parametrize("name", QUANTIZED)
# Rows on each path: the dot products, one pass of the tiles (up to 32), passes whose accumulators wait between
# chunks of steps, and more than one chunk of rows (ROW_CHUNK, 256); 544 inputs make 17 steps, not a multiple of
# the steps expanded at a time.
@pytest.mark.parametrize("rows,k", [(1, 512), (5, 512), (quant_gemm.DOT_ROWS, 512), (quant_gemm.DOT_ROWS + 1, 512),
                                    (40, 512), (300, 544)])
def test_products_match_the_dequantized_weights(name, rows, k):
    block = GGML_QUANT_SIZES[GGMLQuantizationType[FORMATS[name].ggml_type]][0]
    if k % block:  # GGUF's K-quant blocks hold 256 inputs, so their steps always come in eights
        k = k // block * block + block
    n = 70
    packed = quantized.pack(quantized.from_ggml(FORMATS[name], random_blocks(name, n, k, seed=rows), (n, k)))
    weight = quantized.dequantize(packed)
    bias = torch.randn(n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    exact = F.linear(x.double(), weight.double(), bias.double()).float()
    linear = QuantLinear(packed, bias, torch.float32)
    if quant_gemm.available(torch.device("cpu")):
        assert linear.kernel is not None
        if rows <= quant_gemm.DOT_ROWS:
            # int16 inputs per 32 (a relative step of 1/32767 of the block's largest), exact weights, fp32 sums.
            torch.testing.assert_close(linear(x), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
        else:
            # The tiles round inputs and weights to bf16 and sum in fp32, as a bf16 model's products do.
            want = F.linear(x.bfloat16().float(), weight.bfloat16().float(), bias)
            torch.testing.assert_close(linear(x), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
    # The portable path (other CPUs, GPUs): dequantize the layer and multiply at the activations' dtype.
    linear.kernel = None
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_the_portable_path_runs_on_the_activations_dtype():
    packed = quantized.pack(quantized.quantize(torch.randn(64, 256), FORMATS["q4_k"]))
    linear = QuantLinear(packed, None, torch.bfloat16)
    assert linear.kernel is None  # the kernel takes fp32 activations
    x = torch.randn(3, 256).bfloat16()
    out = linear(x)
    assert out.dtype == torch.bfloat16
    want = F.linear(x.float(), quantized.dequantize(packed))  # fp32 from the same codes
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_quantizing_at_load_is_ggml_s_own_quantization(name):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(2))
    ggml_type = GGMLQuantizationType[FORMATS[name].ggml_type]
    want = ggml_dequantize(ggml_quantize(w.numpy(), ggml_type), ggml_type).reshape(40, 256)
    got = quantized.dequantize(quantized.pack(quantized.quantize(w, FORMATS[name])))
    assert torch.equal(got, torch.from_numpy(want).float())


def test_q4_k_quantization_errs_less_than_q4_0():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))

    def error(name: str) -> float:
        back = quantized.dequantize(quantized.pack(quantized.quantize(w, FORMATS[name])))
        return float((back - w).norm() / w.norm())

    assert error("q4_k") < error("q4_0") < 0.1
    assert error("q8_0") < 0.01


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """llama.cpp's make_qkx2_quants (ggml-quants.c) transcribed line by line, for one group: (scale, min)."""
    lo, hi = min(float(x.min()), 0.0), float(x.max())
    if hi == lo:
        return 0.0, -lo
    sum_w, sum_x = float(w.sum()), float((w * x).sum())
    iscale = nmax / (hi - lo)
    scale = 1 / iscale
    q = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best = float((w * (scale * q + lo - x) ** 2).sum())
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - lo)
        q = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        sum_l, sum_l2, sum_xl = float((w * q).sum()), float((w * q * q).sum()), float((w * q * x).sum())
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale, this_min = (sum_w * sum_xl - sum_x * sum_l) / det, (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = 0.0, sum_xl / sum_l2
            err = float((w * (this_scale * q + this_min - x) ** 2).sum())
            if err < best:
                best, scale, lo = err, this_scale, this_min
    return scale, -lo


def test_q4_k_fits_each_group_as_llama_cpp_does():
    """Each group's scale and minimum are those of llama.cpp's search (weights: the group's RMS plus each input's
    magnitude; each better fit's offset the origin of the ranges after it), on plain, heavy-tailed and offset
    groups."""
    g = np.random.default_rng(5)
    x = np.concatenate([g.standard_normal((40, 32)), g.standard_t(3, (40, 32)), g.standard_normal((40, 32)) + 0.7,
                        np.zeros((1, 32))]).astype(np.float32) * 0.02
    w = np.sqrt((x**2).mean(-1, keepdims=True)) + np.abs(x)
    scale, minimum = quantized._fit_scale_and_min(torch.from_numpy(x), torch.from_numpy(w))
    want = np.array([_make_qkx2_quants(x[i], w[i]) for i in range(len(x))])
    got = np.stack([scale.numpy(), minimum.numpy()], axis=1)
    same = np.isclose(got, want, rtol=1e-4, atol=1e-9).all(axis=1)
    # Rounding in another order can tip a near tie in the search, and the search then takes another path.
    assert same.mean() > 0.95

    def error(fit, i):
        q = np.clip(np.rint((x[i] + fit[1]) / fit[0]), 0, 15) if fit[0] else np.zeros(32)
        return float((w[i] * (fit[0] * q - fit[1] - x[i]) ** 2).sum())

    assert all(error(got[i], i) <= error(want[i], i) * 1.01 + 1e-12 for i in range(len(x)))


def test_a_format_that_cannot_hold_a_matrix_says_so():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantized.quantize(torch.randn(8, 48), FORMATS["q4_k"])


@pytest.mark.parametrize("k", [96, 576])
def test_q4_k_takes_a_partial_last_super_block(k):
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(4))
    packed = quantized.pack(quantized.quantize(w, FORMATS["q4_k"]))
    back = quantized.dequantize(packed)
    assert float((back - w).norm() / w.norm()) < 0.1
    linear = QuantLinear(packed, None, torch.float32)
    few, many = torch.randn(3, k), torch.randn(quant_gemm.DOT_ROWS + 4, k)  # the dot products, the tiles
    exact = F.linear(few, back)
    torch.testing.assert_close(linear(few), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    torch.testing.assert_close(linear(many), F.linear(many.bfloat16().float(), back.bfloat16().float()), rtol=1e-4,
                               atol=1e-3)


def test_formats_requested_per_layer_and_what_auto_keeps():
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=256,
                                     intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                     tie_word_embeddings=True))
    products = product_names(cfg)
    k = {n: 256 for n in products}
    stored = {n: "Q4_K" for n in products} | {"model.layers.1.self_attn.v_proj.weight": "Q6_K",
                                             "model.embed_tokens.weight": "Q8_0",
                                             "model.layers.2.mlp.down_proj.weight": "Q5_K"}
    auto = tensor_formats(products, k, stored, "auto", {}, tied=True)
    assert auto["model.layers.0.mlp.up_proj.weight"] == "q4_k"
    assert auto["model.layers.1.self_attn.v_proj.weight"] == "q6_k"
    assert auto["model.embed_tokens.weight"] == "q8_0"
    assert "model.layers.2.mlp.down_proj.weight" not in auto  # no kernel for Q5_K: dequantized to the weight dtype
    mixed = tensor_formats(products, k, stored, "q8_0", parse_layer_formats("0=bf16,2=q4_k", 3), tied=True)
    assert mixed["model.layers.0.self_attn.q_proj.weight"] == "bfloat16"
    assert mixed["model.layers.1.self_attn.q_proj.weight"] == "q8_0"
    assert mixed["model.layers.2.mlp.down_proj.weight"] == "q4_k"
    assert mixed["model.embed_tokens.weight"] == "q8_0"  # the (tied) head follows --quantization
    assert tensor_formats(products, k, stored, "none", {}, tied=True) == {}
    assert describe_layers(["q4_k", "q4_k", "bfloat16", "q4_k+q6_k"]) == "0-1 q4_k, 2 bfloat16, 3 q4_k+q6_k"


@pytest.mark.parametrize("text, message", [
    ("0-3", "RANGE=FORMAT"), ("0-9=q4_k", "outside 0-3"), ("0=q4_k,0=q8_0", "named twice"),
    ("x=q4_k", "not a layer"), ("1=q5_k", "cannot quantize to 'q5_k'"), ("1=auto", "cannot quantize to 'auto'"),
])
def test_bad_layer_quantization_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_formats(text, 4)


def test_bad_quantization_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="q8_0, q4_0, q4_1, q4_k"):
        check_requested("int3")


@pytest.fixture(scope="module")
def q4k_dir(tmp_path_factory):
    """A tiny bf16 Llama whose products' input sizes are whole q4_k super-blocks (256) and a partial one (320)."""
    from tiny_models import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("llama256"), "llama", hidden=256, intermediate=320, layers=2,
                            heads=4, kv_heads=2, dtype="bfloat16")


def test_a_checkpoint_quantized_at_load_runs_and_stays_close_to_its_float_run(q4k_dir):
    prompt = [[5, 17, 33, 8, 99, 120, 7]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)

    def run(**kw):
        with LLM(str(q4k_dir), num_kv_blocks=64, max_model_len=128, **kw) as llm:
            info = llm.engine.info()
            out = llm.generate(prompt, greedy)[0]
            return info, out

    info, base = run()
    assert info.layer_formats == ("bfloat16", "bfloat16")
    for kw, formats, head in (
        ({"quantization": "q8_0"}, ("q8_0", "q8_0"), "q8_0"),
        ({"quantization": "q4_k", "layer_quantization": "0=bf16"}, ("bfloat16", "q4_k"), "q4_k"),
    ):
        info, out = run(**kw)
        assert (info.layer_formats, info.head_format) == (formats, head)
        assert len(out.token_ids) == 8
        if kw["quantization"] == "q8_0":
            # q8_0 is close to lossless: the first token (one product chain, no feedback) agrees.
            assert out.token_ids[0] == base.token_ids[0]


def test_strata_plan_fits_a_model_at_its_quantized_size(tmp_path):
    """A Llama-3-8B-shaped config alone: 15 GiB of bf16 weights do not fit in 6 GiB; at q4_k they do."""
    from bench.checkpoints import LLAMA3_8B_SHAPE
    from engine import PlacementError, plan_here

    (tmp_path / "config.json").write_text(json.dumps(
        {**LLAMA3_8B_SHAPE, "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}))
    with pytest.raises(PlacementError, match="does not fit"):
        plan_here(tmp_path, "cpu=6GiB", threads=1, max_model_len=4096)
    here = plan_here(tmp_path, "cpu=6GiB", threads=1, max_model_len=4096, quantization="q4_k")
    assert here.layer_formats == ("q4_k",) * 32
    (stage,) = here.plan.stages
    assert 4.5 * 2**30 < stage.weight_bytes < 6 * 2**30


def test_serve_says_what_each_layer_runs_at(q4k_dir):
    server = ServerProcess(str(q4k_dir), "--threads-per-stage", "1", "--max-model-len", "128", "--num-kv-blocks",
                           "32", "--quantization", "q4_0", "--layer-quantization", "1=q8_0")
    try:
        server.wait_ready(180)
        assert "strata: weights: layers 0 q4_0, 1 q8_0; LM head q4_0" in server.output()
        status, _, raw = call("GET", server.url + "/v1/models")
        assert status == 200
        assert json.loads(raw)["data"][0]["weight_formats"] == {"layers": ["q4_0", "q8_0"], "lm_head": "q4_0"}
    finally:
        server.stop()


def test_serve_refuses_a_format_a_layer_cannot_hold(tmp_path):
    from tiny_models import write_checkpoint

    odd = write_checkpoint(tmp_path, "llama", hidden=48, heads=4, kv_heads=2, intermediate=96, layers=1)
    server = ServerProcess(str(odd), "--threads-per-stage", "1", "--quantization", "q4_k")
    try:
        assert server.proc.wait(120) != 0
        assert "q4_k needs an input size that is a multiple of 32" in server.output()
    finally:
        server.cleanup()


def _write_mixed_gguf(path, seed: int = 0):
    """A one-layer Llama GGUF whose tensors mix types as a Q4_K_M file does: most products in one format (Q8_0), the
    v projection in another (Q4_0), one in a type without a kernel of its own (Q5_0), norms in F32."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    h, inter, vocab = 64, 128, 40
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    types = {"token_embd.weight": ("Q8_0", (vocab, h)), "blk.0.attn_q.weight": ("Q8_0", (h, h)),
             "blk.0.attn_k.weight": ("Q8_0", (h, h)), "blk.0.attn_v.weight": ("Q4_0", (h, h)),
             "blk.0.attn_output.weight": ("Q8_0", (h, h)), "blk.0.ffn_gate.weight": ("Q8_0", (inter, h)),
             "blk.0.ffn_up.weight": ("Q5_0", (inter, h)), "blk.0.ffn_down.weight": ("Q8_0", (h, inter))}
    for name, (kind, shape) in types.items():
        values = rng.normal(0, 0.3, size=shape).astype(np.float32)
        w.add_tensor(name, ggml_quantize(values, GGMLQuantizationType[kind]), raw_dtype=GGMLQuantizationType[kind])
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, rng.uniform(0.5, 1.5, size=h).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_of_mixed_types_runs_each_at_its_own_and_matches_its_dequantized_run(tmp_path):
    from engine.model.attention import build_metadata
    from engine.model.checkpoint import resolve_formats, tensor_source
    from engine.model.config import ModelConfig
    from engine.model.linear import SplitLinear
    from engine.model.stage_model import StageModel

    path = _write_mixed_gguf(tmp_path / "mixed.gguf")
    cfg = ModelConfig.from_dir(path)
    ids = [3, 17, 5, 39, 0, 22, 8]
    n = len(ids)

    def logits(quantization: str):
        source = tensor_source(path, cfg)
        formats = resolve_formats(source, cfg, quantization, {})
        model = StageModel(cfg, source, range(1), True, True, torch.float32, torch.device("cpu"), 16, torch.float32,
                           formats=formats)
        kv = torch.zeros((1, 2, 1, 16, cfg.num_kv_heads, cfg.head_dim))
        meta = build_metadata(16, list(range(n)), [], [], [(0, n, 0, [0])], torch.device("cpu"))
        with torch.inference_mode():
            return model, formats, model.logits(model.forward(torch.tensor(ids), torch.arange(n), meta, kv))

    model, formats, native = logits("auto")
    assert formats["model.layers.0.self_attn.v_proj.weight"] == "q4_0"
    assert formats["model.layers.0.self_attn.q_proj.weight"] == "q8_0"
    assert "model.layers.0.mlp.up_proj.weight" not in formats  # Q5_0: dequantized at load
    assert isinstance(model.layers[0].products.qkv, SplitLinear) and isinstance(model.layers[0].products.gate_up, SplitLinear)
    _, none, dequantized = logits("none")
    assert none == {}
    # The native run rounds activations and weights to bf16 in its products (on this small random model, logits move
    # by up to ~3% of the largest, as a bf16 copy's do by ~1.5%); a product at a wrong format or scale moves them
    # by far more.
    torch.testing.assert_close(native, dequantized, rtol=0.05, atol=0.05 * dequantized.abs().max().item())
