"""A pipeline stage: one process, one device, a contiguous run of layers and their KV cache.

The stage joins the ring through torch.distributed, is told what to serve by the driver
(so a stage on another host needs only the rendezvous variables), loads its layers,
sizes its KV cache, and then runs every Batch that reaches it: from the driver or the
previous stage in, to the next stage or (on the last stage, after sampling) the driver out.
The last stage also sends what it sampled straight to the first, which computes steps the
driver scheduled ahead of those tokens (batching.scheduler, lookahead).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import queue
import signal
import sys
import threading
import time
import traceback

import torch

from batching.batch import Batch, StepTiming, TokensForFirstStage
from engine.errors import one_line
from engine.pipeline import transport
from engine.pipeline.launch import add_worker_args
from engine.pipeline.core_share import CoreShare
from engine.pipeline.step_clock import StepClock
from engine.pipeline.messages import (DRIVER_RANK, GREETING, WIRE_VERSION, DescribeDevice, Failed,
                                      Shutdown, StageReady, VersionMismatch, greeting_error)
from engine.pipeline.runner import StageRunner
from engine.pipeline.thread_policy import background_this_thread, background_transport_threads
from engine.placement import DeviceRequest, parse_devices
from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes
from engine.placement.probe import describe_device
from telemetry.tracing import Tracing, now_ns, stage_spans


# Steps a GPU stage may run ahead of reading their clocks; beyond, the oldest is waited for.
MAX_UNTIMED_STEPS = 64
GPU_EXPERT_LOAD_INTERVAL_S = 1.0

def serve(rank: int, world_size: int, request: DeviceRequest, threads: int | None, model_dir: str | None) -> None:
    """The stage's life: greet, describe the device, take a spec, load, then run batches until Shutdown."""
    if threads:
        torch.set_num_threads(threads)
    if request.name.startswith("cuda") and torch.cuda.is_available():
        # Events and NCCL streams follow the current device. (Without CUDA, describing the device says so.)
        torch.cuda.set_device(torch.device(request.name))
    hello = transport.recv_obj(DRIVER_RANK)
    transport.send_obj((GREETING, WIRE_VERSION), DRIVER_RANK)  # answered either way: the server says what is wrong too
    error = greeting_error(hello, "the server")
    if error:
        raise VersionMismatch(error)
    ask: DescribeDevice = transport.recv_obj(DRIVER_RANK)
    try:
        compute, weights = resolve_dtypes(ask.dtype, ask.checkpoint_dtype, torch.device(request.name))
        host = resolve_dtypes(ask.dtype, ask.checkpoint_dtype, torch.device("cpu")) if ask.has_experts else None
        info = describe_device(request, compute, threads, ask.memory_fraction, weights, ask.weight_format,
                               ask.offload_dir, ask.format_choices, ask.cpu_offload_bytes, host, ask.reprobe)
    except Exception as e:  # reported to the driver, which fails start-up with this line
        transport.send_obj(Failed(f"{request.name}: {one_line(e)}"), DRIVER_RANK)
        return
    transport.send_obj(info, DRIVER_RANK)
    spec = transport.recv_obj(DRIVER_RANK)
    if isinstance(spec, Shutdown):
        return
    if model_dir is not None:
        spec = dataclasses.replace(spec, model_dir=model_dir)  # this host keeps the checkpoint elsewhere
    links = transport.make_links(spec.ring, set(spec.cuda_ranks), spec.inline_bytes)
    token_link = transport.make_token_link(spec.ring)
    try:
        runner = StageRunner(spec, request.name, request.memory)
        ready = StageReady(spec.stage_index, runner.capacity_blocks(), runner.bytes_per_block, info.label)
    except Exception as e:
        transport.send_obj(StageReady(spec.stage_index, 0, 0, request.name, error=one_line(e)), DRIVER_RANK)
        return
    transport.send_obj(ready, DRIVER_RANK)
    msg = transport.recv_obj(DRIVER_RANK)
    if isinstance(msg, Shutdown):
        return
    try:
        runner.allocate(msg.num_blocks)
    except Exception as e:
        transport.send_obj(one_line(e), DRIVER_RANK)
        return
    transport.send_obj("allocated", DRIVER_RANK)
    tracing = Tracing(spec.trace, **{"strata.stage": spec.stage_index}) if spec.trace else None
    try:
        run_batches(runner, links[spec.stage_index], links[spec.stage_index + 1], token_link, tracing,
                    f"stage {spec.stage_index} ({request.name})")
    finally:
        if tracing is not None:
            tracing.shutdown()


