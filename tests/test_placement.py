"""The placement planner: exact splits, memory limits, clear errors, and `strata plan`."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import re

import pytest
import torch

from engine.placement import (
    DeviceInfo,
    GiB,
    ModelCost,
    PlacementError,
    distinct_orders,
    link_between,
    parse_devices,
    plan,
    plan_json,
    plan_table,
    stage_fits,
    stage_seconds,
    stage_weight_bytes,
)
from engine.placement.cost import (Tier, kv_cache_blocks, layers_to_stream, stage_kv_budget,
                                   stage_kv_bytes_per_token, stream_choice, stream_tier)
from engine.placement.precision import MixedStages, Precision
from engine.placement.search import _Context

MiB = 1 << 20


def device(name: str = "cpu", *, memory: int = 8 * GiB, flops: float = 1e11, bw: float = 2e10, op: float = 2e-6,
           host: str = "h", **kw) -> DeviceInfo:
    kind = "cuda" if name.startswith("cuda") else "cpu"
    return DeviceInfo(name=name, kind=kind, host=host, label=kw.pop("label", kind.upper()), memory=memory,
                      matmul_flops=flops, mem_bandwidth=bw, op_overhead_s=op, **kw)


def model(layers: int = 8, *, hidden: int = 512, params: int = 3_000_000, vocab: int = 8000, tied: bool = False,
          compute: str = "float32", weights: str = "float32") -> ModelCost:
    return ModelCost(num_layers=layers, hidden_size=hidden, vocab_size=vocab, layer_params=params,
                     layer_out_features=4 * hidden, kv_elems_per_token=hidden // 2,
                     elementwise_elems_per_token=40 * hidden, fused_elementwise_elems_per_token=16 * hidden,
                     embed_params=vocab * hidden, head_params=vocab * hidden + hidden, tied_embeddings=tied,
                     compute_dtype=compute, weight_dtype=weights)


def compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(cost, devices, batch, context, reserve, block_size=16):
    """Every order and every contiguous split, through the same per-stage cost: (best bottleneck, all plans)."""
    plans = []
    for order in itertools.permutations(range(len(devices))):
        for split in compositions(cost.num_layers, len(devices)):
            worst, blocks = 0.0, math.inf
            for k, (i, n) in enumerate(zip(order, split)):
                first, last = k == 0, k == len(order) - 1
                if not stage_fits(cost, devices[i], n, first, last, reserve):
                    worst = math.inf
                    break
                prev = devices[order[k - 1]] if k else None
                t = stage_seconds(cost, devices[i], n, first=first, last=last, batch=batch, context_len=context,
                                  link=link_between(prev, devices[i]), block_size=block_size)
                worst = max(worst, t.total_s)
                budget = stage_kv_budget(devices[i], stage_weight_bytes(cost, n, first, last), None)
                per_block = stage_kv_bytes_per_token(cost, devices[i], n) * block_size
                blocks = min(blocks, kv_cache_blocks(budget, per_block, reserve, block_size))
            if worst < math.inf:
                plans.append((worst, blocks))
    return min((w for w, _ in plans), default=math.inf), plans


def random_instance(rng: random.Random):
    layers = rng.randint(1, 8)
    cost = model(layers, hidden=rng.choice([256, 512, 1024]), params=rng.randint(1, 20) * 1_000_000,
                 vocab=rng.choice([1000, 8000, 32000]), tied=rng.random() < 0.5,
                 weights=rng.choice(["float32", "bfloat16"]))
    per_layer = cost.layer_weight_bytes
    pool = []
    for _ in range(rng.randint(1, min(4, layers))):
        if pool and rng.random() < 0.3:
            pool.append(pool[-1])  # an identical device, to exercise the deduplication
            continue
        name = rng.choice(["cpu", "cuda:0", "cuda:1"])
        pool.append(device(
            name, memory=int(per_layer * rng.uniform(0.5, layers + 2)) + cost.embed_bytes * rng.randint(0, 2),
            flops=10 ** rng.uniform(10, 12.5), bw=10 ** rng.uniform(9, 11.5), op=10 ** rng.uniform(-6, -4.5),
            host=rng.choice(["a", "b"]), thin_matmul_flops=rng.choice([None, 1e10]),
            small_gemm_flops=rng.choice([None, 2e10]),
            attention_bandwidth=rng.choice([None, 3e9]), row_overhead_s=rng.choice([0.0, 1e-8]),
            dtype=rng.choice([None, "bfloat16"]),
        ))
    return cost, pool, rng.choice([1, 2, 8, 64]), rng.choice([1, 17, 512]), rng.choice([0, 16, 256])


def exact_plan_equals(best: float, cost, devices, batch, context, reserve):
    """The planner's exact plan (no tolerance), whose bottleneck must be brute force's best; where nothing fits, the
    planner must refuse (then None)."""
    if best == math.inf:
        with pytest.raises(PlacementError):
            plan(cost, devices, batch_size=batch, context_len=context, kv_reserve_tokens=reserve)
        return None
    exact = plan(cost, devices, batch_size=batch, context_len=context, kv_reserve_tokens=reserve, tolerance=0.0)
    assert exact.bottleneck_s == pytest.approx(best, rel=1e-12)
    return exact


@pytest.mark.parametrize("seed", range(8))
def test_dynamic_program_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(30):
        cost, devices, batch, context, reserve = random_instance(rng)
        best, plans = brute_force(cost, devices, batch, context, reserve)
        exact = exact_plan_equals(best, cost, devices, batch, context, reserve)
        if exact is None:
            continue
        # The default keeps within 2% of the best and, among those, the largest smallest KV allocation.
        chosen = plan(cost, devices, batch_size=batch, context_len=context, kv_reserve_tokens=reserve)
        assert chosen.bottleneck_s <= best * 1.02 * (1 + 1e-12)
        assert chosen.num_kv_blocks == max(b for w, b in plans if w <= best * 1.02 * (1 + 1e-12))
        for p in (exact, chosen):
            assert sorted(s.device_index for s in p.stages) == list(range(len(devices)))
            assert [s.layers[0] for s in p.stages] == [0] + [s.layers[1] for s in p.stages[:-1]]
            assert p.stages[-1].layers[1] == cost.num_layers
            for k, s in enumerate(p.stages):
                assert s.num_layers >= 1
                assert s.weight_bytes + reserve * s.kv_bytes_per_token <= s.device.memory
                assert s.kv_capacity_tokens >= reserve
                assert s.weight_bytes == stage_weight_bytes(cost, s.num_layers, k == 0, k == len(p.stages) - 1)


def brute_force_with_disk(cost, devices, batch, context, reserve):
    """Every order, every contiguous split and every count of layers each stage streams (from disk on a CPU with a
    disk tier, from host memory on a GPU with a host tier, as much as the tier holds), through the same per-stage
    cost: the best bottleneck."""
    best = math.inf
    for order in itertools.permutations(range(len(devices))):
        for split in compositions(cost.num_layers, len(devices)):
            choices = []
            for k, (i, n) in enumerate(zip(order, split)):
                first, last = k == 0, k == len(order) - 1
                d = devices[i]
                prev = devices[order[k - 1]] if k else None
                times = [stage_seconds(cost, d, n, first=first, last=last, batch=batch, context_len=context,
                                       link=link_between(prev, d), streamed=s).total_s
                         for s in range(n + 1 if stream_tier(d) else 1)
                         if stage_fits(cost, d, n, first, last, reserve, streamed=s)
                         and (not s or s * cost.layer_weight_bytes <= stream_tier(d).capacity)]
                choices.append(times)
            for pick in itertools.product(*choices):
                best = min(best, max(pick))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dynamic_program_with_a_disk_tier_matches_brute_force(seed):
    """A CPU with a disk tier, or a GPU with a host tier, may hold a stage bigger than its memory, bringing some
    layers in each step: the search stays exact, streams the fewest layers that make each stage fit (no more than
    its tier holds), and keeps every stage within its memory."""
    rng = random.Random(1000 + seed)
    for _ in range(25):
        cost, devices, batch, context, reserve = random_instance(rng)
        for d in devices:
            if d.kind == "cpu" and rng.random() < 0.7:
                d.disk_bandwidth = 10 ** rng.uniform(8.5, 10)
            elif d.kind == "cuda" and rng.random() < 0.7:
                d.host_bandwidth = 10 ** rng.uniform(9.5, 10.7)
                d.host_tier_bytes = int(cost.layer_weight_bytes * rng.uniform(0.5, 6))
        best = brute_force_with_disk(cost, devices, batch, context, reserve)
        exact = exact_plan_equals(best, cost, devices, batch, context, reserve)
        if exact is None:
            continue
        for k, s in enumerate(exact.stages):
            first, last = k == 0, k == len(exact.stages) - 1
            streamed = len(s.streamed_layers)
            assert not streamed or stream_tier(s.device)
            assert streamed * cost.layer_weight_bytes <= (stream_tier(s.device).capacity if streamed else 0)
            assert all(s.layers[0] <= i < s.layers[1] for i in s.streamed_layers)
            assert len(set(s.streamed_layers)) == streamed
            assert s.weight_bytes == stage_weight_bytes(cost, s.num_layers, first, last, streamed)
            assert s.weight_bytes + reserve * s.kv_bytes_per_token <= s.device.memory
            assert not any(stage_fits(cost, s.device, s.num_layers, first, last, reserve, streamed=fewer)
                           for fewer in range(streamed))


def random_precision(rng: random.Random, cost: ModelCost, devices: list[DeviceInfo]) -> Precision:
    """Formats auto (the checkpoint's), q8_0 and q4_k, each with its own product rates per device, and per-layer
    errors that grow with fewer bits, under a bound that lets some layers go lower than others."""
    names = ["auto", "q8_0", "q4_k"][: rng.choice([2, 3])]
    costs = {"auto": cost, "q8_0": dataclasses.replace(cost, layer_bits=8.5),
             "q4_k": dataclasses.replace(cost, layer_bits=4.5)}
    for d in devices:
        d.format_rates = {f: (10 ** rng.uniform(10, 12.5), rng.choice([None, 10 ** rng.uniform(9.5, 11)]))
                          for f in names[1:] if rng.random() < 0.8}
    errors = {"auto": [0.0] * cost.num_layers}
    for f in names[1:]:
        errors[f] = [e + rng.uniform(0, 0.01) for e in errors[names[names.index(f) - 1]]]
    measured = sorted(e for f in names[1:] for e in errors[f])
    bound = rng.choice([None, measured[len(measured) // 3], measured[len(measured) // 2]])
    return Precision.build({f: costs[f] for f in names}, errors, bound)


def precision_figures(prec: Precision, devices, batch, context, reserve, order, split, formats, max_kv_tokens):
    """Each stage's Mix for one order, split and format per layer (None where a stage does not fit)."""
    ctx = _Context(prec.base_cost, devices, batch, context, reserve, None, 16, max_kv_tokens, None)
    stages = MixedStages(ctx, prec)
    mixes, start = [], 0
    for k, (i, n) in enumerate(zip(order, split)):
        counts = tuple(sum(1 for f in formats[start:start + n] if f == j) for j in range(len(prec.names)))
        mixes.append(stages.figures(i, counts, k == 0, k == len(order) - 1, order[k - 1] if k else None, batch))
        start += n
    return mixes


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_program_with_formats_per_layer_matches_brute_force(seed):
    """With a format to choose per layer (and tiers on some devices), the search's bottleneck is brute force's
    best over every order, split and format per layer within each layer's bound; the plan it returns keeps within
    the tolerance and gives each stage the least summed error of any assignment of its layers that keeps to it."""
    rng = random.Random(2000 + seed)
    for _ in range(12):
        cost, devices, batch, context, reserve = random_instance(rng)
        if cost.num_layers > 6:
            cost = dataclasses.replace(cost, num_layers=rng.randint(1, 6))
        if len(devices) > cost.num_layers:
            devices = devices[: cost.num_layers]
        cost = dataclasses.replace(cost, weight_dtype="bfloat16")
        for d in devices:
            d.memory = int(d.memory * rng.uniform(0.3, 1.0))  # tighter: fewer bits or the disk make it fit
            if d.kind == "cpu" and rng.random() < 0.5:
                d.disk_bandwidth = 10 ** rng.uniform(8.5, 10)
            elif d.kind == "cuda" and rng.random() < 0.5:
                d.host_bandwidth = 10 ** rng.uniform(9.5, 10.7)
                d.host_tier_bytes = int(cost.layer_weight_bytes * rng.uniform(0.5, 6))
        prec = random_precision(rng, cost, devices)
        max_kv = reserve * rng.choice([1, 4, 64])  # beyond the reserve, stages' KV allocations differ
        L, P = cost.num_layers, len(devices)
        allowed = [range(f + 1) for f in prec.floors]
        every = []  # the bottleneck of every plan that fits
        for order in itertools.permutations(range(P)):
            for split in compositions(L, P):
                for formats in itertools.product(*allowed):
                    mixes = precision_figures(prec, devices, batch, context, reserve, order, split, formats, max_kv)
                    if all(m is not None for m in mixes):
                        every.append(max(m.time.total_s for m in mixes))
        best = min(every, default=math.inf)
        kw = dict(batch_size=batch, context_len=context, kv_reserve_tokens=reserve, precision=prec,
                  max_kv_tokens=max_kv)
        if best == math.inf:
            with pytest.raises(PlacementError):
                plan(cost, devices, **kw)
            continue
        assert plan(cost, devices, tolerance=0.0, **kw).bottleneck_s == pytest.approx(best, rel=1e-12)
        chosen = plan(cost, devices, **kw)
        limit = best * 1.02
        assert chosen.bottleneck_s <= limit * (1 + 1e-12)
        order = [s.device_index for s in chosen.stages]
        for k, s in enumerate(chosen.stages):
            layers = range(*s.layers)
            picked = [prec.names.index(f) for f in s.formats]
            assert len(picked) == s.num_layers and all(j in allowed[i] for i, j in zip(layers, picked))
            best_error = math.inf
            for formats in itertools.product(*(allowed[i] for i in layers)):
                mix = precision_figures(prec, devices, batch, context, reserve, [order[k]], [s.num_layers],
                                        formats, max_kv)[0] if P == 1 else None
                if P > 1:  # the stage as it sits in the pipeline: first, last and the link in as chosen
                    ctx = _Context(cost, devices, batch, context, reserve, None, 16, max_kv, None)
                    counts = tuple(formats.count(j) for j in range(len(prec.names)))
                    mix = MixedStages(ctx, prec).figures(order[k], counts, k == 0, k == P - 1,
                                                         order[k - 1] if k else None, batch)
                if mix is not None and mix.time.total_s <= limit * (1 + 1e-12):
                    best_error = min(best_error, sum(prec.errors[i][j] for i, j in zip(layers, formats)))
            assert sum(prec.errors[i][j] for i, j in zip(layers, picked)) == pytest.approx(best_error, abs=1e-12)
            assert s.weight_bytes + reserve * s.kv_bytes_per_token <= s.device.memory


def test_a_stage_of_mixed_formats_streams_the_fewest_bytes_that_fit():
    """Layers of two sizes (a bf16 layer of 2 MB, ten q4 layers of 0.5 MB): streaming the small ones reads less and
    needs smaller slots than streaming the big one first."""
    tier = Tier("host", 1e10, math.inf)
    assert stream_choice((1, 10), (2_000_000, 500_000), 7_000_000, tier) == (0, 0)  # fits as it is
    assert stream_choice((1, 10), (2_000_000, 500_000), 6_450_000, tier) == (0, 4)
    assert stream_choice((1, 10), (2_000_000, 500_000), 3_500_000, tier) == (0, 9)
    assert stream_choice((1, 10), (2_000_000, 500_000), 3_400_000, tier) == (0, 10)
    assert stream_choice((1, 10), (2_000_000, 500_000), 2_900_000, tier) is None
    assert stream_choice((1, 10), (2_000_000, 500_000), 6_450_000, None) is None  # no tier
    assert stream_choice((1, 10), (2_000_000, 500_000), 6_450_000, Tier("host", 1e10, 1_000_000)) is None  # too small


def test_one_format_per_layer_prices_a_stage_as_the_plain_cost_model_does():
    """A stage whose layers all take the checkpoint's format costs what the one-format cost model says: its step,
    its memory and the layers it reads from disk."""
    rng = random.Random(7)
    for _ in range(40):
        cost, devices, batch, context, reserve = random_instance(rng)
        for d in devices:
            d.disk_bandwidth = 10 ** rng.uniform(8.5, 10) if d.kind == "cpu" and rng.random() < 0.5 else None
            if d.kind == "cuda" and rng.random() < 0.5:
                d.host_bandwidth, d.host_tier_bytes = 1e10, int(cost.layer_weight_bytes * rng.uniform(0.5, 6))
        prec = Precision.build({"auto": cost, "q4_k": dataclasses.replace(cost, layer_bits=4.5)}, None, None)
        ctx = _Context(cost, devices, batch, context, reserve, None, 16, reserve, None)
        stages = MixedStages(ctx, prec)
        for n in range(1, cost.num_layers + 1):
            for first, last in ((True, True), (True, False), (False, True), (False, False)):
                d = devices[0]
                mix = stages.figures(0, (n, 0), first, last, None, batch)
                streamed = layers_to_stream(cost, d, n, first, last, reserve)
                assert (mix is None) == (streamed is None)
                if mix is None:
                    continue
                plain = stage_seconds(cost, d, n, first=first, last=last, batch=batch, context_len=context,
                                      link=link_between(None, d), streamed=streamed)
                assert mix.time.total_s == pytest.approx(plain.total_s, rel=1e-12)
                assert sum(mix.streamed) == streamed
                assert mix.weight_bytes == stage_weight_bytes(cost, n, first, last, streamed)


def test_a_cpu_stage_streams_what_its_budget_cannot_hold():
    cost = model(12)
    budget = 4 * cost.layer_weight_bytes + cost.embed_bytes + cost.head_bytes + 64 * 12 * cost.kv_bytes_per_token
    cpu = device("cpu", memory=budget, budgeted=True)
    with pytest.raises(PlacementError, match="--offload-dir"):
        plan(cost, [cpu], kv_reserve_tokens=64)
    cpu.disk_bandwidth = 1e9
    p = plan(cost, [cpu], kv_reserve_tokens=64, batch_size=8)
    (stage,) = p.stages
    assert len(stage.streamed_layers) == 10  # 12 layers, 4 held: 2 slots, 2 resident
    assert stage.streamed_layers[-1] == 11
    assert stage.fetch_s[8] == pytest.approx(10 * cost.layer_weight_bytes / 1e9)
    assert stage.predicted_s[8] >= stage.fetch_s[8]


def test_memory_limits_hold_and_a_small_device_gets_fewer_layers():
    cost = model(32)
    per_layer = cost.layer_weight_bytes + 1024 * cost.kv_bytes_per_token
    small = device("cuda:0", memory=10 * per_layer + cost.head_bytes)  # room for 10 layers, first or last
    big = device("cuda:1", memory=100 * per_layer)
    p = plan(cost, [small, big], kv_reserve_tokens=1024)
    by_name = {s.device.name: s for s in p.stages}
    assert by_name["cuda:0"].num_layers < by_name["cuda:1"].num_layers
    assert by_name["cuda:0"].num_layers <= 10
    for s in p.stages:
        assert s.weight_bytes + 1024 * s.kv_bytes_per_token <= s.device.memory


def test_a_slower_device_gets_fewer_layers():
    cost = model(32)
    fast = device("cuda:0", flops=4e12, bw=8e11, op=5e-6)
    slow = device("cuda:1", flops=1e12, bw=2e11, op=5e-6)
    p = plan(cost, [slow, fast], kv_reserve_tokens=256)
    by_name = {s.device.name: s.num_layers for s in p.stages}
    assert by_name["cuda:1"] < by_name["cuda:0"]
    assert sum(by_name.values()) == 32


def test_identical_devices_are_interchangeable():
    devs = [device("cuda:0"), device("cuda:1"), device("cuda:2"), device("cpu", flops=1e10)]
    orders = distinct_orders(devs)
    assert len(orders) == 4  # only where the CPU goes matters
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # Same figures but another host: no longer interchangeable.
    assert len(distinct_orders([device("cuda:0"), device("cuda:0", host="other")])) == 2


def test_impossible_fit_says_how_much_is_missing():
    cost = model(30, params=40_000_000)
    need = stage_weight_bytes(cost, 30, True, True) + 2048 * 30 * cost.kv_bytes_per_token
    held = need - int(1.3 * GiB)
    devs = [device("cuda:0", memory=held // 2), device("cuda:1", memory=held - held // 2)]
    with pytest.raises(PlacementError) as e:
        plan(cost, devs, kv_reserve_tokens=2048)
    msg = str(e.value)
    assert "does not fit" in msg and "2048 tokens" in msg
    short = re.search(r"\(([\d.]+) (GiB|MiB) short\)", msg)
    assert short
    missing = float(short.group(1)) * (GiB if short.group(2) == "GiB" else MiB)
    assert missing == pytest.approx(1.3 * GiB, rel=0.05)


def test_device_too_small_for_one_layer_is_named():
    cost = model(8)
    with pytest.raises(PlacementError, match=r"cuda:1 .* less than one layer"):
        plan(cost, [device("cuda:0"), device("cuda:1", memory=cost.layer_weight_bytes // 2)], kv_reserve_tokens=16)


def test_given_split_is_evaluated_and_an_overflow_names_the_stage():
    cost = model(8)
    devs = [device("cuda:0"), device("cpu", memory=3 * cost.layer_weight_bytes + cost.head_bytes)]
    p = plan(cost, devs, kv_reserve_tokens=0, layers=[5, 3])
    assert [s.layers for s in p.stages] == [(0, 5), (5, 8)]
    assert [s.device.name for s in p.stages] == ["cuda:0", "cpu"]
    with pytest.raises(PlacementError, match=r"stage 1 \(cpu\) does not fit: layers 4-7 .* short\)"):
        plan(cost, devs, kv_reserve_tokens=0, layers=[4, 4])
    with pytest.raises(PlacementError, match="adds up to 9"):
        plan(cost, devs, kv_reserve_tokens=0, layers=[5, 4])
    with pytest.raises(PlacementError, match="2 devices"):
        plan(cost, devs, kv_reserve_tokens=0, layers=[8])


def test_more_devices_than_layers_is_an_error():
    with pytest.raises(PlacementError, match="3 devices but the model has only 2 layers"):
        plan(model(2), [device("cpu")] * 3, kv_reserve_tokens=0)


def test_tied_embeddings_are_held_by_first_and_last_stage():
    cost = model(4, tied=True)
    one = stage_weight_bytes(cost, 4, True, True)
    assert one == (4 * cost.layer_params + cost.head_params) * 4
    assert stage_weight_bytes(cost, 2, True, False) + stage_weight_bytes(cost, 2, False, True) == one + cost.embed_bytes


def test_links():
    a, b = device("cuda:0"), device("cuda:1")
    assert link_between(a, b).bandwidth == pytest.approx(20e9)
    assert link_between(a, device("cuda:0", host="x")).bandwidth == pytest.approx(1.25e9)
    assert link_between(a, device("cpu")).bandwidth < link_between(device("cpu"), device("cpu")).bandwidth
    assert link_between(None, a).bandwidth == math.inf  # the driver sends only a small message
    assert link_between(a, b, {("cuda:1", "cuda:0"): 300e9}).bandwidth == 300e9
    assert link_between(a, b, 5e9).bandwidth == 5e9


def test_plan_table_and_json():
    cost = model(8)
    p = plan(cost, [device("cuda:0", label="NVIDIA H200"), device("cpu", flops=1e10)], kv_reserve_tokens=64,
             batch_size=32, context_len=128)
    lines = plan_table(p).splitlines()
    assert "ms/step @32" in lines[0] and len(lines) == 1 + 2 + 1
    assert "cuda:0 (NVIDIA H200)" in plan_table(p)
    data = json.loads(json.dumps(plan_json(p)))
    assert [s["layers"] for s in data["stages"]] == [[s.layers[0], s.layers[1] - 1] for s in p.stages]
    assert set(data["stages"][0]["predicted_s"]) == {"1", "32"}
    assert data["bottleneck_s"] == pytest.approx(max(s.predicted_s[32] for s in p.stages))


def test_model_cost_from_config_counts_a_llama_layer():
    from engine.model.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(
        architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=8192, tie_word_embeddings=True,
        torch_dtype="bfloat16"))
    cost = ModelCost.from_config(cfg, "float32", "bfloat16")
    assert cost.layer_params == 576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536 + 2 * 576
    assert cost.layer_weight_bytes == 2 * cost.layer_params
    assert cost.kv_bytes_per_token == 2 * 192 * 2  # bf16 KV under fp32 activations over bf16 weights
    assert ModelCost.from_config(cfg, "float32", "float32").kv_bytes_per_token == 2 * 192 * 4
    assert ModelCost.from_config(cfg, "float16", "float16").kv_bytes_per_token == 2 * 192 * 2
    assert cost.flops_per_token == 2 * cost.layer_params
    assert cost.activation_bytes == 576 * 4
    assert cost.head_flops == 2 * (8192 * 576 + 576)
    with pytest.raises(ValueError, match="sampling"):
        ModelCost.from_config(cfg, "float32", "bfloat16", sampling="beam")


def test_a_mixture_of_experts_costs_its_memory_in_every_expert_and_its_step_in_those_reached():
    from engine.model.config import ModelConfig
    from engine.placement.cost import layer_seconds

    raw = dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=8192, moe_intermediate_size=256,
               num_experts=64, num_experts_per_tok=8, mlp_only_layers=[0], torch_dtype="bfloat16")
    cfg = ModelConfig.from_dict(raw)
    assert sorted(cfg.moe_layers) == [1, 2, 3]
    attn = 512 * (512 + 2 * 128) + 512 * 512 + 2 * 512 + 2 * 64
    expert = 3 * 512 * 256
    dense, moe = attn + 3 * 512 * 1024, attn + 64 * expert + 64 * 512
    cost = ModelCost.from_config(cfg, "float32", "bfloat16")
    assert cost.layer_params == (dense + 3 * moe) // 4
    assert cost.experts_reached(1) == pytest.approx(8)
    assert 8 < cost.experts_reached(4) < 32 and cost.experts_reached(256) == pytest.approx(64)
    read, per_token = cost.step_params(1)
    assert read == pytest.approx(per_token) and per_token == pytest.approx((dense + 3 * (moe - 56 * expert)) / 4)
    assert cost.step_params(512)[0] == pytest.approx(cost.layer_params)
    # A step with few tokens reads a fraction of the layer: faster than a dense layer of the same weights.
    dev = device(bw=1e10, flops=1e12)
    as_dense = dataclasses.replace(cost, num_experts=0)
    assert layer_seconds(cost, dev, 1, 64) < 0.5 * layer_seconds(as_dense, dev, 1, 64)


# Qwen3-30B-A3B's shape (48 layers, 128 experts, top 8), its layers cut where a test says.
QWEN3_MOE_SHAPED = dict(
    architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, moe_intermediate_size=768,
    num_experts=128, num_experts_per_tok=8, torch_dtype="bfloat16", max_position_embeddings=4096)


def qwen3_moe_shaped(layers: int = 24):
    from engine.model.config import ModelConfig

    return ModelConfig.from_dict({**QWEN3_MOE_SHAPED, "num_hidden_layers": layers})


def test_a_gpu_keeps_the_experts_it_cannot_hold_on_its_host_and_the_host_cpu_runs_them():
    """Attention, the router and the KV cache stay on the GPU; the routed experts of as few layers as the GPU needs to
    fit stay in host memory (within --cpu-offload-gb), run by the host's CPU; a GPU without host memory given streams
    no experts and does not fit; a cluster's GPU gets its host's CPU."""
    from engine.placement.cost import expert_layers_to_host, stage_seconds

    cfg = qwen3_moe_shaped()
    cost = ModelCost.from_config(cfg, "bfloat16", "bfloat16")
    assert cost.moe_layers == tuple(range(24)) and cost.expert_layer_bytes == 128 * 3 * 2048 * 768 * 2
    everything = stage_weight_bytes(cost, 24, True, True)
    cpu = device("cpu", memory=64 * GiB, flops=1e12, bw=5e10, op=3e-6, dtype="float32")
    gpu = device("cuda:0", memory=everything // 2, flops=4e14, bw=2e12, op=5e-6, host_tier_bytes=64 * GiB,
                 host_bandwidth=2.5e10, host_cpu=cpu)
    host = expert_layers_to_host(cost, gpu, 24, True, True, 4096)
    assert 0 < host < 24
    assert not stage_fits(cost, gpu, 24, True, True, 4096, host_experts=host - 1)
    result = plan(cost, [gpu], batch_size=32, context_len=512, kv_reserve_tokens=4096)
    (stage,) = result.stages
    assert stage.host_experts == tuple(range(host)) and stage.streamed_layers == ()
    assert stage.weight_bytes == everything - host * cost.expert_layer_bytes <= gpu.memory
    # The step pays the host's products and the copies out and back: slower than all on the GPU, and by more at 32
    # tokens (more experts reached) than at 1.
    on_gpu = {b: stage_seconds(cost, gpu, 24, first=True, last=True, batch=b, context_len=512, link=None).total_s
              for b in (1, 32)}
    assert all(stage.predicted_s[b] > on_gpu[b] for b in (1, 32))
    assert stage.predicted_s[32] - on_gpu[32] > stage.predicted_s[1] - on_gpu[1]
    text = plan_table(result)
    assert f"experts of {host} layers on the host CPU" in text
    assert plan_json(result)["stages"][0]["host_experts"] == list(range(host))
    # Where copying whole layers in would be faster (a slow host CPU, a fast bus), the layers are copied in instead.
    slow_cpu = dataclasses.replace(cpu, matmul_flops=1e9, mem_bandwidth=1e8)
    fast_bus = dataclasses.replace(gpu, host_cpu=slow_cpu, host_bandwidth=1e13)
    (streams,) = plan(cost, [fast_bus], batch_size=32, context_len=512, kv_reserve_tokens=4096).stages
    assert streams.streamed_layers and not streams.host_experts
    # Two GPUs of one host that may both run experts there share its CPU's rates.
    from engine.placement.devices import share_host_cpus

    pair = [dataclasses.replace(gpu), dataclasses.replace(gpu, name="cuda:1")]
    share_host_cpus(pair)
    assert [d.host_cpu.matmul_flops for d in pair] == [cpu.matmul_flops / 2] * 2
    # Host memory bounds it: what --cpu-offload-gb gives cannot hold the experts the GPU cannot.
    small = dataclasses.replace(gpu, host_tier_bytes=(host - 1) * cost.expert_layer_bytes)
    assert expert_layers_to_host(cost, small, 24, True, True, 4096) is None
    with pytest.raises(PlacementError):
        plan(cost, [dataclasses.replace(small, host_bandwidth=None, host_tier_bytes=0)], batch_size=32,
             context_len=512, kv_reserve_tokens=4096)
    # A dense model never moves anything to the host CPU.
    assert expert_layers_to_host(model(), gpu, 8, True, True, 4096) == 0
    # Devices alike but for their host CPU are not interchangeable.
    assert gpu.interchangeable() != dataclasses.replace(gpu, host_cpu=None).interchangeable()


def test_a_described_clusters_gpu_runs_the_experts_it_cannot_hold_on_its_hosts_cpu(tmp_path):
    from engine.placement.planning import plan_here

    model_dir = tmp_path / "moe"
    model_dir.mkdir()
    raw = json.loads(json.dumps(QWEN3_MOE_SHAPED))
    (model_dir / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 8}))
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[host]]\nname = "a"\ngpus = [{model = "RTX 3090", memory = "8GiB"}]\n')
    with pytest.raises(PlacementError):
        plan_here(model_dir, "", cluster=cluster, max_model_len=1024)
    here = plan_here(model_dir, "", cluster=cluster, max_model_len=1024, cpu_offload_gb=32)
    assert here.devices[0].host_cpu is None  # the file lists no CPU on host a: layers stream over PCIe instead
    assert here.plan.stages[0].streamed_layers and not here.plan.stages[0].host_experts
    gpu_and_cpu = ('[[host]]\nname = "a"\ngpus = [{model = "RTX 3090", memory = "8GiB"}]\n'
                   'cpu = {memory = "64GiB", bandwidth = "80GB/s", flops = 1.5e12%s}\n')
    cluster.write_text(gpu_and_cpu % ", stage = false")  # the host's CPU described, no stage on it
    here = plan_here(model_dir, "", cluster=cluster, max_model_len=1024, cpu_offload_gb=32)
    (gpu,) = here.devices
    assert gpu.host_cpu.memory == 32 * GiB and gpu.host_cpu.mem_bandwidth == 80e9
    (stage,) = here.plan.stages
    assert stage.host_experts and not stage.streamed_layers
    # A CPU stage on that host keeps its cores busy: the GPU runs no experts there, and the CPU stage takes layers.
    cluster.write_text(gpu_and_cpu % "")
    here = plan_here(model_dir, "", cluster=cluster, max_model_len=1024, cpu_offload_gb=32)
    assert all(d.host_cpu is None for d in here.devices) and not any(s.host_experts for s in here.plan.stages)
@pytest.mark.parametrize("text, expected", [
    ("cpu", [("cpu", None)]),
    ("cuda", [("cuda:0", None)]),
    ("cuda:0=20GiB, cuda:1,cpu=8GiB", [("cuda:0", 20 * GiB), ("cuda:1", None), ("cpu", 8 * GiB)]),
    ("cpu,cpu", [("cpu", None), ("cpu", None)]),
    ("CUDA:2=512MiB", [("cuda:2", 512 * MiB)]),
])
def test_parse_devices(text, expected):
    assert [(r.name, r.memory) for r in parse_devices(text)] == expected


@pytest.mark.parametrize("text, message", [
    ("tpu:0", "cannot read 'tpu:0'; use cpu or cuda:N, optionally =SIZE"),
    ("cuda:0,", "empty entry"),
    ("cpu:1", "the host CPU is just 'cpu'"),
    ("cuda:0=lots", "cannot read size 'lots'"),
    ("cuda:0=", "a size must follow '='"),
    ("", "no devices given"),
])
def test_parse_devices_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_devices(text)


@pytest.mark.parametrize("kernel, native, expected", [
    (True, True, ("float32", "bfloat16")),  # the engine's kernels beat torch's native bf16 decode path
    (True, False, ("float32", "bfloat16")),
    (False, True, ("bfloat16", "bfloat16")),
    (False, False, ("float32", "bfloat16")),  # torch emulates bf16: fp32 activations over half-size weights
])
def test_auto_dtype_on_a_cpu(monkeypatch, kernel, native, expected):
    from engine.placement import local_device as device

    monkeypatch.setattr(device, "product_path", lambda *a: "half-kernel" if kernel else "upcast")
    monkeypatch.setattr(device, "cpu_has_fast_half", lambda dtype: native)
    assert device.resolve_dtypes("auto", "bfloat16", torch.device("cpu")) == expected
    assert device.resolve_dtypes("auto", "float32", torch.device("cpu")) == ("float32", "float32")
    assert device.resolve_dtypes("bfloat16", "bfloat16", torch.device("cpu")) == ("bfloat16", "bfloat16")
    assert device.resolve_dtypes("auto", "bfloat16", torch.device("cuda:0")) == ("bfloat16", "bfloat16")


# ---- the probe's cache and override (no real probing) -----------------------------------------------------------


PROFILE = {"cpu": {"matmul_flops": 5e10, "mem_bandwidth": 1.5e10, "op_overhead_s": 2e-6,
                   "thin_matmul_flops": 1e10, "attention_bandwidth": 2.5e9}}


def test_device_profile_override_wins(tmp_path, monkeypatch):
    from engine.placement import DeviceRequest, probe

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    monkeypatch.setenv("STRATA_DEVICE_PROFILE", str(path))
    monkeypatch.setattr(probe, "_measure", lambda *a: pytest.fail("probed despite the override"))
    info = probe.describe_device(DeviceRequest("cpu", 3 * GiB), "float32", 2, weight_dtype="bfloat16")
    assert (info.matmul_flops, info.mem_bandwidth, info.op_overhead_s) == (5e10, 1.5e10, 2e-6)
    assert info.memory == 3 * GiB and info.threads == 2 and info.label == "CPU, 2 threads"


def test_probe_working_set_outgrows_the_last_level_cache(monkeypatch):
    """The probe streams weights and KV from memory, as a stage does: twice the last-level cache, within bounds."""
    import torch

    from engine.placement import probe

    cpu = torch.device("cpu")
    llc = probe.last_level_cache_bytes()
    assert llc is None or llc >= 1 << 20  # the largest level the kernel reports, where it reports any
    low, high = probe._CPU_WORKING_SET_BYTES
    monkeypatch.setattr(probe, "available_memory", lambda device: 64 * GiB)
    for reported, want in ((None, low), (8 << 20, low), (96 << 20, 192 << 20), (480 << 20, high)):
        monkeypatch.setattr(probe, "last_level_cache_bytes", lambda cpu=0, r=reported: r)
        assert probe.working_set_bytes(cpu) == want
    monkeypatch.setattr(probe, "available_memory", lambda device: 1 * GiB)  # a small machine keeps its memory
    assert probe.working_set_bytes(cpu) == 128 << 20


def test_probe_results_are_cached_per_threads_and_dtype(tmp_path, monkeypatch):
    from engine.placement import probe

    monkeypatch.delenv("STRATA_DEVICE_PROFILE", raising=False)
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    calls = []

    def fake(device, dtype, weight_dtype, weight_format=None):
        calls.append((str(dtype), str(weight_dtype)))
        return {"matmul_flops": 1e10 * len(calls), "mem_bandwidth": 1e10, "op_overhead_s": 1e-6,
                "thin_matmul_flops": None, "row_overhead_s": 0.0, "attention_bandwidth": 1e9}

    monkeypatch.setattr(probe, "_measure", fake)
    first = probe.probe_rates("cpu", "float32", 1)
    assert probe.probe_rates("cpu", "float32", 1) == first and len(calls) == 1
    probe.probe_rates("cpu", "float32", 2)
    probe.probe_rates("cpu", "float32", 1, "bfloat16")
    assert len(calls) == 3
    probe.probe_rates("cpu", "float32", 1, "bfloat16", weight_format="q4_k")  # quantized products: timed apart
    assert len(calls) == 4
    assert (tmp_path / "probe.json").is_file()


def test_the_probe_times_quantized_products_through_the_engine_s_product(monkeypatch):
    from engine.model.linear import QuantLinear
    from engine.placement import probe

    formats = []

    class Counted(QuantLinear):
        __slots__ = ()

        def __call__(self, x):
            formats.append(self.weight.fmt.name)
            return super().__call__(x)

    monkeypatch.setattr(probe, "QuantLinear", Counted)
    rates = probe.measure_rates(torch.device("cpu"), "float32", 1, None, weight_format="q4_k")
    assert set(formats) == {"q4_k"}
    assert rates["matmul_flops"] > 0 and rates["small_gemm_flops"] > 0


# ---- strata plan --------------------------------------------------------------------------------------------------


@pytest.fixture
def plan_env(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    monkeypatch.setenv("STRATA_DEVICE_PROFILE", str(path))
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path):
    """The planner reads only config.json: a tiny Llama's, as tests/tiny_models.py writes them, without the weights."""
    out = tmp_path / "tiny-llama"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, torch_dtype="float32")))
    return out


