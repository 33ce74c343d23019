"""Precision chosen per layer, with the split: which format each layer runs at, as well as where it runs.

The user names the formats a layer may take (`--precision auto,q8_0,q4_k`: auto is the checkpoint's own) and may
bound each layer's measured error (`--max-layer-error`, engine.model.calibration): a layer may take a format only
where its error there is within the bound, and every format with more bits than that, so the formats a layer may
take are the first few of the list sorted by bits, down to its "floor".

Layers have one shape, so a stage's speed and memory depend only on how many of its layers take each format, not on
which: a stage's figures are those of a count vector. Which count vectors a stretch of layers can take depends on
its floors (Hall's condition on a chain: no more layers at format j or below than may go that low), so a stage's
best time depends on where its layers start as well as how many there are. The search is the split's dynamic
program with those start-dependent segment costs: exact, and tested against brute force over every order, split
and per-layer format.

Speed first, then quality, then memory. The planner finds the fastest bottleneck T over every order and split;
then, for the fastest few orders within TIE_TOLERANCE of it (their fastest splits), gives each stage the count
vector and assignment of formats to its layers with the least summed error that keeps to T (1 + TIE_TOLERANCE) (an
exact dynamic program over its layers): the more sensitive layers keep the more bits. The plan that loses least
wins; among equals, the one leaving its stages the most KV blocks. (Without formats to choose, the tie-break is KV
blocks alone; here a stage's KV takes what its weights leave, so most KV would mean fewest bits: every stage still
holds KV for the reserve, and --kv-cache-memory fixes the cache's size.) The bound on each layer's error is the
user's; speed is never traded for quality beyond the tolerance.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from engine.placement.cost import (ModelCost, StageTime, kv_cache_blocks, layer_seconds,
                                   spread, stage_kv_bytes_per_token, stage_kv_budget, stage_seconds, stage_weight_bytes,
                                   stream_choice, stream_tier, streamed_bytes_held)
from engine.placement.devices import DeviceInfo
from engine.placement.plan import Plan, StagePlan

AUTO = "auto"
# Device orders the mixed search walks at most; beyond, each host's devices go together (as the plain search does
# beyond MAX_ORDERS): its dynamic program costs a segment per (start, end) pair instead of one per length.
MAX_MIXED_ORDERS = 720
# Plans within tolerance of the fastest whose formats are chosen for quality, fastest first.
QUALITY_CANDIDATES = 8

_INF = math.inf


@dataclass(frozen=True, slots=True)
class Precision:
    names: tuple[str, ...]  # the formats a layer may take, most bits first; AUTO is the checkpoint's own
    costs: tuple[ModelCost, ...]  # per format: the model with every layer at it
    floors: tuple[int, ...]  # per layer: the index of the fewest-bit format it may take
    errors: tuple[tuple[float, ...], ...]  # per layer, per format: its measured error (all 0 where not measured)
    base: int  # the index of AUTO: its cost prices the embedding, the LM head and the KV cache
    below: tuple[tuple[int, ...], ...]  # per format j >= 1, per i: how many of layers [0, i) may go as low as j

    @staticmethod
    def build(costs: dict[str, ModelCost], errors: dict[str, list[float]] | None,
              max_error: float | None) -> Precision:
        """costs: per format name (AUTO among them); errors: per format, per layer (engine.model.calibration);
        max_error: the most a layer may lose at a format (None: any)."""
        if AUTO not in costs:
            raise ValueError("the formats a layer may take must include auto, the checkpoint's own")
        if max_error is not None and errors is None:
            raise ValueError("a bound on each layer's error needs the checkpoint's weights to measure it on")
        names = tuple(sorted(costs, key=lambda f: -costs[f].bits("layer")))
        base = names.index(AUTO)
        L = costs[AUTO].num_layers
        table = tuple(tuple(float(errors[f][i]) if errors else 0.0 for f in names) for i in range(L))
        floors = []
        for row in table:
            floor = base
            while floor + 1 < len(names) and (max_error is None or row[floor + 1] <= max_error):
                floor += 1
            floors.append(floor)
        below = tuple(tuple(itertools.accumulate((f >= j for f in floors), initial=0)) for j in range(1, len(names)))
        return Precision(names, tuple(costs[f] for f in names), tuple(floors), table, base, below)

    def unbounded(self) -> Precision:
        """The same choices with every layer free to take the fewest bits."""
        last = len(self.names) - 1
        L = len(self.floors)
        return dataclasses.replace(self, floors=(last,) * L,
                                   below=tuple(tuple(range(L + 1)) for _ in range(1, len(self.names))))

    @property
    def base_cost(self) -> ModelCost:
        return self.costs[self.base]

    def reach(self, a: int, b: int) -> tuple[int, ...]:
        """For layers [a, b): per format j >= 1, how many of them may take format j or fewer bits."""
        return tuple(row[b] - row[a] for row in self.below)


def at_format(device: DeviceInfo, name: str) -> DeviceInfo:
    """The device as it multiplies weights at a format: the product rates its probe timed for it (where it did)."""
    rates = (device.format_rates or {}).get(name)
    if rates is None:
        return device
    return dataclasses.replace(device, matmul_flops=rates[0], small_gemm_flops=rates[1])


def count_vectors(n: int, reach: tuple[int, ...]):
    """Every way n layers can take the formats (counts per format, most bits first) given reach (Precision.reach)."""
    F = len(reach) + 1

    def below(j: int, taken: int):
        # Formats j..F-1 hold `taken` layers so far (assigned from the fewest bits up).
        if j == 0:
            yield (n - taken,)
            return
        for c in range(0, min(reach[j - 1], n) - taken + 1):
            for rest in below(j - 1, taken + c):
                yield rest + (c,)

    yield from below(F - 1, 0)


@dataclass(frozen=True, slots=True)
class Mix:
    counts: tuple[int, ...]  # layers per format
    streamed: tuple[int, ...]  # of those, brought in from the device's tier each step, per format
    time: StageTime
    weight_bytes: int  # held in memory
    kv_blocks: int


class MixedStages:
    """A stage's figures for each count vector, over a search's context (engine.placement.search._Context)."""

    def __init__(self, ctx, precision: Precision) -> None:
        self.ctx, self.precision = ctx, precision
        self._layer: dict[tuple[int, int], list[float]] = {}
        self._fixed: dict[tuple, tuple[int, StageTime]] = {}
        self._best: dict[tuple, Mix | None] = {}
        self.sizes = tuple(c.layer_weight_bytes for c in precision.costs)

    def layer_times(self, dev: int, batch: int) -> list[float]:
        key = (dev, batch)
        if key not in self._layer:
            ctx, d = self.ctx, self.ctx.devices[dev]
            self._layer[key] = [layer_seconds(c, at_format(d, f), batch, ctx.context_len, ctx.block_size)
                                for f, c in zip(self.precision.names, self.precision.costs)]
        return self._layer[key]

    def figures(self, dev: int, counts: tuple[int, ...], first: bool, last: bool, prev: int | None,
                batch: int) -> Mix | None:
        """The stage's step and memory with counts[j] layers at format j; None where it does not fit."""
        ctx, sizes = self.ctx, self.sizes
        d, base = ctx.devices[dev], self.precision.base_cost
        n = sum(counts)
        fixed, extra = self._outside_layers(dev, first, last, prev, batch)
        kv_per_token = stage_kv_bytes_per_token(base, d, n)
        kv = max(ctx.reserve * kv_per_token, ctx.kv_cache_memory or 0)
        tier = stream_tier(d)
        streamed = stream_choice(counts, sizes, d.memory - fixed - kv, tier)
        if streamed is None:
            return None
        held = streamed_bytes_held(counts, streamed, sizes)
        compute = extra.compute_s + sum(c * t for c, t in zip(counts, self.layer_times(dev, batch)))
        fetch = sum(s * b for s, b in zip(streamed, sizes)) / tier.bandwidth if any(streamed) else 0.0
        weights = fixed + held
        blocks = kv_cache_blocks(stage_kv_budget(d, weights, ctx.kv_cache_memory), kv_per_token * ctx.block_size,
                                 ctx.max_kv_tokens, ctx.block_size)
        return Mix(counts, tuple(streamed), StageTime(compute, extra.transfer_s, fetch), weights, blocks)

    def _outside_layers(self, dev: int, first: bool, last: bool, prev: int | None,
                        batch: int) -> tuple[int, StageTime]:
        """The bytes and the step of what the stage holds besides its layers (embedding, LM head, the link in)."""
        key = (dev, first, last, prev, batch)
        if key not in self._fixed:
            ctx, base = self.ctx, self.precision.base_cost
            self._fixed[key] = (stage_weight_bytes(base, 0, first, last),
                                stage_seconds(base, ctx.devices[dev], 0, first=first, last=last, batch=batch,
                                              context_len=ctx.context_len, link=ctx.link(prev, dev),
                                              block_size=ctx.block_size))
        return self._fixed[key]

    def best(self, dev: int, a: int, b: int, first: bool, last: bool, prev: int | None) -> Mix | None:
        """Layers [a, b) on the device: the fastest mix."""
        reach = self.precision.reach(a, b)
        key = (dev, b - a, reach, first, last, prev)
        if key in self._best:
            return self._best[key]
        # What figures() computes, inlined where the layers fit as they are (most count vectors): this loop is the
        # mixed search's hot spot.
        ctx, sizes, n = self.ctx, self.sizes, b - a
        d = ctx.devices[dev]
        fixed, extra = self._outside_layers(dev, first, last, prev, ctx.batch)
        kv_per_token = stage_kv_bytes_per_token(self.precision.base_cost, d, n)
        room = d.memory - fixed - max(ctx.reserve * kv_per_token, ctx.kv_cache_memory or 0)
        times = self.layer_times(dev, ctx.batch)
        pick = None
        for counts in count_vectors(n, reach):
            if sum(c * size for c, size in zip(counts, sizes)) <= room:
                total = max(extra.compute_s + sum(c * t for c, t in zip(counts, times)), 0.0) + extra.transfer_s
            else:
                mix = self.figures(dev, counts, first, last, prev, ctx.batch)
                if mix is None:
                    continue
                total = mix.time.total_s
            if pick is None or total < pick[0]:
                pick = (total, counts)
        self._best[key] = None if pick is None else self.figures(dev, pick[1], first, last, prev, ctx.batch)
        return self._best[key]


