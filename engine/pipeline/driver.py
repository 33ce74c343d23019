"""The driver: starts the stage processes, hands Batches to stage 0, takes StepOutputs from the last stage.

The driver is rank 0 of the ring; stages are ranks 1..P. Stage processes are started
here with the same rendezvous variables a stage on another host would be given.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import torch.distributed as dist

from batching.batch import Batch, StepOutput
from engine.errors import EngineDeadError
from engine.pipeline import transport
from engine.pipeline.launch import STAGE_COMMAND, LocalStages, free_port
from engine.pipeline.messages import (GREETING, WIRE_VERSION, Allocate, DescribeDevice, Failed, Shutdown, StageReady,
                                      StageSpec, greeting_error)
from engine.pipeline.thread_policy import background_transport_threads
from engine.placement import DeviceInfo




def _process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T for stopped, ...), or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@dataclass(slots=True)
class PipelineInfo:
    num_blocks: int
    stages: list[StageReady]  # in stage order


class Driver:
    """Rank 0 of the ring. Local stages (one process per entry of `devices`) take ranks 1..N; workers on other
    hosts join at `host:port` as ranks N+1 .. N+num_remote with the standard rendezvous variables."""

    def __init__(self, devices: list[str], threads: int | None = None, num_remote: int = 0,
                 host: str = "127.0.0.1", port: int | None = None, rendezvous_timeout_s: float = 120.0,
                 started: LocalStages | None = None) -> None:
        """started: this host's stages, already started for these settings (strata serve starts them first); they
        are started here otherwise."""
        if dist.is_initialized():
            # The ring is torch.distributed's default group, of which a process has one.
            raise RuntimeError("this process already drives a pipeline; one engine per process")
        self.world_size = 1 + len(devices) + num_remote
        self.procs: list[subprocess.Popen] = []
        self.outbox = transport.Outbox()
        self.dead: str | None = None
        self.links: list[transport.Link] = []
        self.stage_ranks: list[int] = []
        self.last_received_bytes = 0
        if started is not None and not started.matches(devices, host, port, self.world_size):
            started.kill()
            raise RuntimeError("the stages started ahead were started for another pipeline")
        port = started.port if started is not None else port or free_port()
        try:
            store = transport.serve_rendezvous(host, port, self.world_size, rendezvous_timeout_s)
            if started is None:
                started = LocalStages(devices, threads, host, port, self.world_size, rendezvous_timeout_s,
                                      STAGE_COMMAND)
            self.procs = started.procs
            self._wait_for_stages(store, rendezvous_timeout_s, f"{host}:{port}")
            transport.init(0, self.world_size, store, rendezvous_timeout_s)
            self._greet()
        except BaseException:
            if started is not None:
                started.kill()
            transport.close()
            raise

    def _wait_for_stages(self, store, timeout_s: float, where: str) -> None:
        """Wait until every stage has reached the store; a local stage that dies first fails start-up at once."""
        deadline = time.monotonic() + timeout_s
        ranks = range(1, self.world_size)
        while not transport.joined(store, ranks):
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"stage process {i + 1} exited with code {p.returncode} before joining the pipeline")
            if time.monotonic() > deadline:
                missing = [r for r in ranks if not transport.joined(store, range(r, r + 1))]
                raise RuntimeError(f"ranks {missing} did not join the pipeline at {where} within {timeout_s:.0f}s")
            time.sleep(0.02)

    def _greet(self) -> None:
        """Greet every stage and hear its greeting back; a stage of another release is refused in words (and leaves
        by itself, having heard ours)."""
        for rank in range(1, self.world_size):
            transport.send_obj((GREETING, WIRE_VERSION), rank)
        answers = [transport.recv_obj(rank) for rank in range(1, self.world_size)]
        for rank, answer in enumerate(answers, start=1):
            error = greeting_error(answer, f"rank {rank}")
            if error:
                raise RuntimeError(error)

    # ---- start-up ---------------------------------------------------------------------
    def describe(self, ask: DescribeDevice) -> list[DeviceInfo]:
        """Every stage's device, in rank order (index i is rank i + 1)."""
        self._send_all(ask)
        answers = [transport.recv_obj(rank) for rank in range(1, self.world_size)]
        failed = [a.error for a in answers if isinstance(a, Failed)]
        if failed:
            raise RuntimeError(failed[0])
        return answers

    def start(self, specs: list[tuple[int, StageSpec]]) -> PipelineInfo:
        """Send each rank its stage (in stage order), link the ring, load, and size the shared block pool."""
        self.stage_ranks = [rank for rank, _ in specs]
        for rank, spec in specs:
            transport.send_obj(spec, rank)
        first = specs[0][1]
        self.links = transport.make_links(first.ring, set(first.cuda_ranks), first.inline_bytes)
        transport.make_token_link(first.ring)  # collective; the driver is no end of it
        ready: list[StageReady] = [transport.recv_obj(rank) for rank in self.stage_ranks]
        errors = [f"stage {r.stage_index}: {r.error}" for r in ready if r.error]
        if errors:
            raise RuntimeError(errors[0])
        num_blocks = min(r.capacity_blocks for r in ready)
        self._send_all(Allocate(num_blocks))
        for rank in self.stage_ranks:
            ack = transport.recv_obj(rank)
            if ack != "allocated":
                raise RuntimeError(f"rank {rank} could not allocate its KV cache: {ack}")
        background_transport_threads()  # engine.pipeline.thread_policy: where stages share this host's cores
        return PipelineInfo(num_blocks, ready)

    def abandon(self, grace_s: float = 5.0) -> None:
        """Start-up failed after the stages joined. Stages still in the handshake wait on the default group: post
        them a Shutdown without waiting on any one (a stage that already left would block a plain send), give
        local processes a moment to leave, then end the rest."""
        posted = []
        for rank in range(1, self.world_size):
            local = self.procs[rank - 1] if rank - 1 < len(self.procs) else None
            if local is not None and local.poll() is not None:
                continue
            try:
                posted.append(transport.isend_obj(Shutdown(), rank))
            except RuntimeError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self._kill()
        del posted
        transport.close()

    def _send_all(self, msg: object) -> None:
        for rank in range(1, self.world_size):
            transport.send_obj(msg, rank)

    # ---- steady state -----------------------------------------------------------------
    def submit(self, batch: Batch) -> None:
        self._check()
        try:
            self.outbox.post(*transport.isend(batch, self.links[0]))
        except RuntimeError as e:
            self._died(e)

    def receive(self, timeout_s: float | None = None) -> StepOutput:
        """The oldest step's results. A pipeline that sends none within timeout_s has stalled: it is dead."""
        self._check()
        try:
            out, _, self.last_received_bytes = transport.recv(self.links[-1], timeout_s=timeout_s)
            return out
        except TimeoutError:
            self.dead = f"the pipeline returned no step for {timeout_s:.0f} s: {self._stalled_stage()}"
            raise EngineDeadError(self.dead) from None
        except RuntimeError as e:
            self._died(e)

    def _stalled_stage(self) -> str:
        """Which stage stopped, where this host can see it (a local process stopped by a signal, or gone)."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                return f"stage process {i + 1} exited with code {p.returncode}"
            if _process_state(p.pid) in ("T", "t"):
                return f"stage process {i + 1} (pid {p.pid}) is stopped"
        remote = self.world_size - 1 - len(self.procs)
        where = f", or one of the {remote} on other hosts" if remote else ""
        return f"a stage has hung (the local stage processes still run{where})"

    def _check(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)

    def check_processes(self) -> None:
        self._check()
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self.dead = f"stage process {i + 1} exited with code {p.returncode}"
                raise EngineDeadError(self.dead)

    def _died(self, e: Exception):
        codes = [p.poll() for p in self.procs]
        which = [i for i, c in enumerate(codes) if c is not None]
        self.dead = (f"stage process {which[0] + 1} exited with code {codes[which[0]]}" if which
                     else f"lost the connection to the pipeline: {str(e).splitlines()[0]}")
        raise EngineDeadError(self.dead) from None

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if not self.dead and self.links:
            try:
                transport.send(Shutdown(), self.links[0])
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
