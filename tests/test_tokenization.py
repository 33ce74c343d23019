"""tokenization/: agreement with transformers, streaming detokenization, stop strings, training."""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    IncrementalDetokenizer,
    StopMatcher,
    Tokenizer,
    TokenizerError,
    train_bpe_tokenizer,
)

MULTILINGUAL = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "日本語のテキストです。中文文本，包括标点。",
    "Emoji: 😀🎉🤖 family 👩‍👩‍👧 flags 🇯🇵🇫🇷 and 🧑🏽‍💻.",
    "Accents: café naïve façade Ünïcödé crème brûlée São Paulo Ærøskøbing.",
    "Ελληνικά, русский язык, עברית, العربية, 한국어, हिन्दी.",
    "Code: def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\ttabs\r\n",
]

PROBES = MULTILINGUAL + [
    "", " ", "  two leading spaces", "trailing spaces  ", "\n\n\n", "a😀b中c", "😀" * 7, "中" * 9,
    "<|im_start|>user\nhi<|im_end|>\n", "<|begin_of_text|>inline special<|end_of_text|>",
    "unseen glyphs: ꙮ 𓀀 ∮ ☃ ♞", "\x00\x01 control \x7f", "mixed 中文 and English and 😀 together",
]

ALPHABET = "abc xyz.,\n" + "éüñ" + "中文日本" + "😀🎉🤖👩‍"


def _corpus() -> list[str]:
    rng = random.Random(1234)
    words = [w for line in MULTILINGUAL for w in line.split()]
    lines = []
    for i in range(1500):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randrange(3, 20))) + f" {i}")
    return lines + MULTILINGUAL * 20


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(_corpus(), 800, out)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> Tokenizer:
    return Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """A Llama-2 style tokenizer: Metaspace pre-tokenizer, byte fallback, strip-first-space decoder."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=80, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Byte-fallback tokens are ordinary vocabulary entries (ids 3..258), as in Llama 2.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    specials, rest = ordered[:3], ordered[3:]
    new_vocab = {t: i for i, (t, _) in enumerate(specials)}
    for b in range(256):
        new_vocab[f"<0x{b:02X}>"] = len(new_vocab)
    for t, _ in rest:
        new_vocab.setdefault(t, len(new_vocab))
    data["model"]["vocab"] = new_vocab
    tok = Backend.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    out = tmp_path_factory.mktemp("sp")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False, "special": True},
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": [
            {"name": "default", "template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"},
            {"name": "tool_use", "template": "unused"},
        ],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def sp(sp_dir) -> Tokenizer:
    return Tokenizer.from_dir(sp_dir)


# -- loading and metadata ----------------------------------------------------------------------


def test_does_not_import_torch_or_transformers():
    import subprocess

    code = "import sys, tokenization; print(any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_metadata(bpe, sp, hf, bpe_dir, sp_dir):
    for ours, d in ((bpe, bpe_dir), (sp, sp_dir)):
        ref = hf.from_pretrained(d)
        assert ours.vocab_size == len(ref)
        assert ours.bos_token == ref.bos_token and ours.eos_token == ref.eos_token
        assert ours.bos_token_id == ref.bos_token_id
        assert ref.eos_token_id in ours.eos_token_ids
        assert set(ref.all_special_ids) <= set(ours.all_special_ids)
        assert ours.add_bos_token
    assert bpe.eos_token_ids == frozenset({bpe.token_to_id("<|end_of_text|>")})
    assert sp.eos_token_ids == frozenset({0, 2})  # generation_config's list merged in
    assert bpe.convert_ids_to_tokens([bpe.bos_token_id]) == ["<|begin_of_text|>"]
    assert bpe.id_to_token(bpe.token_to_id("<|im_end|>")) == "<|im_end|>"


# -- encode / decode agree with transformers -----------------------------------------------------


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_encode_decode_match_transformers(which, request, hf):
    ours: Tokenizer = request.getfixturevalue(which)
    ref = hf.from_pretrained(request.getfixturevalue(f"{which}_dir"))
    rng = random.Random(7)
    extra = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 40))) for _ in range(100)]
    for text in PROBES + extra:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(PROBES) == [ours.encode(t) for t in PROBES]


def test_round_trip(bpe, sp):
    for text in PROBES:
        assert bpe.decode(bpe.encode(text), skip_special_tokens=False) == "<|begin_of_text|>" + text
    for text in MULTILINGUAL:
        assert sp.decode(sp.encode(text)) == text


# -- chat templates -------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "日本語で 😀?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And café × 3?"},
    ],
]

PARTS_CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second 中文"}]},
    {"role": "assistant", "content": "ok", "tool_calls": None},
]


def _joined(conversation):
    out = []
    for message in conversation:
        m = {k: v for k, v in message.items() if v is not None}
        if isinstance(m["content"], list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        out.append(m)
    return out


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(bpe, bpe_dir, hf, add_generation_prompt):
    ref = hf.from_pretrained(bpe_dir)
    assert bpe.chat_template == DEFAULT_CHAT_TEMPLATE
    for conversation in CONVERSATIONS:
        ours = bpe.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        theirs = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        assert ours.startswith("<|begin_of_text|><|im_start|>")
        assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ours = bpe.apply_chat_template(PARTS_CONVERSATION, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(_joined(PARTS_CONVERSATION), tokenize=False,
                                     add_generation_prompt=add_generation_prompt)
    assert ours == theirs and "first part\nsecond 中文" in ours
    prompt_ids = bpe.encode(ours, add_special_tokens=False)
    assert prompt_ids[0] == bpe.bos_token_id and prompt_ids.count(bpe.bos_token_id) == 1


FANCY_TEMPLATE = """
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif -%}
  {%- if loop.index > 6 %}{% break %}{% endif -%}
  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
