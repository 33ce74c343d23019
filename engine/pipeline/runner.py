"""A stage's model work: load its layers, size and allocate its KV cache, and turn each Batch into a forward
pass (and, on the last stage, sampled tokens)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from batching.batch import PENDING, Batch, StepOutput, TokensForFirstStage
from batching.sampling_params import SamplingParams
from engine.errors import CheckpointError, one_line
from engine.kernels import quant_gemm
from engine.kernels import triton_paged_attention as triton_kernel
from engine.model import package
from engine.model.attention import build_metadata
from engine.model.checkpoint import checkpoint_tokenizer, expected_shapes, stop_token_ids, tensor_source
from engine.model.config import ModelConfig
from engine.model.grammar import GrammarMasks
from engine.model.rope import table_offset
from engine.model.linear import product_path
from engine.model.sampler import HostSamples, Sampler, SamplingRow
from engine.model.stage_model import StageModel
from engine.pipeline.decode_graphs import DecodeGraphs
from engine.pipeline.messages import StageSpec
from engine.placement import kv_cache_dtype
from engine.placement.cost import DEFAULT_CPU_KV_BYTES, kv_cache_blocks
from engine.placement.local_device import TORCH_DTYPES, PeakMemory, available_memory, zeroed

GPU_GRAMMAR_THREADS = 4  # host threads computing a GPU stage's grammar masks together


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
        if package.is_package(model_dir):
            self.model = self._load_packed(package.read_package(model_dir))
        else:
            self.model = StageModel(
                self.cfg, tensor_source(model_dir, self.cfg), range(*spec.layers), self.first, self.last,
                self.dtype, self.device, spec.max_model_len, TORCH_DTYPES[spec.weight_dtype], self._wide_copy(),
                spec.formats, spec.streamed_layers, spec.offload_dir, host_experts=spec.host_experts,
                host_dtypes=tuple(TORCH_DTYPES[d] for d in spec.host_dtypes) if spec.host_dtypes else None,
            )
        self.tables: dict[int, list[int]] = {}
        self.rows: dict[int, SamplingRow] = {}
        self.prompt_lens: dict[int, int] = {}  # what a sequence's rotary rows depend on (engine.model.rope.table_offset)
        # On the first stage: each sequence's newest sampled token, (position, token id), for steps scheduled
        # ahead of it; and, where the last stage is another process, how to wait for its next TokensForFirstStage.
        self.sampled: dict[int, tuple[int, int]] = {}
        self.await_tokens = None
        self.sampler = Sampler(self.cfg.vocab_size, spec.stop_token_ids or self.cfg.eos_token_ids) if self.last else None
        self.grammars: GrammarMasks | None = None  # on the last stage, once a sequence has a grammar
        self.kv_cache: torch.Tensor | None = None
        self.graphs: DecodeGraphs | None = None

    def _load_packed(self, pkg: package.Package) -> StageModel:
        """This stage's part of a package (engine.model.package): checked against this device and its checksums,
        then mapped."""
        spec = self.spec
        products = product_path(self.device, TORCH_DTYPES[spec.weight_dtype], self.dtype)
        stage = package.check_stage_here(pkg, spec.stage_index, products, quant_gemm.available(self.device))
        if (stage.dtype, stage.weight_dtype) != (spec.dtype, spec.weight_dtype) or stage.layers != spec.layers:
            raise CheckpointError(f"{pkg.path}: stage {spec.stage_index} was packed for layers {stage.layers} at "
                                  f"{stage.dtype} over {stage.weight_dtype} weights, asked for {spec.layers} at "
                                  f"{spec.dtype} over {spec.weight_dtype}: serve it with the dtype it was converted "
                                  "with")
        package.verify(pkg, stage.files)
        index, shard, disk = package.stage_files(spec.stage_index)
        return StageModel.from_package(pkg.path, package.read_index(pkg.path / index), shard,
                                       disk if stage.streamed_layers else None, spec.max_model_len, self.device)

    def _wide_copy(self) -> bool | None:
        """Under a memory budget, an fp32 copy of half-precision weights (engine.model.linear) only where the budget
        holds the weights, the copy and KV for one full-length sequence; else the model decides by free memory."""
        if self.memory_budget is None:
            return None
        spec = self.spec
        if spec.streamed_layers:
            return False  # a stage that streams has no memory to spare
        shapes = expected_shapes(self.cfg, range(*spec.layers), self.first, self.last)
        params = sum(math.prod(shape) for shape in shapes.values())
        kv_reserve = spec.max_model_len * self.bytes_per_block // self.block_size
        return params * (TORCH_DTYPES[spec.weight_dtype].itemsize + 4) + kv_reserve <= self.memory_budget

    @property
    def bytes_per_block(self) -> int:
        n_layers = self.spec.layers[1] - self.spec.layers[0]
        return n_layers * 2 * self.block_size * self.cfg.kv_size * self.kv_dtype.itemsize

    def capacity_blocks(self) -> int:
        """Called once the weights are loaded, so free memory no longer counts them. On a GPU without a KV budget,
        as vLLM sizes it: one step at the largest batch the stage will see is run first, the allocator's cache is
        emptied, and the cache takes its share of what is then free less that step's peak activations. The blocks
        follow the plan's rule (engine.placement.cost: stage_kv_budget, kv_cache_blocks), on what is measured here."""
        budget = self.spec.kv_cache_memory
        if budget is None:
            headroom = self.step_peak_bytes() if self.device.type == "cuda" else 0
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            budget = int(available_memory(self.device) * self.spec.kv_cache_fraction) - headroom
            if self.memory_budget is not None:
                budget = min(budget, self.memory_budget - self.model.weight_bytes)
            elif self.device.type == "cpu":
                # Host memory is shared with everything else on the machine; take a modest share unless told.
                budget = min(budget, DEFAULT_CPU_KV_BYTES)
        return kv_cache_blocks(budget, self.bytes_per_block, self.spec.max_kv_tokens, self.block_size)

    def step_peak_bytes(self) -> int:
        """Bytes one step at the largest batch allocates beyond what is held before it: a prefill of max_step_tokens
        dummy tokens (at least one per sequence), and on the last stage the logits and sampling of max_num_seqs rows,
        over a scratch KV cache of one block. Measured by the allocator on a GPU, by peak resident memory on a CPU
        (0 where the system cannot say)."""
        spec, dev = self.spec, self.device
        tokens = max(spec.max_step_tokens, spec.max_num_seqs)
        rows = min(spec.max_num_seqs, tokens)
        n_layers = spec.layers[1] - spec.layers[0]
        scratch = torch.zeros((n_layers, 2, 1, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim),
                              dtype=self.kv_dtype, device=dev)
        slots = [i % self.block_size for i in range(tokens)]
        # Sequences of at most max_model_len tokens each, as the scheduler would send them, positions from 0.
        length = spec.max_model_len
        chunks = [(start, min(start + length, tokens), 0, [0]) for start in range(0, tokens, length)]
        meta = build_metadata(self.block_size, slots, [], [], chunks, dev)
        x = (torch.zeros(tokens, dtype=torch.int64, device=dev) if self.first
             else torch.zeros((tokens, self.cfg.hidden_size), dtype=self.dtype, device=dev))
        positions = torch.arange(tokens, device=dev) % length
        meter = PeakMemory(dev)
        with meter, torch.inference_mode():
            hidden = self.model.forward(x, positions, meta, scratch)
            if self.last:
                logits = self.model.logits(hidden[:rows])
                row = SamplingRow(SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1), [0], [], 0)
                self.sampler(logits, [row] * rows)
            del x, hidden
        self.model.take_expert_load()  # dummy tokens: not load to report
        return meter.peak_bytes

    def allocate(self, num_blocks: int) -> None:
        n_layers = self.spec.layers[1] - self.spec.layers[0]
        graphs = self._graphs_wanted()
        # Zeros, not empty: masked-out slots still enter the attention matmul, and garbage could be NaN. With
        # graphs, one block more, which padded rows write to and nothing reads.
        self.kv_cache = zeroed(
            (n_layers, 2, num_blocks + graphs, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim),
            self.kv_dtype, self.device,
        )
        if graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, num_blocks, self.block_size,
                                       -(-self.spec.max_model_len // self.block_size), self.spec.max_num_seqs,
                                       self.first, self.cfg.hidden_size, self.dtype)

    def _graphs_wanted(self) -> bool:
        """CUDA graphs for decode steps: on a GPU, unless the engine runs eagerly, where decodes attend on the
        Triton kernel (the padded tables a graph needs are then never gathered), and not where layers are copied in
        from host memory every step (a graph would replay one pass's slots and copies), nor for a mixture of experts
        (not yet captured: its experts may run on the host, or one product per expert the routing reaches), nor with
        a sliding window (whose decodes are gathered on a GPU)."""
        if (not (self.spec.cuda_graphs and self.device.type == "cuda") or self.spec.streamed_layers
                or self.cfg.num_experts or self.cfg.window_layers):
            return False
        probe_q = torch.empty((1, self.cfg.num_heads, self.cfg.head_dim), dtype=self.dtype, device=self.device)
        probe_cache = torch.empty((1, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim),
                                  dtype=self.kv_dtype, device=self.device)
        return triton_kernel.available(probe_q, probe_cache)

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
            self.prompt_lens.pop(seq_id, None)
        bs = self.block_size
        # Decodes first, so that batched attention calls cover them all, shortest context first, so that the rows
        # whose blocks are gathered together are alike in length (engine.model.attention.decode_groups).
        order = sorted(range(len(batch.seqs)),
                       key=lambda j: (len(batch.seqs[j].token_ids) != 1, batch.seqs[j].start_pos))
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
            if w.init is not None:
                self.prompt_lens[w.seq_id] = len(w.init.prompt_token_ids)
                if self.last:
                    self.rows[w.seq_id] = SamplingRow(w.init.params, w.init.prompt_token_ids, [], w.init.seed)
            start = len(token_ids)
            n = len(w.token_ids)
            token_ids.extend(w.token_ids)
            pos = range(w.start_pos, w.start_pos + n)
            offset = table_offset(self.cfg, self.prompt_lens.get(w.seq_id, 0), w.start_pos + n)
            positions.extend(range(w.start_pos + offset, w.start_pos + n + offset))  # rows of the rotary table
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
        # The step's inputs reach the device in one copy: the attention metadata, positions, token ids, sampled rows.
        meta = build_metadata(bs, slots, dec_tables, dec_lens, prefills, dev,
                              carry=(positions, token_ids if self.first else [], sample_rows))
        pos_t, ids_t, rows_t = meta.carry
        x = ids_t if self.first else hidden
        rows = [self.rows[s] for s in sample_ids] if self.last else []
        # The grammar rows' masks depend only on what they sampled before: they are computed while the layers run.
        masks = self._start_masks(rows) if rows else None
        with torch.inference_mode():
            hidden_out = None
            if self.graphs is not None and not prefills and on_layer is None:
                hidden_out = self.graphs.run(x, pos_t, meta)
            if hidden_out is None:
                hidden_out = self.model.forward(x, pos_t, meta, self.kv_cache, on_layer)
            if not self.last:
                return hidden_out, None, None
            if not sample_ids:
                return hidden_out, StepOutput(batch.batch_id, [], []), None
            logits = self.model.logits(hidden_out[rows_t])
            sampled, errors = self._sample(logits, rows, sample_ids, masks)
        for row, tok in zip(rows, sampled.token_ids):
            row.output_token_ids.append(tok)
        if masks is not None:
            errors = self._advance_grammars(rows, sampled.token_ids, sample_ids, errors)
        tokens = TokensForFirstStage(sample_ids, sample_pos, sampled.token_ids)
        if self.first:
            self.take_tokens(tokens)
            tokens = None
        out = StepOutput(batch.batch_id, sample_ids, sampled.token_ids, sampled.logprobs, sampled.top, errors=errors)
        return hidden_out, out, tokens

    def _start_masks(self, rows: list[SamplingRow]):
        """(the grammar rows' positions, their PendingMasks) where any row has a grammar, else None."""
        at = [i for i, row in enumerate(rows) if row.params.grammar is not None]
        if not at:
            return None
        if self.grammars is None:
            tokenizer = checkpoint_tokenizer(Path(self.spec.tokenizer_dir or self.spec.model_dir))
            if tokenizer is None:
                raise RuntimeError("structured output needs the checkpoint's tokenizer, and it has none")
            threads = 1 if self.device.type == "cpu" else min(GPU_GRAMMAR_THREADS, max(1, (os.cpu_count() or 1) // 2))
            self.grammars = GrammarMasks(tokenizer.to_json(), self.cfg.vocab_size,
                                         self.spec.stop_token_ids or stop_token_ids(self.cfg, tokenizer), threads)
        return at, self.grammars.start([rows[i] for i in at])

    def _advance_grammars(self, rows, tokens, seq_ids, errors):
        """Feed the sampled tokens to the rows' grammars; a grammar that refuses its token fails that request."""
        at = [i for i, row in enumerate(rows) if row.params.grammar is not None
              and row.matcher is not None and (errors is None or seq_ids[i] not in errors)]
        failed = GrammarMasks.advance([rows[i] for i in at], [tokens[i] for i in at])
        if not failed:
            return errors
        errors = dict(errors or {})
        for k, why in failed.items():
            errors[seq_ids[at[k]]] = f"the grammar refused the sampled token: {why}"
        return errors

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], seq_ids: list[int],
                masks=None) -> tuple[HostSamples, dict[int, str] | None]:
        """The batch's samples, and per sequence that could not be sampled, why. A failure is one request's, not
        the pipeline's: a row whose grammar failed is left out, and where sampling the rest fails they are sampled
        one by one. A row that fails gets token 0 (a step scheduled ahead of it computes that, and the driver drops
        it) and its error, which fails that request. masks: the grammar rows' positions and their PendingMasks."""
        errors: dict[int, str] = {}  # by row
        mask_of: dict[int, torch.Tensor] = {}
        if masks is not None:
            at, pending = masks
            try:
                bitmask, failed = pending.result()
            except Exception as e:  # the library itself failed: each grammar row's request fails, no other
                bitmask, failed = None, dict.fromkeys(range(len(at)), one_line(e))
            errors = {at[k]: f"the grammar failed: {why}" for k, why in failed.items()}
            if bitmask is not None:
                mask_of = {i: bitmask[k] for k, i in enumerate(at) if i not in errors}
        good = [i for i in range(len(rows)) if i not in errors]
        try:
            if not errors:
                return self._sample_together(logits, rows, good, mask_of), None
            samples = _by_row(self._sample_together(logits, rows, good, mask_of), good)
        except Exception as e:
            batch_error = e
            samples = {}
            for i in good:
                try:
                    samples.update(_by_row(self._sample_together(logits, rows, [i], mask_of), [i]))
                except Exception as e:
                    errors[i] = one_line(e)
            if len(good) > 1 and all(i in errors for i in good):
                raise batch_error  # not one request's parameters: the sampler itself fails, and the engine with it
            print(f"sampling a step of {len(rows)} rows failed ({one_line(batch_error)}); sampled apart, "
                  f"{len(errors)} failed", file=sys.stderr, flush=True)
        picked = [samples.get(i, (0, 0.0, [])) for i in range(len(rows))]
        return (HostSamples([p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked]),
                {seq_ids[i]: why for i, why in errors.items()} or None)

    def _sample_together(self, logits: torch.Tensor, rows: list[SamplingRow], which: list[int],
                          mask_of: dict[int, torch.Tensor]) -> HostSamples:
        """Rows `which` sampled together, with their grammars' masks."""
        if not which:
            return HostSamples([], None, None)
        sub = logits if len(which) == len(rows) else logits[torch.tensor(which, device=logits.device)]
        grammar = [k for k, i in enumerate(which) if i in mask_of]
        masks = (grammar, torch.stack([mask_of[which[k]] for k in grammar])) if grammar else None
        return self.sampler(sub, [rows[i] for i in which], masks).to_host()


def _by_row(samples: HostSamples, which: list[int]) -> dict[int, tuple[int, float, list]]:
    """{row: (token, logprob, top alternatives)} of rows `which`, sampled together."""
    return {i: (samples.token_ids[k], samples.logprobs[k] if samples.logprobs is not None else 0.0,
                samples.top[k] if samples.top is not None else []) for k, i in enumerate(which)}