def run_batches(runner: StageRunner, link_in: transport.Link, link_out: transport.Link,
                token_link: transport.Link | None, tracing: Tracing | None, device_label: str) -> None:
    """Receive in one thread, compute and post sends in this one: the next batch's transfer in and the
    last batch's transfer out both overlap this batch's compute. token_link: last stage → first, where they differ."""
    spec = runner.spec
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    input_dtype = TORCH_DTYPES[spec.input_dtype]
    hidden_size = runner.cfg.hidden_size

    def activations(batch) -> tuple[tuple[int, int], torch.dtype] | None:
        return ((batch.num_tokens, hidden_size), input_dtype) if isinstance(batch, Batch) and not runner.first else None

    def receive() -> None:
        stream = None
        if runner.device.type == "cuda":
            torch.cuda.set_device(runner.device)  # the current device is per thread
            stream = torch.cuda.Stream(runner.device)  # transfers in overlap the compute queued on the current one
        background_this_thread()
        try:
            while True:
                batch, hidden, nbytes = transport.recv(link_in, activations, runner.device, stream=stream)
                arrived = None
                if stream is not None and hidden is not None:
                    arrived = stream.record_event()
                inbox.put((batch, hidden, arrived, now_ns(), nbytes))
                if isinstance(batch, Shutdown):
                    return
        except Exception as e:
            inbox.put(e)

    # Only this thread computes; the ones that move messages yield their wake-ups to it (engine.pipeline.thread_policy).
    background_transport_threads()
    threading.Thread(target=receive, name="stage-receive", daemon=True).start()
    token_thread = None
    if token_link is not None and runner.first:
        token_thread = _receive_tokens(runner, token_link)
    outbox = transport.Outbox()
    # A CPU stage runs fewer threads while other processes keep some of its cores busy (engine.pipeline.core_share).
    cores = CoreShare(torch.get_num_threads()) if runner.device.type == "cpu" else None
    timed: collections.deque[tuple[StepClock, int]] = collections.deque()  # steps whose timing has not left
    free_since_ns = 0  # when this stage last finished a step
    experts = runner.cfg.num_experts > 0
    # A mixture of experts' load goes out with every timing from a CPU stage; a GPU stage's, whose reading waits for
    # the device, about once a second.
    load_interval_s = GPU_EXPERT_LOAD_INTERVAL_S if runner.device.type == "cuda" else 0.0
    load_due = 0.0
    while True:
        item = inbox.get()
        if isinstance(item, Exception):
            raise item
        batch, hidden, arrived, received_ns, nbytes = item
        overlapped = received_ns <= free_since_ns  # it arrived while this stage was computing the step before
        if isinstance(batch, Shutdown):
            # Sends still pending are results nobody will read now; only the Shutdown itself must go on, and round
            # to the first stage, whose token receiver leaves on it.
            if not runner.last:
                transport.send(batch, link_out)
            elif token_link is not None:
                transport.send(batch, token_link)
            if token_thread is not None:
                token_thread.join(10)
            return
        if arrived is not None:
            compute = torch.cuda.current_stream(runner.device)
            compute.wait_event(arrived)
            hidden.record_stream(compute)  # allocated on the transfer stream, read and freed on this one
        if hidden is not None and hidden.dtype != runner.dtype:
            hidden = hidden.to(runner.dtype)
        trace = batch.trace if tracing is not None else None
        if cores is not None:
            cores.adjust()
        runner.fill_pending(batch)
        clock = StepClock(runner.device, layers=trace is not None and trace.layers)
        hidden_out, out, tokens = runner.step(batch, hidden, clock.mark if clock.layers else None)
        clock.finish()
        timed.append((clock, len(batch.seqs)))
        # Timings go out with this batch once their steps have completed, the oldest first; a GPU that falls this
        # far behind is waited for, so the queue of clocks stays bounded. A GPU stage's last steps before the
        # pipeline goes idle are counted with the next batch it sends (or not at all, if it is shut down first).
        while timed and (timed[0][0].done() or len(timed) > MAX_UNTIMED_STEPS):
            done, num_seqs = timed.popleft()
            load = None
            if experts and time.monotonic() >= load_due:
                load_due = time.monotonic() + load_interval_s
                load = _sparse(runner.model.take_expert_load())
            batch.timings.append(StepTiming(spec.stage_index, done.seconds(), num_seqs, load))
        if trace is not None:
            batch.trace = trace.passed_on(device_label, now_ns(), spec.stage_index, tracing.dropped)
        if tokens is not None:  # first: the first stage may be waiting for them
            outbox.post(*transport.isend(tokens, token_link))
        if runner.last:
            out.timings = batch.timings
            out.trace = batch.trace
            outbox.post(*transport.isend(out, link_out))
        else:
            outbox.post(*transport.isend(batch, link_out, hidden_out))
        layer_stream = runner.model.stream
        fetches = layer_stream.drain_fetches(read=trace is not None) if layer_stream is not None else ()
        if trace is not None:
            tracing.emit(stage_spans(trace, spec.stage_index, device_label, spec.layers, batch, clock, received_ns,
                                     nbytes, overlapped, fetches))
        free_since_ns = now_ns()