def plan_args(*argv: str) -> argparse.Namespace:
    from gateway.plan_command import add_plan_parser

    parser = argparse.ArgumentParser(prog="strata")
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_strata_plan_prints_one_row_per_stage(plan_env, model_dir, capsys):
    from gateway.plan_command import run_plan

    assert run_plan(plan_args("--model", str(model_dir), "--devices", "cpu=1GiB,cpu=1GiB,cpu=1GiB")) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("stage"))
    rows = [line for line in lines[header + 1:] if re.match(r"\s*\d+\s", line)]
    assert len(rows) == 3
    assert [re.search(r"\s(\d+-\d+)\s", r).group(1) for r in rows] == ["0-0", "1-1", "2-2"]  # 3 layers, 3 CPUs


def test_strata_plan_json(plan_env, model_dir, capsys):
    from gateway.plan_command import run_plan

    args = plan_args("--model", str(model_dir), "--devices", "cpu=2GiB,cpu=1GiB", "--layers", "2,1", "--json",
                     "--max-num-seqs", "16", "--max-model-len", "256")
    assert run_plan(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in data["stages"]] == [[0, 1], [2, 2]]  # first and last, as the table shows
    assert [s["device_name"] for s in data["stages"]] == ["cpu#0 2.0 GiB", "cpu#1 1.0 GiB"]
    # Sixteen sequences in two micro-batches; KV blocks for all of them at full length, and no more.
    assert data["batch_size"] == 8 and data["kv_reserve_tokens"] == 256
    assert [s["kv_blocks"] for s in data["stages"]] == [16 * 256 // 16] * 2 and data["num_kv_blocks"] == 256
    assert set(data["stages"][1]["predicted_s"]) == {"1", "8"}


def test_strata_plan_reports_a_misfit_in_one_line(plan_env, model_dir, capsys):
    from gateway.plan_command import run_plan

    assert run_plan(plan_args("--model", str(model_dir), "--devices", "cpu=100KiB")) == 1
    err = capsys.readouterr().err
    assert err.startswith("strata plan: ") and err.count("\n") == 1
    assert "short" in err or "less than one layer" in err
    assert run_plan(plan_args("--model", str(model_dir), "--devices", "tpu")) == 2
    assert "cannot read 'tpu'" in capsys.readouterr().err


def test_strata_plan_prints_the_plan_strata_serve_runs(llama_dir):
    """One function builds both: the same split, batch, context, KV reserve, and the KV blocks each stage allocates."""
    from engine import LLM
    from engine.placement.planning import plan_here

    options = dict(threads=1, max_model_len=96, max_num_seqs=6)
    printed = plan_here(llama_dir, "cpu,cpu", **options).plan
    with LLM(llama_dir, devices="cpu,cpu", **options) as llm:
        ran = llm.engine.plan
        allocated = llm.engine.scheduler.config.num_blocks
    assert [s.layers for s in ran.stages] == [s.layers for s in printed.stages]
    assert (ran.batch_size, ran.context_len, ran.kv_reserve_tokens) == (3, 96, 96)
    assert (printed.batch_size, printed.context_len, printed.kv_reserve_tokens) == (3, 96, 96)
    assert [s.kv_blocks for s in ran.stages] == [s.kv_blocks for s in printed.stages] == [36, 36]
    assert allocated == printed.num_kv_blocks == 36



# ---- strata plan --cluster -----------------------------------------------------------------------------------------


CLUSTER = """
network = "10GbE"

[[host]]
name = "a"
gpus = ["A100-80GB", {model = "RTX 3090", memory = "20GiB"}]
gpu_link = "NVLink"

[[host]]
name = "b"
cpu = {memory = "64GiB", bandwidth = "80GB/s"}
"""


def test_a_cluster_file_describes_devices_and_links(tmp_path):
    from engine.placement.cluster import GPU_OP_OVERHEAD_S, KNOWN_GPUS, LINKS, read_cluster

    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER)
    cluster = read_cluster(path, "bfloat16", memory_fraction=0.5)
    a100, rtx, cpu = cluster.devices
    assert (a100.name, a100.host, a100.memory, a100.dtype) == ("cuda:0", "a", 40 * GiB, "bfloat16")
    assert a100.mem_bandwidth == pytest.approx(0.85 * KNOWN_GPUS["A100-80GB"].bandwidth)
    assert (rtx.name, rtx.memory, rtx.op_overhead_s) == ("cuda:1", 10 * GiB, GPU_OP_OVERHEAD_S)
    assert (cpu.kind, cpu.host, cpu.memory, cpu.mem_bandwidth) == ("cpu", "b", 64 * GiB, 80e9)
    path.write_text("[[host]]\ngpus = ['T4']")
    (t4,) = read_cluster(path, "bfloat16").devices
    assert t4.dtype == "float16"  # no bf16 on a T4
    assert cluster.link_bandwidth(a100, rtx) == LINKS["NVLink"]
    assert cluster.link_bandwidth(rtx, cpu) == LINKS["10GbE"]
    assert link_between(a100, rtx, cluster.link_bandwidth).bandwidth == LINKS["NVLink"]


