"""The engine loop: scheduler, driver and detokenizers, one step at a time.

Not thread-safe: one thread owns an LLMEngine (the offline API's caller, or the
gateway's engine thread) and calls add_request / abort_request / step.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from batching.batch import Batch, StepOutput, TraceContext
from batching.sampling_params import SamplingParams, check_token_ids
from batching.scheduler import Scheduler, SchedulerConfig, SeqUpdate
from batching.sequence import FinishReason, Sequence
from engine.errors import CheckpointError
from engine.model import checkpoint, package
from engine.model.config import DTYPES, ModelConfig
from engine.model.rope import long_rope
from engine.model.weight_formats import (AUTO, EMBEDDING, check_requested, dominant_quantized, layer_summary,
                                         parse_layer_formats, parse_precision)
from engine.outputs import SeqDelta, TokenLogprob
from engine.pipeline.driver import Driver
from engine.model.hub import TOKENIZER_FILES, resolve_model
from engine.pipeline.launch import LocalStages, rendezvous_address, stage_devices
from engine.pipeline.messages import RENDEZVOUS_TIMEOUT_S, DescribeDevice, StageSpec
from engine.placement import parse_size
from engine.placement import ModelCost, Plan, kv_cache_dtype, parse_devices, parse_layers, predict_stage_seconds
from engine.placement.devices import probe_note
from engine.placement.local_device import resolve_dtypes
from engine.placement.routing import measured_routing, record_routing
from engine.placement.planning import (check_offload_gb, chosen_formats, format_choices, model_len_limit,
                                       offload_bytes, place_model)
from engine.stats import EngineInfo, EngineStats, StageInfo, StageLoad
from engine.step_spans import RequestSteps, StepTrace
from telemetry.tracing import DETAILS, TraceSettings, Tracing, new_span_id, new_trace_id, now_ns
from tokenization import IncrementalDetokenizer, StopMatcher, Tokenizer

log = logging.getLogger("strata.engine")


@dataclass(slots=True)
class EngineConfig:
    model: str
    # auto: the checkpoint's on GPUs; on a CPU, fp32 activations over half-size weights (engine.placement.local_device.resolve_dtypes)
    dtype: str = "auto"
    # One stage per device, with optional memory budgets: "cuda:0=20GiB,cuda:1,cpu=8GiB"; "cpu,cpu" is two CPU stages.
    devices: str = "cpu"
    threads: int | None = None  # torch threads in each stage process; None: torch's default
    layers: list[int] | str | None = None  # layers per stage in --devices order, overriding the planner: "20,8,4"
    workers: int = 0  # stages on other hosts, joining with `strata worker` after the local ones
    rendezvous: str | None = None  # host:port the stages join at; None: loopback and a free port
    otlp_traces_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else tracing is off
    trace_detail: str = "request"  # request | step | layer
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 512 on CPU-only pipelines (a step stays short), else 2048
    max_model_len: int | None = None  # None: what the model supports
    kv_cache_memory: int | str | None = None  # bytes for KV; None: a share of free memory
    kv_cache_fraction: float = 0.9
    num_kv_blocks: int | None = None  # exact block count, overriding the memory budget
    enable_prefix_caching: bool = True
    rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S
    stall_timeout_s: float = 60.0  # the least a step may take before the pipeline counts as stalled
    enforce_eager: bool = False  # no CUDA graphs for GPU stages' decode steps
    # What the matrix products run at (engine.model.weight_formats): auto keeps what the checkpoint stores (a GGUF's
    # quantized tensors stay quantized), none dequantizes, a format quantizes at load; per layer: "0-3=bf16,4-29=q4_k".
    quantization: str = "auto"
    layer_quantization: str | None = None
    # The formats the planner may choose each layer to run at ("auto,q8_0,q4_k"; engine.placement.precision), and
    # the most error a layer may take at one (engine.model.calibration).
    precision: str | None = None
    max_layer_error: float | None = None
    # A folder a CPU stage may keep the layers its memory budget cannot hold in, reading them back every step; None:
    # every layer stays in memory.
    offload_dir: str | None = None
    # GiB of its layers each GPU stage may keep in pinned host memory, copied in every step (engine.model.host_stream).
    cpu_offload_gb: float = 0.0
    # Another tokenizer than the checkpoint's (a directory with tokenizer.json, a GGUF file or a Hugging Face id), and
    # another chat template (a file, or the template itself).
    tokenizer: str | None = None
    chat_template: str | None = None
    reprobe: bool = False  # measure each stage's device afresh instead of reading the probe cache

    # The fields stay as given; what they mean, in the engine's own terms, is read through these.
    @property
    def dtype_request(self) -> str:
        """auto, or the dtype's canonical name (bf16 -> bfloat16)."""
        return self.dtype if self.dtype == "auto" else DTYPES[self.dtype]

    @property
    def kv_cache_bytes(self) -> int | None:
        return parse_size(self.kv_cache_memory) if isinstance(self.kv_cache_memory, str) else self.kv_cache_memory

    @property
    def step_token_budget(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 512 if all(r.name == "cpu" for r in parse_devices(self.devices)) else 2048

    @property
    def layer_counts(self) -> list[int] | None:
        return parse_layers(self.layers) if isinstance(self.layers, str) else self.layers

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}")
        _ = self.kv_cache_bytes, self.layer_counts  # each raises on a value it cannot read
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        requests = parse_devices(self.devices)  # raises with a clear message
        gpus = [r.name for r in requests if r.name != "cpu"]
        if len(gpus) != len(set(gpus)):
            raise ValueError(f"devices {self.devices!r} name a GPU twice; each GPU holds one stage (only cpu may repeat)")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be positive, got {self.stall_timeout_s}")
        if self.workers < 0:
            raise ValueError(f"workers must be at least 0, got {self.workers}")
        check_requested(self.quantization)  # raises with the choices
        parse_precision(self.precision)
        check_offload_gb(self.cpu_offload_gb)
        if self.trace_detail not in DETAILS:
            raise ValueError(f"trace_detail must be one of {', '.join(DETAILS)}, got {self.trace_detail!r}")
        if self.rendezvous is not None:
            host, _, port = self.rendezvous.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rendezvous must be host:port, got {self.rendezvous!r}")