<{{ m.role }}{% if ns.system %} sys={{ ns.system | tojson }}{% endif %}>
    {{ m.content | trim }}
  {% generation %}{{ eos_token if m.role == 'assistant' }}{% endgeneration %}
{% endfor -%}
{{ {'tools': tools, 'k': '<&>é'} | tojson }}{{ strftime_now('%Y')[:2] }}
{%- if add_generation_prompt %}<assistant>{% endif -%}
"""


def test_template_features_match_transformers(bpe_dir, hf, tmp_path):
    d = tmp_path / "fancy"
    shutil.copytree(bpe_dir, d)
    (d / "chat_template.jinja").write_text(FANCY_TEMPLATE, encoding="utf-8")  # overrides the config's
    ours, ref = Tokenizer.from_dir(d), hf.from_pretrained(d)
    assert ours.chat_template == FANCY_TEMPLATE
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(conversation, gen) == ref.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(TokenizerError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_named_template_list(sp, sp_dir, hf):
    ref = hf.from_pretrained(sp_dir)
    conversation = CONVERSATIONS[2]
    assert sp.apply_chat_template(conversation, False) == ref.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=False)
    assert sp.apply_chat_template(conversation).startswith("[system] Be kind.</s>")


def test_chat_template_errors(bpe_dir, bpe, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(bpe_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="has no chat template"):
        Tokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(TokenizerError):
        bpe.apply_chat_template([])
    with pytest.raises(TokenizerError, match="image_url"):
        bpe.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_sandbox_blocks_escapes(bpe):
    bpe_copy = Tokenizer.from_dir(Path(bpe.name))
    bpe_copy.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TokenizerError):
        bpe_copy.apply_chat_template(CONVERSATIONS[0])
    bpe_copy.chat_template = "{% set x = messages.append(1) %}"
    with pytest.raises(TokenizerError):
        bpe_copy.apply_chat_template(CONVERSATIONS[0])


# -- incremental detokenizer -----------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_detokenizer_on_multilingual_text(which, request):
    tok: Tokenizer = request.getfixturevalue(which)
    for text in PROBES:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas, tail = _stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas), (text, deltas)
            assert tail == ""


def test_detokenizer_keeps_the_special_tokens_it_is_told_to_and_drops_the_rest(bpe):
    """A tool-call format's markers may be special tokens: their text must reach the answer to be read back."""
    start, end = bpe.token_to_id("<|im_start|>"), bpe.token_to_id("<|im_end|>")
    ids = [start, *bpe.encode("call me", add_special_tokens=False), end, bpe.token_to_id("<|end_of_text|>")]
    detok = IncrementalDetokenizer(bpe, skip_special_tokens=True, kept=frozenset({start, end}))
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == "<|im_start|>call me<|im_end|>"


def test_detokenizer_withholds_split_characters(bpe):
    # The demo vocabulary is small, so an emoji is several byte tokens; nothing is emitted mid-character.
    ids = bpe.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(bpe)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_detokenizer_flushes_invalid_tail(bpe):
    lead = bpe.encode("ok 😀", add_special_tokens=False)
    partial = [i for i in bpe.encode("😀", add_special_tokens=False)][:-1]
    detok = IncrementalDetokenizer(bpe)
    emitted = "".join(detok.add(i) for i in lead + partial)
    assert emitted == "ok 😀"
    tail = detok.flush()
    assert tail.startswith("\ufffd") and emitted + tail == bpe.decode(lead + partial)
    assert detok.flush() == ""


def test_detokenizer_skips_special_tokens_between_words(sp, bpe):
    # A skipped token must not become a window start, or the Metaspace decoder would eat a space.
    words = sp.encode("Hello world again", add_special_tokens=False)
    ids = [words[0], sp.bos_token_id, *words[1:], sp.token_to_id("</s>")]
    for skip in (True, False):
        deltas, tail = _stream(sp, ids, skip)
        assert "".join(deltas) + tail == sp.decode(ids, skip_special_tokens=skip)
    im_end = bpe.token_to_id("<|im_end|>")
    ids = bpe.encode("a b", add_special_tokens=False) + [im_end] + bpe.encode(" c", add_special_tokens=False)
    assert "".join(_stream(bpe, ids, True)[0]) == "a b c"
    assert "".join(_stream(bpe, ids, False)[0]) == "a b<|im_end|> c"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list(ALPHABET) + ["ꙮ", "𓀀", "☃"]), max_size=40))
