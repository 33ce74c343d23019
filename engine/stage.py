"""A pipeline stage: one process, one device, a contiguous run of layers and their KV cache.

The stage joins the ring through torch.distributed, is told what to serve by the driver
(so a stage on another host needs only the rendezvous variables), loads its layers,
sizes its KV cache, and then runs every Batch that reaches it: from the driver or the
previous stage in, to the next stage or (on the last stage, after sampling) the driver out.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from batching.batch import Batch, StepOutput
from engine import transport
from engine.attention import build_metadata
from engine.checkpoint import weight_files
from engine.config import ModelConfig
from engine.device import TORCH_DTYPES, available_memory
from engine.model import StageModel
from engine.sampler import Sampler, SamplingRow

DRIVER_RANK = 0
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(slots=True)
class StageSpec:
    """What the driver tells a stage to serve."""

    stage_index: int
    num_stages: int
    model_dir: str
    layers: tuple[int, int]  # [start, end)
    device: str
    dtype: str  # activations and KV cache
    weight_dtype: str
    threads: int | None
    block_size: int
    max_model_len: int
    kv_cache_memory: int | None  # bytes for this stage's KV; None: a fraction of what is free
    kv_cache_fraction: float
    max_kv_tokens: int  # more KV than this is never needed (max_num_seqs x max_model_len)


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


class StageRunner:
    """Turns Batches into forward passes over this stage's layers."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.first = spec.stage_index == 0
        self.last = spec.stage_index == spec.num_stages - 1
        model_dir = Path(spec.model_dir)
        self.cfg = ModelConfig.from_dir(model_dir)
        self.model = StageModel(
            self.cfg, weight_files(model_dir), range(*spec.layers), self.first, self.last,
            self.dtype, self.device, spec.max_model_len, TORCH_DTYPES[spec.weight_dtype],
        )
        self.block_size = spec.block_size
        self.tables: dict[int, list[int]] = {}
        self.rows: dict[int, SamplingRow] = {}
        self.sampler = Sampler(self.cfg.vocab_size, self.cfg.eos_token_ids) if self.last else None
        self.kv_cache: torch.Tensor | None = None

    @property
    def bytes_per_block(self) -> int:
        n_layers = self.spec.layers[1] - self.spec.layers[0]
        return n_layers * 2 * self.block_size * self.cfg.kv_size * self.dtype.itemsize

    def capacity_blocks(self) -> int:
        budget = self.spec.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * self.spec.kv_cache_fraction)
            if self.device.type == "cpu":
                # Host memory is shared with everything else on the machine; take a modest share unless told.
                budget = min(budget, DEFAULT_CPU_KV_BYTES)
        wanted = -(-self.spec.max_kv_tokens // self.block_size)
        return max(0, min(budget // max(self.bytes_per_block, 1), wanted))

    def allocate(self, num_blocks: int) -> None:
        n_layers = self.spec.layers[1] - self.spec.layers[0]
        # Zeros, not empty: masked-out slots still enter the attention matmul, and garbage could be NaN.
        self.kv_cache = torch.zeros(
            (n_layers, 2, num_blocks, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim),
            dtype=self.dtype, device=self.device,
        )

    def step(self, batch: Batch, hidden: torch.Tensor | None) -> tuple[torch.Tensor, StepOutput | None]:
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
        sample_rows, sample_ids = [], []
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
        dev = self.device
        meta = build_metadata(bs, slots, dec_tables, dec_lens, prefills, dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        x = torch.tensor(token_ids, dtype=torch.int64, device=dev) if self.first else hidden
        with torch.inference_mode():
            hidden_out = self.model.forward(x, pos_t, meta, self.kv_cache)
            if not self.last:
                return hidden_out, None
            if not sample_ids:
                return hidden_out, StepOutput(batch.batch_id, [], [])
            logits = self.model.logits(hidden_out[torch.tensor(sample_rows, device=dev)])
            rows = [self.rows[s] for s in sample_ids]
            sampled = self.sampler(logits, rows).to_host()
        for row, tok in zip(rows, sampled.token_ids):
            row.output_token_ids.append(tok)
        return hidden_out, StepOutput(batch.batch_id, sample_ids, sampled.token_ids, sampled.logprobs, sampled.top)


def serve(rank: int, world_size: int) -> None:
    """The stage's life: handshake, then batches until Shutdown."""
    spec: StageSpec = transport.recv_obj(DRIVER_RANK)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    prev_rank = rank - 1
    next_rank = (rank + 1) % world_size
    try:
        runner = StageRunner(spec)
        ready = StageReady(spec.stage_index, runner.capacity_blocks(), runner.bytes_per_block, spec.device)
    except Exception as e:  # reported to the driver, which fails start-up with this line
        transport.send_obj(StageReady(spec.stage_index, 0, 0, spec.device, error=_one_line(e)), DRIVER_RANK)
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
    hidden_size = runner.cfg.hidden_size
    while True:
        batch = transport.recv_obj(prev_rank)
        if isinstance(batch, Shutdown):
            if not runner.last:
                transport.send_obj(batch, next_rank)
            return
        hidden = None
        if not runner.first:
            hidden = transport.recv_tensor((batch.num_tokens, hidden_size), runner.dtype, prev_rank, runner.device)
        hidden_out, out = runner.step(batch, hidden)
        if runner.last:
            transport.send_obj(out, DRIVER_RANK)
        else:
            transport.send_obj(batch, next_rank)
            transport.send_tensor(hidden_out, next_rank)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def main() -> None:
    """Entry point of a stage process; the rendezvous comes from the standard variables."""
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timeout = float(env.get("STRATA_RENDEZVOUS_TIMEOUT", "60"))
    try:
        store = transport.join_rendezvous(env.get("MASTER_ADDR", "127.0.0.1"), int(env["MASTER_PORT"]), world, timeout)
        transport.announce(store, rank)
        transport.init(rank, world, store, timeout)
    except Exception as e:
        print(f"strata stage {rank}: cannot join the pipeline at {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    try:
        serve(rank, world)
    except RuntimeError as e:
        # The driver or a neighbour went away; nothing to do but leave.
        print(f"strata stage {rank}: pipeline closed: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        transport.close()