def read_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the template itself (as vLLM reads the flag); checked to compile."""
    from tokenization.chat_template import compile_template

    inline = "{{" in value or "{%" in value  # a template, not a path (which may be too long to ask about)
    if inline:
        text = value
    elif Path(value).expanduser().is_file():
        text = Path(value).expanduser().read_text()
    else:
        raise ValueError(f"chat template {value!r}: no such file (give a file, or the template itself)")
    try:
        compile_template(text)
    except Exception as e:  # jinja2's TemplateSyntaxError and what its environment raises
        raise ValueError(f"chat template {'(given inline)' if inline else value}: {e}") from None
    return text


class LLMEngine:
    def __init__(self, config: EngineConfig, started: LocalStages | None = None) -> None:
        """started: this host's stages, started ahead for this config (engine.pipeline.launch.start_ahead); the
        caller kills them where this raises before the pipeline takes them."""
        self.config = config
        model_dir = resolve_model(config.model)
        if not (model_dir.is_dir() or model_dir.suffix == ".gguf" and model_dir.is_file()):
            raise CheckpointError(f"{model_dir}: no such checkpoint directory or GGUF file")
        self.package = package.read_package(model_dir) if package.is_package(model_dir) else None
        if self.package is not None:
            package.check_request(self.package, config.devices, config.quantization, config.layer_quantization,
                                  config.layers, config.precision, config.max_layer_error)
            package.verify(self.package, self.package.files)
        self.model_config = cfg = ModelConfig.from_dir(model_dir)
        self.format_choices = None  # the formats the planner may choose per layer, where it may
        if self.package is not None:
            self.weight_formats = self.package.formats
        else:
            source = checkpoint.validate(model_dir, cfg)
            self.format_choices = choices = format_choices(
                model_dir, cfg, source, config.precision, config.max_layer_error, config.quantization,
                config.layer_quantization, say=log.warning)  # minutes on a large model: say so
            self.weight_formats = choices.formats[AUTO] if choices is not None else checkpoint.resolve_formats(
                source, cfg, check_requested(config.quantization),
                parse_layer_formats(config.layer_quantization, cfg.num_layers))
        # Where the tokenizer comes from (a last stage masking a grammar reads it too).
        self._tokenizer_dir = resolve_model(config.tokenizer, TOKENIZER_FILES) if config.tokenizer else model_dir
        self.tokenizer = checkpoint.checkpoint_tokenizer(self._tokenizer_dir)
        if config.tokenizer and self.tokenizer is None:
            raise CheckpointError(f"{config.tokenizer}: no tokenizer.json or GGUF file to read a tokenizer from")
        if config.chat_template is not None:
            if self.tokenizer is None:
                raise ValueError("a chat template needs a tokenizer, and this checkpoint has none: give --tokenizer")
            self.tokenizer.chat_template = read_chat_template(config.chat_template)
        limit = model_len_limit(cfg)
        max_len = config.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds what the model supports ({limit})")
        self.max_model_len = max_len
        self.eos_token_ids = checkpoint.stop_token_ids(cfg, self.tokenizer)
        settings = self.trace_settings = TraceSettings.from_env(config.otlp_traces_endpoint, config.trace_detail)
        self.tracing = Tracing(settings) if settings else None
        self._trace_steps = bool(settings and settings.covers("step"))
        self._step_traces: dict[int, StepTrace] = {}
        self._stage_spans_dropped: dict[int, int] = {}  # stage index -> spans its export queue has dropped
        self._model_dir = model_dir
        # A mixture's experts' shares as earlier servers of this checkpoint measured them (engine.placement.routing).
        self._routing = measured_routing(model_dir, cfg.num_layers, cfg.num_experts)[0] if cfg.num_experts else ()
        try:
            pipeline = self._start_pipeline(model_dir, max_len, started)
            self.driver, self.plan, num_blocks, self.dtype, self.weight_dtype = pipeline
        except BaseException:
            if self.tracing is not None:
                self.tracing.shutdown()
            raise
        # Each micro-batch with its successor scheduled ahead (batching.scheduler, lookahead).
        self.max_in_flight = 2 * len(self.plan.stages)
        if config.num_kv_blocks is not None and num_blocks < config.num_kv_blocks:
            self.shutdown()
            raise ValueError(f"num_kv_blocks={config.num_kv_blocks} does not fit the KV memory budget ({num_blocks} blocks)")
        self.stage_stats = [StageStats() for _ in self.plan.stages]
        # Tokens routed to each expert of each layer so far (a mixture of experts; no rows for a dense model).
        experts = cfg.num_experts
        self._expert_tokens = np.zeros((cfg.num_layers if experts else 0, experts), dtype=np.int64)
        self._expert_snapshot: np.ndarray | None = None
        try:
            self.scheduler = Scheduler(
                SchedulerConfig(
                    num_blocks=num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                    max_num_batched_tokens=config.step_token_budget, max_model_len=max_len,
                    enable_prefix_caching=config.enable_prefix_caching and not self._rotation_varies(max_len),
                    num_micro_batches=len(self.plan.stages),
                    lookahead=True,
                    # Blocks that have left the window go back only where every layer's attention slides.
                    sliding_window=cfg.sliding_window if len(cfg.window_layers) == cfg.num_layers else None,
                ),
                self.eos_token_ids,
            )
        except ValueError:
            self.shutdown()
            raise
        self._ids = itertools.count()
        self._streams: dict[int, _SeqStream] = {}

    def _start_pipeline(self, model_dir: Path, max_len: int,
                        started: LocalStages | None) -> tuple[Driver, Plan, int, str, str]:
        """Start the stage processes, ask each what its device is worth, place the layers, load and link. Returns
        the driver, the plan, the KV blocks and the first stage's activation and weight dtypes."""
        config, cfg = self.config, self.model_config
        host, port = rendezvous_address(config.rendezvous)
        driver = Driver(stage_devices(config.devices), config.threads, config.workers, host, port,
                        config.rendezvous_timeout_s, started)
        try:
            choices = self.format_choices
            ask = DescribeDevice(config.dtype_request, cfg.checkpoint_dtype, config.kv_cache_fraction,
                                 dominant_quantized(self.weight_formats, cfg), config.offload_dir,
                                 choices.probed if choices is not None else (), offload_bytes(config.cpu_offload_gb),
                                 bool(cfg.num_experts), config.reprobe)
            infos = driver.describe(ask)
            max_kv_tokens = (config.max_num_seqs * max_len if config.num_kv_blocks is None
                             else config.num_kv_blocks * config.block_size)
            plan, _, _ = place_model(cfg, self.weight_formats, infos, config.dtype_request, max_model_len=max_len,
                                     max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                                     layers=config.layer_counts, kv_cache_memory=config.kv_cache_bytes,
                                     max_kv_tokens=max_kv_tokens, packed=self.package, choices=choices,
                                     routing=self._routing)
            if choices is not None:
                self.weight_formats = chosen_formats(choices, plan, cfg)
            micro_batch = plan.batch_size
            ranks = [s.device_index + 1 for s in plan.stages]
            ring = [0, *ranks]
            cuda_ranks = [r for r, s in zip(ranks, plan.stages) if s.device.kind == "cuda"]
            # Frames of CPU links between stages hold the activations of the micro-batch planned for (4 bytes a value
            # at most), where small enough (engine.pipeline.transport).
            inline = micro_batch * cfg.hidden_size * 4
            specs, prev_dtype = [], None
            for k, (rank, st) in enumerate(zip(ranks, plan.stages)):
                compute, weights = resolve_dtypes(config.dtype_request, cfg.checkpoint_dtype,
                                                  torch.device(st.device.name))
                specs.append((rank, StageSpec(
                    stage_index=k, num_stages=len(ranks), ring=ring, cuda_ranks=cuda_ranks,
                    model_dir=str(model_dir.resolve()), layers=st.layers, dtype=compute, weight_dtype=weights,
                    input_dtype=prev_dtype or compute, block_size=config.block_size, max_model_len=max_len,
                    kv_cache_memory=config.kv_cache_bytes, kv_cache_fraction=config.kv_cache_fraction,
                    max_kv_tokens=max_kv_tokens, max_step_tokens=config.step_token_budget,
                    max_num_seqs=config.max_num_seqs, inline_bytes=inline, cuda_graphs=not config.enforce_eager,
                    formats=self.weight_formats, stop_token_ids=self.eos_token_ids,
                    trace=self.trace_settings if self._trace_steps else None,
                    streamed_layers=st.streamed_layers, offload_dir=config.offload_dir, host_experts=st.host_experts,
                    host_dtypes=(resolve_dtypes(config.dtype_request, cfg.checkpoint_dtype, torch.device("cpu"))
                                 if st.host_experts else None),
                    tokenizer_dir=str(self._tokenizer_dir.resolve()) if config.tokenizer else None,
                )))
                prev_dtype = compute
            info = driver.start(specs)
        except BaseException:
            driver.abandon()
            raise
        return driver, plan, info.num_blocks, specs[0][1].dtype, specs[0][1].weight_dtype

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    trace: tuple[int, int] | None = None) -> int:
        """trace: (trace id, span id) of the sampled span the request runs under; its steps link to it."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        check_token_ids(prompt_token_ids, vocab, "prompt", "prompt token id")  # ParamError is a ValueError
        params.check_vocab(vocab)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has no tokenizer.json")
        seq_id = next(self._ids)
        seq = Sequence(seq_id, list(prompt_token_ids), params)
        self.scheduler.add(seq)  # raises ValueError when the prompt does not fit the context
        self._streams[seq_id] = _SeqStream(self.tokenizer, params, trace)
        if trace is not None and self._trace_steps:
            self._streams[seq_id].steps = RequestSteps(trace, len(prompt_token_ids), seq_id)
        return seq_id

    def abort_request(self, seq_id: int) -> bool:
        seq = self.scheduler.abort(seq_id)
        self._end_stream(seq_id)
        return seq is not None

    def _end_stream(self, seq_id: int) -> None:
        """A sequence's stream is done: its decode span goes to its request's trace."""
        stream = self._streams.pop(seq_id, None)
        if stream is not None and stream.steps is not None and (span := stream.steps.finish()) is not None:
            self.tracing.emit([span])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ---------------------------------------------------------------------
    def step(self) -> list[SeqDelta]:
        """Keep the pipeline full, wait for the oldest step in flight and apply it."""
        self._fill_pipeline()
        if not self.scheduler.in_flight:
            return []
        out = self.driver.receive(self._stall_bound_s())
        received_ns = now_ns()
        for timing in out.timings:
            self.stage_stats[timing.stage].add(timing.seconds, timing.num_seqs)
            if timing.expert_load is not None:
                self._add_expert_load(timing.stage, timing.expert_load)
        step_trace = self._step_traces.pop(out.batch_id, None)
        if out.trace is not None:
            self._stage_spans_dropped.update(out.trace.spans_dropped)
        if step_trace is not None:
            spans = step_trace.spans(out, received_ns, self.driver.last_received_bytes)
            for w in step_trace.batch.seqs:  # what the step adds to the traces of the requests it carried
                st = self._streams.get(w.seq_id)
                if st is not None and st.steps is not None and (span := st.steps.on_step(w, step_trace, received_ns)):
                    spans.append(span)
            self.tracing.emit(spans)
        updates = self.scheduler.update(out)
        # Refill before detokenizing: the first stage is idle from now until the next batch reaches it.
        self._fill_pipeline()
        return self._deltas(out, updates)

    def _stall_bound_s(self) -> float:
        """How long the oldest step in flight may take before the pipeline counts as stalled: many times what the
        plan predicts for every step in flight, each scaled by its tokens, and never under the configured floor."""
        plan = self.plan
        ring_s = sum(s.predicted_s.get(plan.batch_size, plan.bottleneck_s) for s in plan.stages)
        tokens = sum(b.num_tokens for b in self.scheduler.in_flight.values())
        return max(self.config.stall_timeout_s, STALL_FACTOR * ring_s * max(1.0, tokens / max(plan.batch_size, 1)))

    def _fill_pipeline(self) -> None:
        while len(self.scheduler.in_flight) < self.max_in_flight:
            batch = self.scheduler.schedule()
            if batch is None:
                break
            if self._trace_steps:
                self._tag_step(batch)
            self.driver.submit(batch)

    def _tag_step(self, batch: Batch) -> None:
        """Trace this step if a sampled request rides in it."""
        links = [st.trace for w in batch.seqs if (st := self._streams.get(w.seq_id)) is not None and st.trace]
        if links:
            tr = StepTrace(new_trace_id(), new_span_id(), now_ns(), links, batch)
            batch.trace = TraceContext(tr.trace_id, tr.step_id, self.tracing.covers("layer"), "driver", tr.start_ns)
            self._step_traces[batch.batch_id] = tr

    def _deltas(self, out: StepOutput, updates: list[SeqUpdate]) -> list[SeqDelta]:
        deltas = []
        lp_index = {s: i for i, s in enumerate(out.seq_ids)} if out.logprobs is not None else None
        for u in updates:
            seq = u.seq
            stream = self._streams.get(seq.seq_id)
            if stream is None:
                continue
            queued = (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
            if out.errors and seq.seq_id in out.errors:
                # Its token is a placeholder: the sequence ends here, and so does its request (engine errors).
                self.scheduler.abort(seq.seq_id)
                self._end_stream(seq.seq_id)
                deltas.append(SeqDelta(seq.seq_id, "", [], None, True, FinishReason.ABORT.value, seq.num_prompt_tokens,
                                       len(seq.output_token_ids) - 1, seq.num_cached_tokens, queued,
                                       error=f"sampling failed: {out.errors[seq.seq_id]}"))
                continue
            token = u.new_token_ids[0]
            logprobs = None
            if seq.params.logprobs is not None and lp_index is not None:
                i = lp_index[seq.seq_id]
                top = out.top_logprobs[i][: seq.params.logprobs] if out.top_logprobs else []
                logprobs = [TokenLogprob(token, out.logprobs[i], top)]
            text, stopped = stream.add(token, u.finished)
            finished = u.finished
            reason = seq.finish_reason.value if finished else None
            if stopped and not finished:
                self.scheduler.abort(seq.seq_id, FinishReason.STOP)
                finished, reason = True, FinishReason.STOP.value
            if finished:
                self._end_stream(seq.seq_id)
            deltas.append(SeqDelta(
                seq.seq_id, text, [token], logprobs, finished, reason,
                seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens, queued,
            ))
        return deltas

    # ---- state ------------------------------------------------------------------------
    @property
    def kv_cache_usage(self) -> float:
        return self.scheduler.blocks.usage

    @property
    def idle(self) -> bool:
        """Nothing waiting, running or in flight: the caller may block until work comes."""
        return not self.scheduler.has_unfinished() and not self.scheduler.in_flight

    def info(self) -> EngineInfo:
        """What this engine is; fixed once it has started."""
        cfg, sched, plan = self.model_config, self.scheduler.config, self.plan
        procs = self.driver.procs
        stages = tuple(
            # Local stage processes are started in --devices order.
            StageInfo(k, st.device.name, st.device.label, st.device.kind, st.device.host, st.device.threads,
                      st.layers, procs[st.device_index].pid if st.device_index < len(procs) else None,
                      st.streamed_layers, st.host_experts, probe_note(st.device))
            for k, st in enumerate(plan.stages))
        head = EMBEDDING if cfg.tie_word_embeddings else "lm_head.weight"
        return EngineInfo(cfg.architecture, cfg.num_layers, self.dtype, self.weight_dtype,
                          kv_cache_dtype(self.dtype, self.weight_dtype), sched.num_blocks, sched.block_size,
                          self.max_model_len, plan.batch_size, plan.context_len, stages,
                          tuple(layer_summary(cfg, self.weight_formats, self.weight_dtype)),
                          self.weight_formats.get(head, self.weight_dtype))

    def _rotation_varies(self, max_len: int) -> bool:
        """Whether a token's keys depend on more than the tokens before it: with LongRoPE, on whether its sequence
        outgrows the original context (engine.model.rope.table_offset), which a prefix shared by a short and a long
        prompt does not say, so the prefix cache is off where a sequence can be that long."""
        original = long_rope(self.model_config)
        if original is not None and max_len > original:
            log.info("prefix caching off: sequences longer than %d tokens rotate at other frequencies", original)
            return True
        return False

    def _add_expert_load(self, stage: int, load: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        start, experts = self.plan.stages[stage].layers[0], self.model_config.num_experts
        where, counts = load
        np.add.at(self._expert_tokens.reshape(-1), np.asarray(where, dtype=np.int64) + start * experts, counts)
        self._expert_snapshot = None

    def stats(self) -> EngineStats:
        """A snapshot, for another thread to read."""
        sched, blocks = self.scheduler, self.scheduler.blocks
        if self._expert_snapshot is None:  # a copy a reader may keep: one memcpy, and only after new load
            self._expert_snapshot = self._expert_tokens.copy()
            self._expert_snapshot.flags.writeable = False
        return EngineStats(sched.num_running, sched.num_waiting, blocks.usage, sched.num_preemptions,
                           blocks.prefix_queries, blocks.prefix_hits, self.spans_dropped,
                           tuple(StageLoad(s.busy_s, s.steps, s.seqs) for s in self.stage_stats),
                           self._expert_snapshot)

    def predicted_step_s(self, stage: int, batch_size: int) -> float:
        """The planner's time for one step of `batch_size` sequences on a stage, to set beside the measured one."""
        plan = self.plan
        st = plan.stages[stage]
        if st.formats or st.streamed_layers or st.host_experts:
            # Priced by the planner per format and tier (engine.placement.precision): between the two batches it
            # priced, the step taken as affine in the batch.
            (b1, t1), (bn, tn) = sorted(st.predicted_s.items())[0], sorted(st.predicted_s.items())[-1]
            return t1 if bn == b1 else t1 + (max(1, batch_size) - b1) * (tn - t1) / (bn - b1)
        cost = ModelCost.from_config(self.model_config, self.dtype, self.weight_dtype, formats=self.weight_formats,
                                     layers=range(*st.layers), routing=self._routing)
        return predict_stage_seconds(cost, st.device, st.layers, stage == 0, stage == len(plan.stages) - 1,
                                     max(1, batch_size), plan.context_len)

    @property
    def spans_dropped(self) -> dict[str, int]:
        """Spans lost (a full export queue, a failed export) per process: "server" and "stage N"."""
        if self.tracing is None:
            return {}
        return {"server": self.tracing.dropped, **{f"stage {k}": n for k, n in self._stage_spans_dropped.items()}}

    def check_stages(self) -> None:
        """Raise EngineDeadError if a local stage process has exited."""
        self.driver.check_processes()

    def shutdown(self) -> None:
        try:
            self.driver.shutdown()
            if getattr(self, "_expert_tokens", None) is not None:
                record_routing(self._model_dir, self._expert_tokens)  # what the next plan of this checkpoint prices
        finally:
            if self.tracing is not None:
                self.tracing.shutdown()