def _segment_dp(P: int, L: int, cost) -> tuple[float, list[int]]:
    """Split L layers over P stages in order, each at least one, minimising the largest cost(k, a, b) (stage k on
    layers [a, b)): (that minimum, layers per stage), or (inf, []) where no split is allowed."""
    row = [_INF] * (L + 1)  # row[b]: best over the stages so far holding layers [0, b)
    row[0] = -_INF  # no stage yet: the identity of max
    back: list[list[int]] = []
    for k in range(P):
        new, choice = [_INF] * (L + 1), [0] * (L + 1)
        ends = [L] if k == P - 1 else range(k + 1, L - (P - 1 - k) + 1)
        for b in ends:
            for a in range(k, b):
                if row[a] >= new[b]:  # this start cannot beat the best so far: its segment is not priced
                    continue
                value = max(row[a], cost(k, a, b))
                if value < new[b]:
                    new[b], choice[b] = value, a
        row = new
        back.append(choice)
    if row[L] == _INF:
        return _INF, []
    split, b = [], L
    for k in range(P - 1, -1, -1):
        a = back[k][b]
        split.append(b - a)
        b = a
    return row[L], split[::-1]


def _mix_cost(stages: MixedStages, order: list[int]):
    P = len(order)

    def cost(k: int, a: int, b: int) -> float:
        mix = stages.best(order[k], a, b, k == 0, k == P - 1, order[k - 1] if k else None)
        return _INF if mix is None else mix.time.total_s

    return cost


