"""A model named by its Hugging Face id, from a cache folder the test lays out as huggingface_hub does (offline), with
the tokenizer and chat template a user may give instead of the checkpoint's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse

import pytest

from http_calls import call, post
from server_process import running_server, strata_command
from tiny_models import write_checkpoint

REPO = "tiny-org/tiny-llama"
TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A Hugging Face cache holding REPO at one revision, and the environment that points at it, offline."""
    root = tmp_path_factory.mktemp("hf")
    src = write_checkpoint(root / "src", "llama")
    repo = root / "hub" / f"models--{REPO.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "src": str(src)}


def env_of(hub: dict) -> dict:
    return {k: v for k, v in hub.items() if k.startswith("HF_")}


def test_a_hugging_face_id_is_served_from_the_cache_under_its_own_name_with_the_template_given(hub):
    with running_server(REPO, "--max-model-len", "128", "--num-kv-blocks", "32", "--threads-per-stage", "1",
                        "--chat-template", TEMPLATE, env=env_of(hub)) as s:
        status, _, raw = call("GET", s.url + "/v1/models")
        assert status == 200 and json.loads(raw)["data"][0]["id"] == REPO
        status, _, raw = call("GET", s.url + "/v1/models/" + urllib.parse.quote(REPO, safe="/"))
        assert status == 200 and json.loads(raw)["id"] == REPO
        status, _, out = post(s.url + "/v1/completions", {"model": REPO, "prompt": "Hello", "max_tokens": 3})
        assert status == 200 and out["usage"]["completion_tokens"] >= 1
        status, _, ids = post(s.url + "/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                                  "add_generation_prompt": False})
        status, _, text = post(s.url + "/detokenize", {"tokens": ids["tokens"]})
        assert "<<hi>>" in text["prompt"]


@pytest.mark.parametrize("flags, says", [
    (("--model", "tiny-org/not-cached"), "no such path here, nor in the Hugging Face cache"),
    (("--model", REPO, "--tokenizer", "/nonexistent/tokenizer-dir"), "no tokenizer.json or GGUF file"),
    (("--model", REPO, "--chat-template", "no-such-template.jinja"), "no such file"),
    (("--model", REPO, "--chat-template", "{% for %}"), "chat template (given inline)"),
])
def test_what_cannot_be_found_or_read_is_refused_in_one_line(hub, flags, says):
    done = subprocess.run([*strata_command(), "serve", "--port", "0", *flags], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env_of(hub)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr


def test_a_tokenizer_given_apart_is_the_one_served(hub, tmp_path):
    """Its own chat template comes with it."""
    other = tmp_path / "tok"
    shutil.copytree(hub["src"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    with running_server(REPO, "--max-model-len", "128", "--num-kv-blocks", "32", "--threads-per-stage", "1",
                        "--tokenizer", str(other), env=env_of(hub)) as s:
        status, _, ids = post(s.url + "/tokenize", {"messages": [{"role": "user", "content": "yo"}],
                                                  "add_generation_prompt": False})
        status, _, text = post(s.url + "/detokenize", {"tokens": ids["tokens"]})
        assert "<<yo>>" in text["prompt"]
        # The last stage masks a grammar with the tokenizer served, not the checkpoint's.
        status, _, out = post(s.url + "/v1/chat/completions", {
            "model": REPO, "messages": [{"role": "user", "content": "a number"}], "max_tokens": 24,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}})
        assert status == 200, out


def test_a_gguf_path_is_never_an_id_and_a_long_inline_template_is_a_template():
    from pathlib import Path

    from engine.llm_engine import read_chat_template
    from engine.model.hub import is_repo_id, resolve_model

    assert not is_repo_id("models/foo.gguf") and is_repo_id(REPO)
    assert resolve_model("models/foo.gguf") == Path("models/foo.gguf")  # the engine reports it missing, as a path
    long_template = "{% for m in messages %}" + "x" * 300 + "/" + "y" * 300 + "{{ m['content'] }}{% endfor %}"
    assert read_chat_template(long_template) == long_template
