"""Run `strata serve` as a real subprocess for end-to-end tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strata_command() -> list[str]:
    """The installed `strata` script, or the same entry point through this interpreter."""
    exe = shutil.which("strata")
    return [exe] if exe else [sys.executable, "-m", "gateway.cli"]


class ServerProcess:
    """One `strata serve` process; `url` is its base URL (no trailing slash, no /v1)."""

    def __init__(self, model_dir: str | Path | None, *args: str, port: int | None = None,
                 env: dict | None = None) -> None:
        """model_dir None: no --model, the server's default."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="strata-serve-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        model = ["--model", str(model_dir)] if model_dir is not None else []
        cmd = [*strata_command(), "serve", *model, "--host", "127.0.0.1", "--port", str(self.port), *map(str, args)]
        # Its own session: a Ctrl-C meant for pytest does not reach it, and the group can be killed as a last resort.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"strata serve exited with code {code} before it was ready:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"strata serve did not become healthy within {timeout:.0f}s:\n{self.output()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait; SIGKILL the whole process group if it hangs. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.returncode != 0:
            # A server that failed may leave its stage processes behind, in its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@contextlib.contextmanager
def running_server(model_dir: str | Path, *args: str, startup_timeout: float = 60.0,
                   env: dict | None = None) -> Iterator[ServerProcess]:
    """Start `strata serve --model model_dir *args` on a free port, wait for /health 200, stop it with SIGTERM."""
    server = ServerProcess(model_dir, *args, env=env)
    try:
        server.wait_ready(startup_timeout)
        yield server
    finally:
        server.stop()
        server.cleanup()