def search_mixed(ctx, precision: Precision, orders: list[list[int]], tolerance: float,
                 layers: list[int] | None = None) -> Plan | None:
    """The plan with formats chosen per layer (module docstring); None where nothing fits. layers: counts per
    stage in the devices' given order, instead of searching."""
    stages = MixedStages(ctx, precision)
    L = precision.base_cost.num_layers
    if layers is not None:
        orders = [list(range(len(ctx.devices)))]
    results = []
    for order in orders:
        if layers is None:
            best, split = _segment_dp(len(order), L, _mix_cost(stages, order))
        else:
            cost, start, best, split = _mix_cost(stages, order), 0, 0.0, list(layers)
            for k, n in enumerate(split):
                best, start = max(best, cost(k, start, start + n)), start + n
        if best < _INF:
            results.append((best, order, split))
    if not results:
        return None
    fastest = min(t for t, _, _ in results)
    limit = fastest * (1 + tolerance)
    # Within tolerance of the fastest: the order and split whose stages, at their least-error formats, lose least.
    near = sorted((r for r in results if r[0] <= limit), key=lambda r: r[0])[:QUALITY_CANDIDATES]
    finished = [_finish(stages, order, split, limit) for _, order, split in near]
    return min(finished, key=lambda r: (r[0], -r[1].num_kv_blocks, r[1].bottleneck_s))[1]


