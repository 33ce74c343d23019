"""Decode with most of a model's layers on disk: a ~1B-parameter Llama-shaped checkpoint served with a memory budget
of a third of its weights, the rest read back every step (--offload-dir), against the same model held in memory, the
bound the disk allows, and Accelerate's disk offload through transformers' generate under the same budget.

    python -m bench.offload [--batch 32] [--output-len 12] [--offload-dir /var/tmp/strata-offload]
                            [--precision auto,q8_0,q4_k]

Prints, for the same 32 prompts: the greedy tokens of the streamed run against the resident one (they must be
equal), decode tokens/s of each, the bound max(resident compute, streamed bytes / measured disk bandwidth) per step
and the streamed run's share of it. With --precision, the same budget with the planner choosing each layer's format
(engine.placement.precision): quantized layers may fit where bf16 ones are read from disk. Then Accelerate's decode
tokens/s with Strata's ratios, twice: unlimited (Accelerate reads its offloaded weights through memory maps, so they
stay in the page cache, memory beyond the budget), and, where the machine lets a memory cgroup be made (root, cgroup
v1), in one limited to the budget plus RUNTIME_SLACK, page cache included, so that they come from disk.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from batching import SamplingParams
from bench.checkpoints import llama_1b_shaped
from bench.offline import prompts_for
from engine import LLM
from engine.model.config import ModelConfig
from engine.placement.probe import disk_bandwidth


def strata_decode(model_dir, batch: int, prompt_len: int, output_len: int, threads: int | None, **options):
    """(greedy tokens per prompt, mean decode step seconds, the plan's streamed layers per stage, the formats it
    chose per layer)."""
    cfg = ModelConfig.from_dir(model_dir)
    prompts = prompts_for(batch, prompt_len, cfg.vocab_size)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    with LLM(model_dir, threads=threads, max_num_seqs=batch, max_model_len=prompt_len + output_len + 16,
             **options) as llm:
        eng = llm.engine
        for p in prompts:
            eng.add_request(p, params)
        steps, tokens = [], {}
        while eng.has_unfinished():
            start = time.perf_counter()
            for out in eng.step():
                tokens.setdefault(out.seq_id, []).extend(out.token_ids)
            steps.append(time.perf_counter() - start)
        streamed = [len(s.streamed_layers) for s in eng.plan.stages]
        formats = [f for s in eng.plan.stages for f in s.formats]
    decode = steps[2:] if len(steps) > 4 else steps
    return [tokens[k] for k in sorted(tokens)], sum(decode) / len(decode), streamed, formats


def accelerate_decode(model_dir, batch: int, prompt_len: int, output_len: int, budget: int, folder: str,
                      cgroup: str | None = None) -> float:
    """Mean decode step seconds of transformers' generate with Accelerate's device map under max_memory={"cpu":
    budget}: what does not fit goes to disk (offload_folder), brought back module by module for every step, read
    through memory maps (so from the page cache, where the process may use memory beyond the budget). cgroup: a
    memory cgroup the process joins once loaded (loading holds the whole model in memory; it would not load inside
    one), after dropping the offloaded files' pages, so that what it reads from then on counts against the limit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=folder).eval()
    on_disk = sum(1 for v in model.hf_device_map.values() if v == "disk")
    print(f"  Accelerate's device map: {on_disk} of {len(model.hf_device_map)} modules on disk", flush=True)
    if cgroup is not None:
        import gc

        gc.collect()
        os.sync()
        for p in Path(folder).rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    cfg = ModelConfig.from_dir(model_dir)
    ids = torch.tensor(prompts_for(batch, prompt_len, cfg.vocab_size))

    def run(new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    run(1)  # the first call pays for set-up
    first = min(run(1), run(1))  # prefill and one token
    return (min(run(1 + output_len), run(1 + output_len)) - first) / output_len


# The memory a limited process may use beyond the budget: the Python and torch runtime, transformers and the step's
# activations (Strata's stage keeps to its budget plus 48 MiB of slack: tests/test_offload.py).
RUNTIME_SLACK = 1 << 30
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def memory_cgroup(limit: int) -> Path | None:
    """A new cgroup (v1 memory controller) whose processes, page cache included, may use `limit` bytes; None where
    this machine does not let one be made."""
    path = CGROUP_V1 / f"strata-bench-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        return path
    except OSError:
        return None


def accelerate_in_child(model_dir, args, budget: int, folder: str, cgroup: Path | None) -> float:
    """accelerate_decode in a process of its own, inside `cgroup` once loaded where given: its offloaded weights
    then come from disk, not from memory beyond the budget."""
    import json
    import sys

    child = [sys.executable, "-m", "bench.offload", "--accelerate-child",
             json.dumps([str(model_dir), args.batch, args.prompt_len, args.accelerate_output_len, budget, folder,
                         None if cgroup is None else str(cgroup)])]
    done = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)
    *lines, last = done.stdout.strip().splitlines()
    print("\n".join(lines), flush=True)
    return float(last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--offload-dir", default=None, help="default: a new folder under /var/tmp")
    ap.add_argument("--accelerate-output-len", type=int, default=4, help="decode steps timed for Accelerate")
    ap.add_argument("--precision", default="auto,q8_0,q4_k",
                    help="also serve under the same budget with the planner choosing each layer's format from these "
                         "('' to skip)")
    ap.add_argument("--accelerate-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.accelerate_child:
        import json

        print(accelerate_decode(*json.loads(args.accelerate_child)))
        return
    folder = args.offload_dir or tempfile.mkdtemp(prefix="strata-offload-", dir="/var/tmp")
    model_dir = llama_1b_shaped()
    cfg = ModelConfig.from_dir(model_dir)
    weights = cfg.layer_weight_bytes(2) * cfg.num_layers + 2 * 2 * cfg.vocab_size * cfg.hidden_size
    budget = weights // 3
    print(f"model: {model_dir} ({weights / 1e9:.2f} GB of bf16 weights, {cfg.num_layers} layers); budget "
          f"{budget / 1e9:.2f} GB; offload folder {folder}")
    bandwidth = disk_bandwidth(folder)
    print(f"disk: {bandwidth / 1e9:.2f} GB/s of direct reads (measured)")
    shape = (args.batch, args.prompt_len, args.output_len, args.threads)

    want, resident_s, _, _ = strata_decode(model_dir, *shape)
    got, streamed_s, streamed, _ = strata_decode(model_dir, *shape, devices=f"cpu={budget}", offload_dir=folder)
    read = sum(streamed) * cfg.layer_weight_bytes(2)
    bound_s = max(resident_s, read / bandwidth)
    print(f"greedy tokens, streamed against resident: {'identical' if got == want else 'DIFFERENT'} "
          f"({args.batch} prompts x {args.output_len} tokens)")
    print(f"resident: {args.batch / resident_s:.1f} tokens/s ({resident_s * 1e3:.0f} ms/step)")
    print(f"streamed ({sum(streamed)} of {cfg.num_layers} layers from disk, {read / 1e9:.2f} GB a step): "
          f"{args.batch / streamed_s:.1f} tokens/s ({streamed_s * 1e3:.0f} ms/step)")
    print(f"bound max(compute, read / disk bandwidth): {args.batch / bound_s:.1f} tokens/s ({bound_s * 1e3:.0f} "
          f"ms/step); the streamed run reaches {bound_s / streamed_s:.0%} of it")
    if args.precision:
        mixed, mixed_s, mixed_streamed, formats = strata_decode(model_dir, *shape, devices=f"cpu={budget}",
                                                                offload_dir=folder, precision=args.precision)
        counts = ", ".join(f"{formats.count(f)} {f}" for f in dict.fromkeys(formats))
        same = sum(a == b for x, y in zip(mixed, want) for a, b in zip(x, y)) / sum(len(x) for x in want)
        print(f"--precision {args.precision} under the same budget ({counts}; {sum(mixed_streamed)} layers from "
              f"disk): {args.batch / mixed_s:.1f} tokens/s ({mixed_s * 1e3:.0f} ms/step), "
              f"{mixed_s and streamed_s / mixed_s:.1f}x the bf16 streamed run; greedy tokens equal to bf16's: "
              f"{same:.0%} (fewer bits, other weights: python -m bench.precision measures what that costs)")
    cgroup = memory_cgroup(budget + RUNTIME_SLACK)
    if cgroup is None:
        print("(no memory cgroup can be made here: Accelerate runs unlimited only, its offloaded weights in the page "
              "cache)")
    try:
        for group in (None, cgroup) if cgroup is not None else (None,):
            how = ("unlimited: its offloaded weights stay in the page cache, memory beyond the budget" if group is None
                   else f"joining, once loaded, a memory cgroup of the budget plus {RUNTIME_SLACK >> 20} MiB, page "
                        "cache included, so its offloaded weights come from disk")
            with tempfile.TemporaryDirectory(prefix="accelerate-offload-", dir=folder) as acc_folder:
                try:
                    acc_s = accelerate_in_child(model_dir, args, budget, acc_folder, group)
                except subprocess.CalledProcessError as e:
                    if group is None or e.returncode != -signal.SIGKILL:
                        raise
                    peak = int((group / "memory.max_usage_in_bytes").read_text())
                    print(f"Accelerate disk offload ({how}): killed by the out-of-memory killer at the limit (it had "
                          f"{peak / 2**30:.2f} GiB charged, page cache included): it does not run within the budget")
                    continue
            print(f"Accelerate disk offload (transformers generate, bf16; {how}): {args.batch / acc_s:.2f} "
                  f"tokens/s ({acc_s * 1e3:.0f} ms/step); Strata streamed: {acc_s / streamed_s:.1f}x"
                  + (f", with --precision: {acc_s / mixed_s:.1f}x" if args.precision else ""))
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    print("rerun: python -m bench.offload" + (f" --precision {args.precision}" if args.precision else ""))


if __name__ == "__main__":
    main()