@pytest.mark.parametrize("text,says", [
    ("[[host]]\ngpus = ['Z80']", "unknown GPU 'Z80'"),
    ("[[host]]\ngpus = []", "no devices"),
    ("network = 'carrier pigeon'\n[[host]]\ngpus = ['T4']", "network"),
    ("[[host]]\ngpus = ['T4']\nspeed = 3", "unknown keys speed"),
    ("[[host]]\ncpu = {cores = 4}", "memory"),
    ("host = ['a']", "must be a table"),
    ("[[host]]\ncpu = {memory = 16}", "size"),
    ("[[host]]\ncpu = {memory = '-1GiB'}", "size"),
    ("[[host]]\ncpu = {memory = '4GiB', flops = 0}", "flops"),
    ("[[host]]\ncpu = {memory = '4GiB', flops = [1]}", "flops"),
    ("network = true\n[[host]]\ngpus = ['T4']", "network"),
    ("[[host]]\ngpus = 'T4'", "gpus must be a list"),
    ("hosts = 1", "unknown keys hosts"),
    ("[[host", "cluster.toml"),
])
def test_a_bad_cluster_file_is_refused_saying_where(tmp_path, text, says):
    from engine.placement.cluster import ClusterError, read_cluster

    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ClusterError, match=re.escape(says)):
        read_cluster(path)


