"""Model families beyond Llama, Mistral and Qwen2, each against transformers on a tiny random checkpoint it builds:
greedy output through the HTTP API for requests sent all at once (so they share steps), on one stage and on two, and
from the same weights as a GGUF file where llama.cpp names the family."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from http_calls import post
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


@pytest.mark.parametrize("family", ["qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_family_answers_as_transformers_over_http_on_one_stage_and_two(tmp_path, family):
    model_dir = write_checkpoint(tmp_path, family, max_position_embeddings=256)
    tok = Tokenizer.from_dir(model_dir)
    want = [tok.decode(ids) for ids in hf_greedy(model_dir, PROMPTS, TOKENS)]
    for devices in ("cpu", "cpu,cpu"):
        with running_server(model_dir, *FLAGS, "--devices", devices) as s:
            assert served_texts(s.url) == want, devices


@pytest.mark.parametrize("family, pre", [("qwen3", "qwen2"), ("mixtral", "default"), ("qwen2_moe", "qwen2"),
                                         ("qwen3_moe", "qwen2")])
def test_a_family_from_gguf_answers_as_transformers_on_its_source(tmp_path, family, pre):
    """The same weights written as llama.cpp names them (F32), against transformers on the checkpoint they came from
    (transformers' own GGUF reader takes a Qwen3 file's head size to be its config default, and reads no file's
    experts). The experts are stacked in one tensor per part, as llama.cpp keeps them."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "gguf").mkdir()
    # llama.cpp's qwen3moe has experts in every layer
    dense = {"mlp_only_layers": []} if family == "qwen3_moe" else {}
    hf = write_checkpoint(tmp_path / "hf", family, max_position_embeddings=256, **dense)
    path = write_gguf(hf, tmp_path / "gguf" / f"{family}.gguf", "F32", pre=pre)
    tok = Tokenizer.from_dir(hf)
    want = [tok.decode(ids) for ids in hf_greedy(hf, PROMPTS, TOKENS)]
    with running_server(path, *FLAGS, "--quantization", "none", "--devices", "cpu,cpu") as s:
        assert served_texts(s.url) == want


def test_quantized_experts_are_read_one_by_one_from_the_tensor_llama_cpp_stacks_them_in(tmp_path):
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from engine.model.config import ModelConfig
    from engine.model.gguf_checkpoint import GGUFSource
    from engine.model.quantized import dequantize as unpack, pack

    (tmp_path / "hf").mkdir()
    hf = write_checkpoint(tmp_path / "hf", "qwen2_moe", max_position_embeddings=256)
    path = write_gguf(hf, tmp_path / "moe.gguf", "Q8_0", pre="qwen2")
    cfg = ModelConfig.from_dir(path)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.shared_expert_intermediate_size) == (8, 2, 96)
    source = GGUFSource(path, cfg.num_heads, cfg.num_kv_heads)
    stacked = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down_exps.weight")
    for e in (0, 5, 7):
        name = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
        want = torch.from_numpy(np.ascontiguousarray(dequantize(stacked.data[e], stacked.tensor_type)))
        assert source.stored_type(name) == "Q8_0" and source.shape(name) == tuple(want.shape)
        assert torch.equal(source.read(name), want)
        assert torch.equal(unpack(pack(source.read_codes(name)), torch.float32), want)
    with running_server(path, *FLAGS, "--devices", "cpu,cpu") as s:
        assert all(served_texts(s.url))
