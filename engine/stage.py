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
import dataclasses
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from batching.batch import PENDING, Batch, StepOutput, TokensForFirstStage
from engine import transport
from engine.attention import build_metadata
from engine.checkpoint import expected_shapes, weight_files
from engine.config import ModelConfig
from engine.device import TORCH_DTYPES, available_memory, resolve_dtypes
from engine.model import StageModel
from engine.placement import DeviceRequest, kv_cache_dtype, parse_devices
from engine.probe import describe_device
from engine.thread_policy import background_this_thread, background_transport_threads
from engine.tracing import LayerClock, TraceSettings, Tracing, now_ns, stage_spans
from engine.sampler import HostSamples, Sampler, SamplingRow

DRIVER_RANK = 0
DEFAULT_CPU_KV_BYTES = 1 << 30
# The first message each way, before any other: the messages below change between releases, and a worker of
# another release is told so in words rather than failing on a message it cannot read. Bump the version whenever
# a message class changes.
GREETING = "strata pipeline"
WIRE_VERSION = 4


class VersionMismatch(Exception):
    pass


def greeting_error(answer: object, who: str) -> str | None:
    """What is wrong with a greeting that is not ours, in words; None when it is ours."""
    if answer == (GREETING, WIRE_VERSION):
        return None
    if isinstance(answer, tuple) and len(answer) == 2 and answer[0] == GREETING:
        return (f"{who} speaks pipeline protocol {answer[1]} and this process {WIRE_VERSION}: run the same Strata "
                "release on every host")
    return f"{who} is not a Strata pipeline of this release (it greeted with {answer!r:.60})"


@dataclass(slots=True)
class DescribeDevice:
    """The driver's first message: what the stage's device is worth for this model (before any plan)."""

    dtype: str  # requested: auto or a dtype name
    checkpoint_dtype: str
    memory_fraction: float  # share of free memory a stage may use when its device has no budget


@dataclass(slots=True)
class StageSpec:
    """What the driver tells a stage to serve, once the plan is made."""

    stage_index: int
    num_stages: int
    ring: list[int]  # ranks in stage order, the driver first
    cuda_ranks: list[int]  # ranks whose stage is on a CUDA device (their links carry tensors over NCCL)
    model_dir: str
    layers: tuple[int, int]  # [start, end)
    dtype: str  # activations; the KV cache's follows from it and weight_dtype (engine.placement.kv_cache_dtype)
    weight_dtype: str
    input_dtype: str  # of the activations that arrive from the previous stage
    block_size: int
    max_model_len: int
    kv_cache_memory: int | None  # bytes for this stage's KV; None: what the device budget leaves, or a share of free memory
    kv_cache_fraction: float
    max_kv_tokens: int  # more KV than this is never needed (max_num_seqs x max_model_len)
    inline_bytes: int = 0  # room for activations in the frames of CPU links between stages (engine.transport)
    trace: TraceSettings | None = None


@dataclass(slots=True)
class StageReady:
    stage_index: int
    capacity_blocks: int
    bytes_per_block: int
    device_name: str
    error: str | None = None


@dataclass(slots=True)
class Allocate:
    num_blocks: int


class Shutdown:
    pass


@dataclass(slots=True)
class Failed:
    """A stage's answer when it cannot do what it was asked (one line for the user)."""

    error: str