# A step in flight may take this many times its predicted time before the pipeline counts as stalled.
STALL_FACTOR = 50.0


@dataclass(slots=True)
class StageStats:
    """What one stage's compute has cost so far (from the timings each batch brings back)."""

    busy_s: float = 0.0
    steps: int = 0
    seqs: int = 0  # sequences over all steps (their mean is the stage's batch size)
    last_step_s: float = 0.0

    def add(self, seconds: float, num_seqs: int) -> None:
        self.busy_s += seconds
        self.steps += 1
        self.seqs += num_seqs
        self.last_step_s = seconds


class _SeqStream:
    """Detokenizes one sequence and watches it for stop strings."""

    __slots__ = ("detok", "stop", "trace", "steps")

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, trace: tuple[int, int] | None) -> None:
        self.trace = trace
        self.steps: RequestSteps | None = None  # where steps are traced: what they add to the request's trace
        self.detok = (IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.kept_special_token_ids)
                      if tokenizer else None)
        self.stop = StopMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None

    def add(self, token: int, last: bool) -> tuple[str, bool]:
        if self.detok is None:
            return "", False
        text = self.detok.add(token)
        if last:
            text += self.detok.flush()
        if self.stop is None:
            return text, False
        text, stopped = self.stop.feed(text)
        if last and not stopped:
            text += self.stop.flush()
        return text, stopped