def test_strata_plan_on_a_cluster_prints_the_others_splits_beside_its_own(model_dir, tmp_path, capsys):
    from gateway.plan_command import run_plan

    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER)
    assert run_plan(plan_args("--model", str(model_dir), "--cluster", str(path), "--max-model-len", "256")) == 0
    out = capsys.readouterr().out
    for who in ("Strata", "Accelerate", "exo", "llama.cpp", "vLLM"):
        assert who in out
    assert run_plan(plan_args("--model", str(model_dir), "--cluster", str(path), "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["stages"]) == 3 and len(data["peers"]) == 4 and data["tokens_per_s"] > 0


def test_beyond_what_can_be_enumerated_each_hosts_devices_stay_together():
    """Eight distinct devices on three hosts: too many orders to try, so each host's devices go together and the
    pipeline crosses each host boundary once."""
    devices = [device(f"cuda:{i}", host=f"h{i % 3}", flops=1e12 * (i + 1), bw=1e11 * (i + 1), memory=4 * GiB)
               for i in range(8)]
    assert distinct_orders(devices) is None
    p = plan(model(32), devices, kv_reserve_tokens=16, link_bandwidth=1e9)
    hosts = [s.device.host for s in p.stages]
    crossings = sum(a != b for a, b in zip(hosts, hosts[1:]))
    assert crossings == 2 and sorted(s.device_index for s in p.stages) == list(range(8))


def test_a_kv_cache_budget_must_fit_beside_the_weights():
    """A stage allocates all of --kv-cache-memory: a plan that leaves less room is refused, as the stage would fail."""
    cost, d = model(4), device("cuda:0", memory=1 * GiB)
    assert plan(cost, [d], kv_reserve_tokens=16).stages[0].kv_blocks > 0
    with pytest.raises(PlacementError, match="KV cache budget"):
        plan(cost, [d], kv_reserve_tokens=16, layers=[4], kv_cache_memory=1 * GiB)


def test_strata_plan_refuses_more_kv_blocks_than_fit_as_serve_does(plan_env, model_dir, capsys):
    from gateway.plan_command import run_plan

    assert run_plan(plan_args("--model", str(model_dir), "--devices", "cpu=1GiB", "--num-kv-blocks", "100000000")) == 2
    assert "does not fit the KV memory budget" in capsys.readouterr().err


def test_a_measured_routing_spread_prices_the_experts_a_step_reaches(tmp_path, monkeypatch):
    """Skewed routing reaches fewer experts at a batch than uniform routing (one token always reaches its k); a
    server's counts add up per checkpoint, and layers measured too little, or counts of another shape, are not used."""
    import numpy as np

    from engine.placement.routing import MIN_CHOICES_PER_EXPERT, measured_routing, record_routing

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    cfg = qwen3_moe_shaped(4)
    uniform = ModelCost.from_config(cfg, "bfloat16", "bfloat16")
    skewed = ModelCost.from_config(cfg, "bfloat16", "bfloat16", routing=tuple([0.5 / 8] * 8 + [0.5 / 120] * 120))
    assert skewed.experts_reached(1) == pytest.approx(8) == uniform.experts_reached(1)
    assert skewed.experts_reached(32) < 0.8 * uniform.experts_reached(32)
    assert ModelCost.from_config(cfg, "bfloat16", "bfloat16", routing=(1.0,)).routing == ()  # not this model's
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert measured_routing(model_dir, 4, 128) == ((), 0)
    counts = np.zeros((4, 128), dtype=np.int64)
    counts[1, :8] = MIN_CHOICES_PER_EXPERT * 16  # layer 1: 8 experts take every choice
    counts[2, 0] = 1  # layer 2: measured too little
    record_routing(model_dir, counts)
    record_routing(model_dir, counts)
    shares, routed = measured_routing(model_dir, 4, 128)
    assert routed == 2 * 8 * MIN_CHOICES_PER_EXPERT * 16 and shares[:8] == (1 / 8,) * 8 and sum(shares[8:]) == 0
    assert measured_routing(model_dir, 4, 64) == ((), 0)


def test_layers_that_differ_are_priced_each_by_its_own_shape():
    """A mixture whose first third of layers is dense: each stage is priced and sized by the layers it holds, not by
    the mean layer, so the stage holding the dense layers takes more of them, every stage's weights are its own
    layers' weights, and the split is the best one there is."""
    from engine.model.config import ModelConfig

    cfg = ModelConfig.from_dict({**QWEN3_MOE_SHAPED, "num_hidden_layers": 24, "mlp_only_layers": list(range(8))})
    cost = ModelCost.from_config(cfg, "float32", "bfloat16")
    assert not cost.uniform and cost.over(range(0, 8)).moe_layer_share == 0
    assert cost.over(range(8, 24)).layer_weight_bytes == cfg.layer_params(8) * 2
    cpus = [device("cpu", memory=64 * GiB, flops=2e11, bw=2e10), device("cpu", memory=64 * GiB, flops=2e11, bw=2e10)]
    result = plan(cost, cpus, batch_size=16, context_len=512, kv_reserve_tokens=1024)
    first, second = result.stages
    for s in result.stages:
        layers = sum(cfg.layer_params(i) for i in range(*s.layers)) * 2
        extra = cost.embed_bytes if s is first else cost.head_bytes
        assert abs(s.weight_bytes - layers - extra) < s.num_layers * 2
    options = dict(batch=16, context_len=512, link=None)

    def bottleneck(n: int) -> float:
        return max(stage_seconds(cost.over(range(0, n)), cpus[0], n, first=True, last=False, **options).total_s,
                   stage_seconds(cost.over(range(n, 24)), cpus[1], 24 - n, first=False, last=True,
                                 **options).total_s)

    best = min(range(1, 24), key=bottleneck)
    assert first.layers == (0, best)
    # What the engine sets beside each stage's measured step is the same per-layer price.
    from engine.placement.cost import predict_stage_seconds

    for k, s in enumerate(result.stages):
        assert predict_stage_seconds(cost, s.device, s.layers, k == 0, k == 1, 16, 512) == pytest.approx(
            s.compute_s[16])
    # The same model taken as alike layers (what the planner did before) gives the dense layers' stage fewer.
    alike = plan(dataclasses.replace(cost, layer_kinds=None), cpus, batch_size=16, context_len=512,
                 kv_reserve_tokens=1024)
    assert alike.stages[0].num_layers < first.num_layers


def test_strata_plan_says_when_and_under_what_load_each_device_was_measured(model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """A fresh probe records when it ran and how busy other work kept the host; --reprobe measures again; a reading
    taken under load is flagged, and the figures from a profile say so."""
    from engine.placement.devices import probe_note
    from gateway.plan_command import run_plan

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STRATA_DEVICE_PROFILE", raising=False)
    args = ("--model", str(model_dir), "--devices", "cpu", "--max-model-len", "256", "--threads-per-stage", "1")
    assert run_plan(plan_args(*args, "--json")) == 0
    first = json.loads(capsys.readouterr().out)["stages"][0]["device_info"]
    assert first["probed_at"] and 0 <= first["probe_host_busy"] <= 1
    assert run_plan(plan_args(*args, "--json")) == 0  # from the cache
    assert json.loads(capsys.readouterr().out)["stages"][0]["device_info"]["probed_at"] == first["probed_at"]
    assert run_plan(plan_args(*args, "--reprobe")) == 0
    out = capsys.readouterr().out
    assert re.search(r"^device figures: cpu measured \d{4}-\d\d-\d\d \d\d:\d\d UTC, other work keeping \d+% ", out, re.M)
    busy = dataclasses.replace(device("cpu"), probed_at=first["probed_at"], probe_host_busy=0.6)
    assert "taken under load" in probe_note(busy) and "--reprobe" in probe_note(busy)
    assert busy.interchangeable() == dataclasses.replace(busy, probed_at=0.0, probe_host_busy=0.0).interchangeable()