def test_detokenizer_property_text(bpe, sp, text):
    for tok in (bpe, sp):
        ids = tok.encode(text)
        deltas, tail = _stream(tok, ids, True)
        assert "".join(deltas) + tail == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_property_random_ids(bpe, data):
    # Arbitrary ids (incl. lone continuation bytes and special tokens) on the byte-level tokenizer.
    ids = data.draw(st.lists(st.integers(0, bpe.vocab_size - 1), max_size=40))
    for skip in (True, False):
        deltas, tail = _stream(bpe, ids, skip)
        assert "".join(deltas) + tail == bpe.decode(ids, skip_special_tokens=skip)


def test_detokenizer_cost_is_per_token_not_per_length(bpe):
    ids = bpe.encode(" ".join(MULTILINGUAL) * 40, add_special_tokens=False)
    calls = []
    real = bpe.decode

    class Counting:
        skipped_ids = bpe.skipped_ids

        def decode(self, window, skip_special_tokens=True):
            calls.append(len(window))
            return real(window, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting())  # type: ignore[arg-type]
    for i in ids:
        detok.add(i)
    assert detok.text == bpe.decode(ids)
    assert max(calls) <= 10  # windows stay a few tokens long however long the text gets


# -- stop strings ----------------------------------------------------------------------------------


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return (text[:end] if include else text[: end - len(stop)]), True
    return text, False


def _run_stop(stops, include, chunks):
    matcher = StopMatcher(stops, include)
    emitted, stopped = "", False
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    return matcher, emitted, stopped


def test_stop_spanning_deltas():
    matcher = StopMatcher(["STOP"], include_stop_str_in_output=False)
    assert matcher.feed("hello S") == ("hello ", False)
    assert matcher.feed("T") == ("", False)
    assert matcher.feed("OP and more") == ("", True)
    assert matcher.feed("ignored") == ("", True)
    assert matcher.flush() == ""


def test_stop_include_in_output():
    matcher = StopMatcher(["</answer>", "\n\n"], include_stop_str_in_output=True)
    assert matcher.feed("42</ans") == ("42", False)
    assert matcher.feed("wer> trailing") == ("</answer>", True)


def test_stop_false_start_is_released():
    matcher = StopMatcher(["abc"], include_stop_str_in_output=False)
    assert matcher.feed("xa") == ("x", False)
    assert matcher.feed("b") == ("", False)
    assert matcher.feed("d") == ("abd", False)
    assert matcher.feed("ab") == ("", False)
    assert matcher.flush() == "ab"
    assert matcher.flush() == ""


def test_stop_pass_through():
    matcher = StopMatcher([], include_stop_str_in_output=False)
    assert matcher.feed("anything S") == ("anything S", False)
    assert matcher.flush() == ""
    assert StopMatcher([""], False).feed("x") == ("x", False)


def test_stop_earliest_and_longest():
    assert _run_stop(["bc", "abcd"], False, ["abcd"])[1] == "a"
    assert _run_stop(["ab", "abc"], True, ["a", "bc"])[1] == "ab"
    assert _run_stop(["b", "ab"], True, ["xab"])[1] == "xab"


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab😀 c", max_size=30),
    stops=st.lists(st.text(alphabet="ab😀 c", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_property(text, stops, include, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    expected, expect_stop = _reference_stop(text, stops, include)
    matcher = StopMatcher(stops, include)
    emitted, stopped = "", False
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted += out
        # Nothing emitted is ever taken back, and a stop string never leaks out unless asked for.
        assert expected.startswith(emitted)
        if not include:
            assert not any(s in emitted for s in stops)
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    assert (emitted, stopped) == (expected, expect_stop)


# -- training --------------------------------------------------------------------------------------


def test_training_is_deterministic_and_fast(tmp_path):
    texts = _corpus() * 4
    assert sum(len(t.encode()) for t in texts) > 200_000
    start = time.perf_counter()
    train_bpe_tokenizer(texts, 2000, tmp_path / "a")
    assert time.perf_counter() - start < 5.0  # generous bound; typically well under 1 s
    train_bpe_tokenizer(texts, 2000, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE


def test_training_without_chat_template(tmp_path):
    train_bpe_tokenizer(["tiny corpus"], 300, tmp_path, chat_template=None)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    assert tok.encode("tiny")[0] == tok.bos_token_id
    with pytest.raises(ValueError):
        train_bpe_tokenizer(["x"], 100, tmp_path / "small")



def test_a_long_stop_string_costs_memory_linear_in_its_length():
    import tracemalloc

    stop = "ab" * 50_000  # 100 000 characters: every prefix of it would be 5 GB
    tracemalloc.start()
    try:
        matcher = StopMatcher([stop])
        out, stopped = matcher.feed("ab" * 49_999 + "a")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (out, stopped) == ("", False)  # all of it might still become the stop string
    assert peak < 20 * len(stop) * 8  # a table of ints and the held text, nothing quadratic
    assert matcher.feed("b") == ("", True)
