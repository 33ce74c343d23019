"""The live dashboard, opened in headless Chromium while a 2-stage server is under load."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server_process import running_server

MODEL = "tiny"
KEY = "dash-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def get(url: str, key: str | None = KEY) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(url: str) -> dict[str, float]:
    """Each strata: series, summed over its label sets."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^strata:(\w+)\{[^}]*\} (\S+)$", get(url + "/metrics")[1].decode(), re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def load(url: str, stop: threading.Event) -> None:
    body = json.dumps({"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 40, "ignore_eos": True,
                       "stream": True}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()


@pytest.fixture(scope="module")
def server(llama_dir):
    with running_server(llama_dir, "--devices", "cpu,cpu", "--threads-per-stage", "1", "--api-key", KEY,
                        "--served-model-name", MODEL, "--max-model-len", "256", "--num-kv-blocks", "64") as s:
        yield s


def test_dashboard_needs_the_key_and_serves_its_data(server):
    assert get(server.url + "/dashboard", key=None)[0] == 401
    assert get(server.url + "/dashboard/data", key=None)[0] == 401
    status, page = get(server.url + "/dashboard")
    assert status == 200 and b"<canvas" in page
    assert b"http://" not in page and b"https://" not in page and b"<script src=" not in page  # nothing from elsewhere
    status, raw = get(server.url + "/dashboard/data")
    d = json.loads(raw)
    assert len(d["stages"]) == 2 and all(0 <= s["busy"] <= 1 for s in d["stages"])
    assert {"running", "waiting", "finished"} <= set(d["requests"]) and len(d["devices"]) == 2
    assert all(v["memory_total"] > 0 and v["source"] == "process" for v in d["devices"])


def test_the_key_in_a_url_is_traded_once_for_a_session_cookie(server):
    from http_calls import call

    status, headers, _ = call("GET", server.url + f"/dashboard?key={KEY}")
    assert status == 303 and headers["location"] == "/dashboard"  # the key leaves the address bar
    assert headers["referrer-policy"] == "no-referrer"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    status, headers, page = call("GET", server.url + "/dashboard", headers=session)
    assert status == 200 and b"<canvas" in page and headers["referrer-policy"] == "no-referrer"
    assert call("GET", server.url + "/dashboard/data", headers=session)[0] == 200
    assert call("GET", server.url + "/v1/models", headers=session)[0] == 401  # the session opens the page only
    assert call("GET", server.url + "/dashboard?key=wrong")[0] == 401
    assert call("GET", server.url + "/dashboard", headers={"Cookie": "strata_dashboard=forged"})[0] == 401


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_the_page_updates_live_and_shows_what_metrics_says(server, tmp_path):
    from playwright.sync_api import sync_playwright

    stop = threading.Event()
    loaders = [threading.Thread(target=load, args=(server.url, stop), daemon=True) for _ in range(4)]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.url}/dashboard?key={KEY}")
        assert page.url == f"{server.url}/dashboard"  # redirected: no key in the address bar or history
        for t in loaders:
            t.start()
        # under load: the figures move
        page.wait_for_function("Number(document.getElementById('tokens-generated').textContent) > 0", timeout=30000)
        page.wait_for_function("Number(document.body.dataset.updates || 0) >= 5", timeout=30000)
        assert page.locator("#stages tr").count() == 3  # a header and two stages
        assert page.locator("#devices tr").count() == 3
        stop.set()
        for t in loaders:
            t.join(60)
        # once idle, what the page shows equals /metrics
        deadline = time.monotonic() + 20
        while True:
            m = metrics(server.url)
            shown = {k: page.text_content(f"#{k}") for k in (
                "tokens-generated", "requests-finished", "requests-running", "requests-waiting", "kv-usage",
                "requests-errors", "requests-rejected", "preemptions", "prefix-hit-rate")}
            queried = m["prefix_cache_queries_total"]
            expected = {"tokens-generated": str(int(m["generation_tokens_total"])),
                        "requests-finished": str(int(m["request_success_total"])),
                        "requests-running": str(int(m["num_requests_running"])),
                        "requests-waiting": str(int(m["num_requests_waiting"])),
                        "kv-usage": f"{100 * m['kv_cache_usage_perc']:.1f}%",
                        "requests-errors": str(int(m.get("request_errors_total", 0))),
                        "requests-rejected": str(int(m["request_rejected_total"])),
                        "preemptions": str(int(m["num_preemptions_total"])),
                        "prefix-hit-rate": f"{100 * m['prefix_cache_hits_total'] / queried:.1f}%" if queried else "-"}
            if shown == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert shown == expected
        assert int(expected["requests-finished"]) >= 4
        assert page.text_content("#ttft-count") not in ("-", "0")
        assert page.text_content("#e2e-count") not in ("-", "0") and page.text_content("#queue-count") not in ("-", "0")
        assert page.text_content("#host-cpu").endswith("%") and page.text_content("#host-cores") not in ("-", "")
        shot = Path(os.environ.get("STRATA_SCREENSHOT_DIR", tmp_path)) / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        browser.close()


@pytest.mark.parametrize("name, visible, want", [
    ("cuda:0", None, ("index", 0)),
    ("cuda:1", "", ("index", 1)),
    ("cuda:1", "3,1", ("index", 1)),
    ("cuda:0", "2, 5", ("index", 2)),
    ("cuda:1", "GPU-1f2e,GPU-8a7c-44d1-9e0b-3c5d6e7f8a9b", ("uuid", "GPU-8a7c-44d1-9e0b-3c5d6e7f8a9b")),
    ("cuda:0", "MIG-4f2a7c31-1d9e-5b6a-8c0d-2e3f4a5b6c7d", ("uuid", "MIG-4f2a7c31-1d9e-5b6a-8c0d-2e3f4a5b6c7d")),
])
def test_nvml_finds_the_gpu_a_stage_names_whatever_cuda_visible_devices_holds(name, visible, want):
    from gateway.dashboard import nvml_device

    assert nvml_device(name, visible) == want


def test_a_gpu_outside_cuda_visible_devices_is_named():
    from gateway.dashboard import nvml_device

    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        nvml_device("cuda:2", "0,1")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_docs_render_the_openapi_document_loading_nothing_from_elsewhere(server, tmp_path):
    """/docs is open (like /openapi.json) and renders every operation, asking only its own server for anything."""
    from playwright.sync_api import sync_playwright

    doc = json.loads(get(server.url + "/openapi.json", key=None)[1])
    operations = sum(len(methods) for methods in doc["paths"].values())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(f"{server.url}/docs")
        page.wait_for_function(f"document.querySelectorAll('details.op').length === {operations}", timeout=30000)
        page.locator("details.op").first.click()
        assert "messages" in page.text_content("#ops") or "prompt" in page.text_content("#ops")
        browser.close()
    assert asked and all(u.startswith(server.url + "/") for u in asked), asked