class StageRunner:
    """Turns Batches into forward passes over this stage's layers."""

    def __init__(self, spec: StageSpec, device: str, memory_budget: int | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.memory_budget = memory_budget  # bytes for weights plus KV on this device, when the user set one
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.kv_dtype = TORCH_DTYPES[kv_cache_dtype(spec.dtype, spec.weight_dtype)]
        self.first = spec.stage_index == 0
        self.last = spec.stage_index == spec.num_stages - 1
        model_dir = Path(spec.model_dir)
        self.cfg = ModelConfig.from_dir(model_dir)
        self.block_size = spec.block_size
        self.model = StageModel(
            self.cfg, weight_files(model_dir), range(*spec.layers), self.first, self.last,
            self.dtype, self.device, spec.max_model_len, TORCH_DTYPES[spec.weight_dtype], self._wide_copy(),
        )
        self.tables: dict[int, list[int]] = {}
        self.rows: dict[int, SamplingRow] = {}
        # On the first stage: each sequence's newest sampled token, (position, token id), for steps scheduled
        # ahead of it; and, where the last stage is another process, how to wait for its next TokensForFirstStage.
        self.sampled: dict[int, tuple[int, int]] = {}
        self.await_tokens = None
        self.sampler = Sampler(self.cfg.vocab_size, self.cfg.eos_token_ids) if self.last else None
        self.kv_cache: torch.Tensor | None = None

    def _wide_copy(self) -> bool | None:
        """Under a memory budget, an fp32 copy of half-precision weights (engine.linear) only where the budget
        holds the weights, the copy and KV for one full-length sequence; else the model decides by free memory."""
        if self.memory_budget is None:
            return None
        spec = self.spec
        shapes = expected_shapes(self.cfg, range(*spec.layers), self.first, self.last)
        params = sum(math.prod(shape) for shape in shapes.values())
        kv_reserve = spec.max_model_len * self.bytes_per_block // self.block_size
        return params * (TORCH_DTYPES[spec.weight_dtype].itemsize + 4) + kv_reserve <= self.memory_budget

    @property
    def bytes_per_block(self) -> int:
        n_layers = self.spec.layers[1] - self.spec.layers[0]
        return n_layers * 2 * self.block_size * self.cfg.kv_size * self.kv_dtype.itemsize

    def capacity_blocks(self) -> int:
        """Called once the weights are loaded, so free memory no longer counts them."""
        budget = self.spec.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * self.spec.kv_cache_fraction)
            if self.memory_budget is not None:
                budget = min(budget, self.memory_budget - self.model.weight_bytes)
            elif self.device.type == "cpu":
                # Host memory is shared with everything else on the machine; take a modest share unless told.
                budget = min(budget, DEFAULT_CPU_KV_BYTES)
        wanted = -(-self.spec.max_kv_tokens // self.block_size)
        return max(0, min(budget // max(self.bytes_per_block, 1), wanted))

    def allocate(self, num_blocks: int) -> None:
        n_layers = self.spec.layers[1] - self.spec.layers[0]
        # Zeros, not empty: masked-out slots still enter the attention matmul, and garbage could be NaN.
        self.kv_cache = torch.zeros(
            (n_layers, 2, num_blocks, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim),
            dtype=self.kv_dtype, device=self.device,
        )

    def take_tokens(self, tokens: TokensForFirstStage) -> None:
        """Keep the newest token of each live sequence (one that finished meanwhile needs none)."""
        for seq_id, pos, tok in zip(tokens.seq_ids, tokens.positions, tokens.token_ids):
            if seq_id in self.tables:
                self.sampled[seq_id] = (pos, tok)

    def fill_pending(self, batch: Batch) -> None:
        """On the first stage, before the step's compute (its wait is not compute): put in each PENDING token the
        one sampled for that position, waiting for the last stage's message if it has not come yet."""
        if not self.first:
            return
        for seq_id in batch.released:
            self.sampled.pop(seq_id, None)
        for w in batch.seqs:
            if w.token_ids == [PENDING]:
                while (got := self.sampled.get(w.seq_id)) is None or got[0] != w.start_pos:
                    if self.await_tokens is None:
                        raise RuntimeError(f"sequence {w.seq_id}: a step came ahead of its token at position "
                                           f"{w.start_pos}, which was never sampled")
                    self.take_tokens(self.await_tokens())
                w.token_ids = [got[1]]

    def step(self, batch: Batch, hidden: torch.Tensor | None,
             on_layer=None) -> tuple[torch.Tensor, StepOutput | None, TokensForFirstStage | None]:
        """The step's activations out; on the last stage also what it sampled, for the driver and the first stage.
        The first stage's PENDING tokens are filled in (fill_pending) first."""
        for seq_id in batch.released:
            self.tables.pop(seq_id, None)
            self.rows.pop(seq_id, None)
        bs = self.block_size
        # Decodes first, so that one batched attention call covers them all.
        order = sorted(range(len(batch.seqs)), key=lambda j: len(batch.seqs[j].token_ids) != 1)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dec_tables, dec_lens, prefills = [], [], []
        sample_rows, sample_ids, sample_pos = [], [], []
        for j in order:
            w = batch.seqs[j]
            table = self.tables.setdefault(w.seq_id, [])
            del table[w.blocks_from :]
            table.extend(w.blocks)
            if w.init is not None and self.last:
                self.rows[w.seq_id] = SamplingRow(w.init.params, w.init.prompt_token_ids, [], w.init.seed)
            start = len(token_ids)
            n = len(w.token_ids)
            token_ids.extend(w.token_ids)
            pos = range(w.start_pos, w.start_pos + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if n == 1:
                dec_tables.append(table)
                dec_lens.append(w.start_pos + 1)
            else:
                prefills.append((start, start + n, w.start_pos, table))
            if w.sample:
                sample_rows.append(start + n - 1)
                sample_ids.append(w.seq_id)
                sample_pos.append(w.start_pos + n)
        dev = self.device
        meta = build_metadata(bs, slots, dec_tables, dec_lens, prefills, dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        x = torch.tensor(token_ids, dtype=torch.int64, device=dev) if self.first else hidden
        with torch.inference_mode():
            hidden_out = self.model.forward(x, pos_t, meta, self.kv_cache, on_layer)
            if not self.last:
                return hidden_out, None, None
            if not sample_ids:
                return hidden_out, StepOutput(batch.batch_id, [], []), None
            logits = self.model.logits(hidden_out[torch.tensor(sample_rows, device=dev)])
            rows = [self.rows[s] for s in sample_ids]
            sampled, errors = self._sample(logits, rows, sample_ids)
        for row, tok in zip(rows, sampled.token_ids):
            row.output_token_ids.append(tok)
        tokens = TokensForFirstStage(sample_ids, sample_pos, sampled.token_ids)
        if self.first:
            self.take_tokens(tokens)
            tokens = None
        out = StepOutput(batch.batch_id, sample_ids, sampled.token_ids, sampled.logprobs, sampled.top, errors=errors)
        return hidden_out, out, tokens

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow],
                seq_ids: list[int]) -> tuple[HostSamples, dict[int, str] | None]:
        """The batch's samples, and per sequence that could not be sampled, why. A failure is one request's, not
        the pipeline's: the rows are then sampled one by one, and a row that fails alone gets token 0 (a step
        scheduled ahead of it computes that, and the driver drops it) and its error, which fails that request."""
        try:
            return self.sampler(logits, rows).to_host(), None
        except Exception as e:
            batch_error = e
        token_ids: list[int] = []
        logprobs: list[float] = []
        top: list[list[tuple[int, float]]] = []
        errors: dict[int, str] = {}
        for i, (row, seq_id) in enumerate(zip(rows, seq_ids)):
            try:
                one = self.sampler(logits[i:i + 1], [row]).to_host()
            except Exception as e:
                errors[seq_id] = _one_line(e)
                token_ids.append(0)
                logprobs.append(0.0)
                top.append([])
                continue
            token_ids.append(one.token_ids[0])
            logprobs.append(one.logprobs[0] if one.logprobs is not None else 0.0)
            top.append(one.top[0] if one.top is not None else [])
        if len(rows) > 1 and len(errors) == len(rows):
            raise batch_error  # not one request's parameters: the sampler itself fails, and the engine with it
        print(f"sampling a step of {len(rows)} rows failed ({_one_line(batch_error)}); sampled apart, "
              f"{len(errors)} failed", file=sys.stderr, flush=True)
        return HostSamples(token_ids, logprobs, top), errors or None


def serve(rank: int, world_size: int, request: DeviceRequest, threads: int | None, model_dir: str | None) -> None:
    """The stage's life: greet, describe the device, take a spec, load, then run batches until Shutdown."""
    if threads:
        torch.set_num_threads(threads)
    if request.name.startswith("cuda"):
        torch.cuda.set_device(torch.device(request.name))  # events and NCCL streams follow the current device
    hello = transport.recv_obj(DRIVER_RANK)
    transport.send_obj((GREETING, WIRE_VERSION), DRIVER_RANK)  # answered either way: the server says what is wrong too
    error = greeting_error(hello, "the server")
    if error:
        raise VersionMismatch(error)
    ask: DescribeDevice = transport.recv_obj(DRIVER_RANK)
    try:
        compute, weights = resolve_dtypes(ask.dtype, ask.checkpoint_dtype, torch.device(request.name))
        info = describe_device(request, compute, threads, ask.memory_fraction, weights)
    except Exception as e:  # reported to the driver, which fails start-up with this line
        transport.send_obj(Failed(f"{request.name}: {_one_line(e)}"), DRIVER_RANK)
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
        transport.send_obj(StageReady(spec.stage_index, 0, 0, request.name, error=_one_line(e)), DRIVER_RANK)
        return
    transport.send_obj(ready, DRIVER_RANK)
    msg = transport.recv_obj(DRIVER_RANK)
    if isinstance(msg, Shutdown):
        return
    try:
        runner.allocate(msg.num_blocks)
    except Exception as e:
        transport.send_obj(_one_line(e), DRIVER_RANK)
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
        if runner.device.type == "cuda":
            torch.cuda.set_device(runner.device)  # the current device is per thread
        background_this_thread()
        try:
            while True:
                batch, hidden, nbytes = transport.recv(link_in, activations, runner.device)
                inbox.put((batch, hidden, now_ns(), nbytes))
                if isinstance(batch, Shutdown):
                    return
        except Exception as e:
            inbox.put(e)

    # Only this thread computes; the ones that move messages yield their wake-ups to it (engine.thread_policy).
    background_transport_threads()
    threading.Thread(target=receive, name="stage-receive", daemon=True).start()
    token_thread = None
    if token_link is not None and runner.first:
        token_thread = _receive_tokens(runner, token_link)
    outbox = transport.Outbox()
    while True:
        item = inbox.get()
        if isinstance(item, Exception):
            raise item
        batch, hidden, received_ns, nbytes = item
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
        if hidden is not None and hidden.dtype != runner.dtype:
            hidden = hidden.to(runner.dtype)
        trace = batch.trace if tracing is not None else None
        clock = LayerClock(runner.device) if trace is not None and trace.layers else None
        runner.fill_pending(batch)
        start = time.time()
        hidden_out, out, tokens = runner.step(batch, hidden, clock.mark if clock else None)
        end = time.time()
        batch.timings.append((spec.stage_index, start, end))
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
        if trace is not None:
            tracing.emit(stage_spans(
                trace, spec.stage_index, device_label, spec.layers, batch, int(start * 1e9), int(end * 1e9), clock,
                received_ns, nbytes,
            ))


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def worker_args(argv: list[str] | None = None, prog: str = "strata worker") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description="Join a Strata pipeline as one stage. The rendezvous comes "
                                 "from MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE, as for any torch.distributed job.")
    add_worker_args(ap)
    return ap.parse_args(argv)


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    env = os.environ
    ap.add_argument("--device", default=env.get("STRATA_DEVICE", "cpu"),
                    help="this stage's device, optionally with a memory budget: cpu, cuda:1, cuda:0=20GiB")
    ap.add_argument("--threads", type=int, default=env.get("STRATA_THREADS"), help="torch threads of this stage")
    ap.add_argument("--model", default=env.get("STRATA_WORKER_MODEL"),
                    help="the checkpoint directory on this host, when it is not where the server has it")
    ap.add_argument("--rendezvous-timeout", type=float, default=float(env.get("STRATA_RENDEZVOUS_TIMEOUT", 60)),
                    help="seconds to reach the server before giving up")


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
              f"as rank {rank} of {world}: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        serve(rank, world, request[0], args.threads, args.model)
    except VersionMismatch as e:
        print(f"strata worker: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # The driver or a neighbour went away; nothing to do but leave.
        print(f"strata worker {rank}: pipeline closed: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        transport.close()
    return 0