def _sparse(load: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A [layers, experts] count as the flat indices of its non-zero entries and their counts."""
    flat = load.flatten()
    where = flat.nonzero().squeeze(1)
    return tuple(where.tolist()), tuple(flat[where].tolist())


def _receive_tokens(runner: StageRunner, link: transport.Link) -> threading.Thread:
    """On the first stage: a thread that takes the last stage's tokens as they come, for steps that wait on
    them (StageRunner.await_tokens). A broken link reaches the waiting step as the error; Shutdown ends it."""
    arrived: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        background_this_thread()
        try:
            while not isinstance(msg := transport.recv(link)[0], Shutdown):
                arrived.put(msg)
        except Exception as e:
            arrived.put(e)

    def await_tokens() -> TokensForFirstStage:
        msg = arrived.get()
        if isinstance(msg, Exception):
            raise msg
        return msg

    runner.await_tokens = await_tokens
    thread = threading.Thread(target=receive, name="stage-tokens", daemon=True)
    thread.start()
    return thread


def worker_args(argv: list[str] | None = None, prog: str = "strata worker") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description="Join a Strata pipeline as one stage. The rendezvous comes "
                                 "from MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE, as for any torch.distributed job.")
    add_worker_args(ap)
    return ap.parse_args(argv)


def stage_process() -> None:
    """A local stage process's whole life: main(), then out at once. Everything it owns is done with by then (its
    traces flushed, its links closed by the driver); the interpreter's own teardown of torch and its threads took
    longer than a stage's whole shutdown, and every server stop waited for it."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a stage process started by the server."""
    if os.environ.get("STRATA_LOCAL_STAGE"):
        # Ctrl-C in a terminal reaches the whole process group; the server, not the signal, ends its stages
        # (after draining), and a stage whose server is gone leaves by itself when its links break.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return run_worker(worker_args(argv))


def run_worker(args: argparse.Namespace) -> int:
    """A stage process, local or on another host (`strata worker`)."""
    env = os.environ
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in env]
    if missing:
        print(f"strata worker: set {', '.join(missing)} (the server's rendezvous address and port, this stage's "
              "rank and the world size)", file=sys.stderr)
        return 2
    try:
        request = parse_devices(args.device)
        if len(request) != 1:
            raise ValueError(f"a worker serves one device, got {args.device!r}")
    except ValueError as e:
        print(f"strata worker: {e}", file=sys.stderr)
        return 2
    addr, port, rank, world = env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["RANK"]), int(env["WORLD_SIZE"])
    try:
        store = transport.join_rendezvous(addr, port, world, args.rendezvous_timeout)
        transport.announce(store, rank)
        transport.init(rank, world, store, args.rendezvous_timeout)
    except Exception as e:
        print(f"strata worker: cannot join the pipeline at {addr}:{port} within {args.rendezvous_timeout:.0f}s "
              f"as rank {rank} of {world}: {one_line(e)}", file=sys.stderr)
        return 2
    try:
        serve(rank, world, request[0], args.threads, args.model)
    except VersionMismatch as e:
        print(f"strata worker: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # The driver or a neighbour went away; nothing to do but leave.
        print(f"strata worker {rank}: pipeline closed: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        transport.close()
    return 0