def _finish(stages: MixedStages, order: list[int], split: list[int], limit: float) -> tuple[float, Plan]:
    """Each stage at its least-error assignment within the time limit (then the one leaving most KV blocks, then
    the faster): (the summed error, the plan)."""
    ctx, prec = stages.ctx, stages.precision
    P, start, plans, total = len(order), 0, [], 0.0
    for k, (dev, n) in enumerate(zip(order, split)):
        first, last, prev = k == 0, k == P - 1, order[k - 1] if k else None
        layers = range(start, start + n)
        pick = None
        for counts, (error, formats) in least_error(prec, layers).items():
            mix = stages.figures(dev, counts, first, last, prev, ctx.batch)
            if mix is None or mix.time.total_s > limit:
                continue
            rank = (error, -mix.kv_blocks, mix.time.total_s)
            if pick is None or rank < pick[0]:
                pick = (rank, mix, formats)
        if pick is None:  # the split's fastest mixes qualify; this would be a planner bug
            raise RuntimeError(f"stage {k}: no assignment of formats keeps to {limit:.6f} s")
        (error, _, _), mix, formats = pick
        total += error
        plans.append(_stage_plan(stages, dev, start, mix, formats, first, last, prev))
        start += n
    bottleneck = max(s.predicted_s[ctx.batch] for s in plans)
    return total, Plan(plans, ctx.batch, ctx.context_len, bottleneck, ctx.block_size, ctx.reserve)


def least_error(prec: Precision, layers: range) -> dict[tuple[int, ...], tuple[float, tuple[int, ...]]]:
    """For every count vector the layers can take: the least summed error of an assignment with those counts, and
    that assignment (a format index per layer). An exact dynamic program over the layers, its state the counts so
    far."""
    F = len(prec.names)
    states: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {(0,) * F: (0.0, ())}
    for i in layers:
        nxt: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}
        for counts, (error, formats) in states.items():
            for j in range(prec.floors[i] + 1):
                c = counts[:j] + (counts[j] + 1,) + counts[j + 1:]
                value = error + prec.errors[i][j]
                if c not in nxt or value < nxt[c][0]:
                    nxt[c] = (value, formats + (j,))
        states = nxt
    return states


def _stage_plan(stages: MixedStages, dev: int, start: int, mix: Mix, formats: tuple[int, ...], first: bool,
                last: bool, prev: int | None) -> StagePlan:
    ctx, prec = stages.ctx, stages.precision
    d = ctx.devices[dev]
    n = len(formats)
    streamed: list[int] = []
    for j, count in enumerate(mix.streamed):  # which layers of each format stream: spread among that format's
        if count:
            at_j = [start + i for i, f in enumerate(formats) if f == j]
            streamed += [at_j[i] for i in spread(len(at_j), count)]
    times = {b: stages.figures(dev, mix.counts, first, last, prev, b).time for b in sorted({1, ctx.batch})}
    kv_per_token = stage_kv_bytes_per_token(prec.base_cost, d, n)
    return StagePlan(
        device=d, device_index=dev, layers=(start, start + n), weight_bytes=mix.weight_bytes,
        kv_bytes_per_token=kv_per_token, kv_capacity_tokens=(d.memory - mix.weight_bytes) // max(kv_per_token, 1),
        predicted_s={b: t.total_s for b, t in times.items()}, compute_s={b: t.compute_s for b, t in times.items()},
        transfer_s={b: t.transfer_s for b, t in times.items()}, kv_blocks=mix.kv_blocks,
        streamed_layers=tuple(sorted(streamed)), fetch_s={b: t.fetch_s for b, t in times.items()},
        formats=tuple(prec.names[j] for j in formats),
    )
