"""A plan for people (a table) and for programs (JSON)."""
from __future__ import annotations

from dataclasses import asdict

from engine.placement.devices import tier_name
from engine.placement.plan import Plan

GiB = 1 << 30


def readable_size(n: float) -> str:
    """A size people can read: GiB, MiB or KiB, whichever keeps a digit that matters."""
    if abs(n) >= 0.05 * GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def plan_table(plan: Plan) -> str:
    """Per stage its device, layers, weights, the KV blocks it will allocate and predicted step times, then the
    bottleneck."""
    bs = plan.block_size
    b = plan.batch_size
    batches = sorted({1, b})
    streams = any(s.streamed_layers or s.host_experts for s in plan.stages)
    chosen = any(s.formats for s in plan.stages)
    head = ["stage", "device", "layers", *(["formats"] if chosen else []), "weights GiB",
            *(["off the device"] if streams else []),
            f"KV blocks ({bs} tok)", *(f"ms/step @{n}" for n in batches)]
    rows = []
    names = stage_device_names(plan)
    for k, s in enumerate(plan.stages):
        blocks = s.kv_blocks
        dev = f"{names[k]} ({s.device.label})"
        if s.device.host and len({x.device.host for x in plan.stages}) > 1:
            dev = f"{s.device.host}/{dev}"
        away = [f"{len(s.streamed_layers)} layers from {tier_name(s.device.kind)} each step, "
                f"{s.fetch_s[b] * 1e3:.0f} ms"] if s.streamed_layers else []
        if s.host_experts:
            away.append(f"experts of {len(s.host_experts)} layers on the host CPU")
        disk = ["; ".join(away) or "-"]
        formats = [_format_counts(s.formats)] if chosen else []
        rows.append([str(k), dev, f"{s.layers[0]}-{s.layers[1] - 1}", *formats, f"{s.weight_bytes / GiB:.2f}",
                     *(disk if streams else []), str(blocks), *(f"{s.predicted_s[n] * 1e3:.2f}" for n in batches)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    weights_col = 4 if chosen else 3
    right = {0, weights_col, *range(weights_col + (2 if streams else 1), len(head))}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    slowest = max(range(len(plan.stages)), key=lambda k: plan.stages[k].predicted_s[b])
    out = [line(head), *(line(r) for r in rows)]
    if any(s.streamed_layers for s in plan.stages):
        out.append("weights: what each stage holds in its memory; a stage that brings layers in holds two of them at "
                   "a time, and its step takes the longer of its compute and its reads")
    if any(s.host_experts for s in plan.stages):
        out.append("experts on the host CPU: those layers' routed experts stay in host memory and the host's cores "
                   "run them, the tokens' rows copied out and back")
    out.append(f"bottleneck: stage {slowest}, {plan.bottleneck_s * 1e3:.2f} ms/step at batch {b} and context "
               f"{plan.context_len} (about {b / plan.bottleneck_s:.0f} tokens/s with the pipeline full)")
    return "\n".join(out)


def stage_device_names(plan: Plan) -> list[str]:
    """Each stage's device told apart where one device serves several stages (cpu,cpu: `cpu#0 8.0 GiB`, `cpu#1 4.0
    GiB`, numbered in --devices order), with the memory the plan gave it; a device that serves one stage, its name."""
    count: dict[tuple[str, str], int] = {}
    for s in plan.stages:
        count[s.device.host, s.device.name] = count.get((s.device.host, s.device.name), 0) + 1
    seen: dict[tuple[str, str], int] = {}
    named: dict[int, str] = {}
    for s in sorted(plan.stages, key=lambda s: s.device_index):
        key = (s.device.host, s.device.name)
        if count[key] > 1:
            named[s.device_index] = f"{s.device.name}#{seen.get(key, 0)} {readable_size(s.device.memory)}"
            seen[key] = seen.get(key, 0) + 1
    return [named.get(s.device_index, s.device.name) for s in plan.stages]


def plan_json(plan: Plan) -> dict:
    """The plan for programs; a stage's layers are [first, last], as the table shows them."""
    b = plan.batch_size
    names = stage_device_names(plan)
    return {
        "batch_size": b, "context_len": plan.context_len, "block_size": plan.block_size,
        "kv_reserve_tokens": plan.kv_reserve_tokens, "num_kv_blocks": plan.num_kv_blocks,
        "bottleneck_s": plan.bottleneck_s,
        "stages": [
            {
                "stage": k, "device": s.device.name, "device_name": names[k], "device_index": s.device_index,
                "label": s.device.label, "host": s.device.host, "layers": [s.layers[0], s.layers[1] - 1],
                "weight_bytes": s.weight_bytes,
                "kv_bytes_per_token": s.kv_bytes_per_token, "kv_capacity_tokens": s.kv_capacity_tokens,
                "kv_blocks": s.kv_blocks, "streamed_layers": list(s.streamed_layers), "formats": list(s.formats),
                "host_experts": list(s.host_experts),
                "fetch_s": {str(n): v for n, v in s.fetch_s.items()},
                "predicted_s": {str(n): v for n, v in s.predicted_s.items()},
                "compute_s": {str(n): v for n, v in s.compute_s.items()},
                "transfer_s": {str(n): v for n, v in s.transfer_s.items()},
                "device_info": asdict(s.device),
            }
            for k, s in enumerate(plan.stages)
        ],
    }


def throughput(plan: Plan) -> float:
    """Tokens per second with the pipeline full: a micro-batch leaves the slowest stage each bottleneck."""
    return plan.batch_size / plan.bottleneck_s


def peer_table(ours: Plan, devices: list, peers: list) -> str:
    """Strata's plan beside other systems' splits of the same layers over the same devices (listed in the order
    given, as the others keep it; Strata's own order may differ), all priced by one cost model: layers per device,
    predicted tokens/s with the pipeline full, and Strata's ratio to each."""
    names = [f"{d.host}/{d.name}" if d.host else d.name for d in devices]
    ours_counts = {s.device_index: s.num_layers for s in ours.stages}
    rows = [["Strata", _counts([ours_counts.get(i, 0) for i in range(len(devices))]),
             f"{throughput(ours):.0f}", "1.00"]]
    for who, counts, priced in peers:
        if counts is None:
            rows.append([who, "cannot place the model", "-", "-"])
        elif priced is None:
            rows.append([who, _counts(counts), "does not fit", "-"])
        else:
            rows.append([who, _counts(counts), f"{throughput(priced):.0f}", f"{throughput(ours) / throughput(priced):.2f}"])
    head = ["split by", "layers per device (" + ", ".join(names) + ")", "tokens/s", "Strata's ratio"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    return "\n".join("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *rows])


def _format_counts(formats: tuple[str, ...]) -> str:
    """("auto", "q4_k", "q4_k") -> "1 auto, 2 q4_k" (the formats in the order they first appear)."""
    return ", ".join(f"{formats.count(f)} {f}" for f in dict.fromkeys(formats))


def _counts(counts: list[int]) -> str:
    return ", ".join(map(str, counts))

