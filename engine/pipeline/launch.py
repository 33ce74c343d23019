"""Starting this host's stage processes, and the flags stages take. Imports no torch: `strata serve` starts its
stages before it imports torch itself, so that their start-up (each imports torch too) overlaps its own."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from engine.model.hub import is_repo_id
from engine.model.package import is_package
from engine.pipeline.messages import RENDEZVOUS_TIMEOUT_S
from engine.placement.devices import parse_devices

# Not `-m engine.pipeline.worker`: pickled messages must name their classes by module, not __main__.
STAGE_COMMAND = [sys.executable, "-c", "from engine.pipeline.worker import stage_process; stage_process()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalStages:
    """This host's stage processes, ranks 1..N of a ring whose rendezvous is at host:port (world_size counts the
    driver and the stages on other hosts too), each with the variables a stage on another host is given."""

    def __init__(self, devices: list[str], threads: int | None, host: str, port: int, world_size: int,
                 rendezvous_timeout_s: float, command: list[str] | None = None) -> None:
        self.devices, self.host, self.port, self.world_size = list(devices), host, port, world_size
        connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.procs: list[subprocess.Popen] = []
        try:
            for rank, device in enumerate(devices, start=1):
                env = dict(os.environ, MASTER_ADDR=connect, MASTER_PORT=str(port), RANK=str(rank),
                           WORLD_SIZE=str(world_size), STRATA_RENDEZVOUS_TIMEOUT=str(rendezvous_timeout_s),
                           STRATA_LOCAL_STAGE="1")
                args = ["--device", device] + (["--threads", str(threads)] if threads else [])
                self.procs.append(subprocess.Popen((command or STAGE_COMMAND) + args, env=env))
        except BaseException:
            self.kill()
            raise

    def matches(self, devices: list[str], host: str, port: int | None, world_size: int) -> bool:
        """Whether these are the stages a driver with these settings would start."""
        return (self.devices, self.host, self.world_size) == (list(devices), host, world_size) and port in (None,
                                                                                                          self.port)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def stage_devices(devices: str) -> list[str]:
    """--devices as each local stage is told its device: one entry per stage, its budget in bytes."""
    return [f"{d.name}={d.memory}" if d.memory else d.name for d in parse_devices(devices)]


def rendezvous_address(rendezvous: str | None) -> tuple[str, int | None]:
    """Where the driver serves the ring's rendezvous: --rendezvous host:port, else loopback and a port chosen then."""
    if not rendezvous:
        return "127.0.0.1", None
    host, _, port = rendezvous.rpartition(":")
    return host, int(port)


def start_ahead(model: str | None, devices: str, threads: int | None, workers: int, rendezvous: str | None,
                rendezvous_timeout_s: float, precision: str | None) -> LocalStages | None:
    """The stages `strata serve` would start, started now (the driver adopts them: Driver(started=...)); None where
    the settings do not read (the engine then reports it), or where the server has long work to do before its
    pipeline forms, which the stages' wait to join (rendezvous_timeout_s) is not meant to cover: a package's
    checksums, each layer's error at the --precision formats measured, or a Hugging Face id's download."""
    if precision or (model and (is_package(model) or is_repo_id(model))):  # an id may be downloading for a while
        return None
    try:
        names = stage_devices(devices)
        host, port = rendezvous_address(rendezvous)
    except ValueError:
        return None
    return LocalStages(names, threads, host, port or free_port(), 1 + len(names) + workers, rendezvous_timeout_s)


def add_stage_args(ap, *, rendezvous: bool = True) -> None:
    """The flags of stage processes, with one name, one environment variable and one default in every command that
    takes them: `strata serve` (for all its stages), `strata worker` and `strata plan` (rendezvous=False)."""
    env = os.environ
    ap.add_argument("--threads-per-stage", "--threads", dest="threads", type=int,
                    default=env.get("STRATA_THREADS_PER_STAGE"), help="torch threads in each stage process")
    if rendezvous:
        ap.add_argument("--rendezvous-timeout", type=float,
                        default=float(env.get("STRATA_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT_S)),
                        help="seconds the server waits for its stages to join, and a worker for its server")


def add_worker_args(ap) -> None:
    env = os.environ
    ap.add_argument("--device", default=env.get("STRATA_DEVICE", "cpu"),
                    help="this stage's device, optionally with a memory budget: cpu, cuda:1, cuda:0=20GiB")
    ap.add_argument("--model", default=env.get("STRATA_WORKER_MODEL"),
                    help="the checkpoint directory on this host, when it is not where the server has it")
    add_stage_args(ap)
