"""The driver: starts the stage processes, hands Batches to stage 0, takes StepOutputs from the last stage.

The driver is rank 0 of the ring; stages are ranks 1..P. Stage processes are started
here with the same rendezvous variables a stage on another host would be given.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch.distributed as dist

from batching.batch import Batch, StepOutput
from engine import transport
from engine.errors import EngineDeadError
from engine.stage import Allocate, Shutdown, StageReady, StageSpec


# Not `-m engine.stage`: pickled messages must name their classes by module, not __main__.
STAGE_COMMAND = [sys.executable, "-c", "from engine.stage import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(slots=True)
class PipelineInfo:
    num_blocks: int
    stages: list[StageReady]


class Driver:
    def __init__(self, specs: list[StageSpec], rendezvous_timeout_s: float = 120.0) -> None:
        if dist.is_initialized():
            # The ring is torch.distributed's default group, of which a process has one.
            raise RuntimeError("this process already drives a pipeline; one engine per process")
        self.num_stages = len(specs)
        self.world_size = self.num_stages + 1
        self.last_rank = self.num_stages
        self.procs: list[subprocess.Popen] = []
        self._pending: list = []  # isend works and their buffers, kept alive until done
        self.dead: str | None = None
        addr, port = "127.0.0.1", free_port()
        for rank in range(1, self.world_size):
            env = dict(os.environ, MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(self.world_size), STRATA_RENDEZVOUS_TIMEOUT=str(rendezvous_timeout_s))
            self.procs.append(subprocess.Popen(STAGE_COMMAND, env=env))
        try:
            store = transport.serve_rendezvous(addr, port, self.world_size, rendezvous_timeout_s)
            self._wait_for_stages(store, rendezvous_timeout_s)
            transport.init(0, self.world_size, store, rendezvous_timeout_s)
            self.info = self._handshake(specs)
        except BaseException:
            self._kill()
            transport.close()
            raise

    def _wait_for_stages(self, store, timeout_s: float) -> None:
        """Wait until every stage has reached the store; a stage that dies first fails start-up at once."""
        deadline = time.monotonic() + timeout_s
        while not transport.joined(store, range(1, self.world_size)):
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"stage {i} exited with code {p.returncode} before joining the pipeline")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stages did not join the pipeline within {timeout_s:.0f}s")
            time.sleep(0.02)

    def _handshake(self, specs: list[StageSpec]) -> PipelineInfo:
        for rank, spec in enumerate(specs, start=1):
            transport.send_obj(spec, rank)
        ready: list[StageReady] = [transport.recv_obj(rank) for rank in range(1, self.world_size)]
        errors = [r.error for r in ready if r.error]
        if errors:
            raise RuntimeError(errors[0])
        num_blocks = min(r.capacity_blocks for r in ready)
        self._send_all(Allocate(num_blocks))
        for rank in range(1, self.world_size):
            ack = transport.recv_obj(rank)
            if ack != "allocated":
                raise RuntimeError(f"stage {rank - 1} could not allocate its KV cache: {ack}")
        return PipelineInfo(num_blocks, ready)

    def _send_all(self, msg: object) -> None:
        for rank in range(1, self.world_size):
            transport.send_obj(msg, rank)

    def submit(self, batch: Batch) -> None:
        self._check()
        try:
            self._pending = [(w, bufs) for w, bufs in self._pending if not w.is_completed()]
            works, bufs = transport.isend_obj(batch, 1)
            self._pending.extend((w, bufs) for w in works)
        except RuntimeError as e:
            self._died(e)

    def receive(self) -> StepOutput:
        self._check()
        try:
            return transport.recv_obj(self.last_rank)
        except RuntimeError as e:
            self._died(e)

    def _check(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)

    def _died(self, e: Exception):
        codes = [p.poll() for p in self.procs]
        which = [i for i, c in enumerate(codes) if c is not None]
        self.dead = (f"stage {which[0]} exited with code {codes[which[0]]}" if which
                     else f"lost the connection to the pipeline: {str(e).splitlines()[0]}")
        raise EngineDeadError(self.dead) from None

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if not self.dead and dist.is_initialized():
            try:
                transport.send_obj(Shutdown(), 1)
            except RuntimeError:
                pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        transport.close()

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
