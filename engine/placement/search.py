"""The search: the device order and contiguous layer split that minimise the slowest stage.

Every device a user lists becomes one stage. The planner predicts each stage's decode-step
time from the device's measured rates (engine.placement.probe) and the model's per-layer costs, then
picks the device order and split that minimise the slowest stage (compute plus the
transfer into it), with every device holding its weights plus KV for a reserve of tokens.

Layers are identical, so a stage's cost depends only on how many layers it holds, its
device, its neighbours and whether it is first or last. The split is an exact dynamic
program over (stage, layers placed so far); orders are enumerated, identical devices
counted once.
"""
from __future__ import annotations

import itertools
import math

from engine.placement.cost import (STREAM_SLOTS, LinkSpeed, ModelCost, StageTime, expert_layers_to_host,
                                   kv_cache_blocks, kv_capacity_tokens, layer_seconds, layers_to_stream, link_between,
                                   spread, stage_fits, stage_kv_bytes_per_token, stage_kv_budget, stage_seconds,
                                   stage_weight_bytes, stream_tier)
from engine.placement.devices import DeviceInfo
from engine.placement.plan import Plan, StagePlan
from engine.placement.precision import MAX_MIXED_ORDERS, Precision, search_mixed
from engine.placement.render import readable_size

# Orders beyond this many distinct ones are not enumerated: each host's devices go together (host_grouped_orders).
MAX_ORDERS = 5040
# Among plans this close to the best bottleneck, prefer the one whose smallest stage KV capacity is largest.
TIE_TOLERANCE = 0.02

_INF = math.inf


class PlacementError(ValueError):
    """The model cannot be placed on the devices as asked."""


def plan(cost: ModelCost, devices: list[DeviceInfo], *, batch_size: int = 64, context_len: int = 512,
         kv_reserve_tokens: int, layers: list[int] | None = None, link_bandwidth: float | dict | None = None,
         block_size: int = 16, tolerance: float = TIE_TOLERANCE, max_kv_tokens: int | None = None,
         kv_cache_memory: int | None = None, streamed: list[tuple[int, ...]] | None = None,
         precision: Precision | None = None) -> Plan:
    """Order the devices and split the layers so the slowest stage is as fast as it can be.

    layers: counts per stage in the devices' given order (no search). tolerance: among plans within this
    fraction of the best bottleneck, the one whose stages' smallest KV allocation is largest wins. max_kv_tokens and
    kv_cache_memory (bytes per stage) size the KV blocks each stage will allocate, as the stage sizes them.
    streamed: with `layers`, the layers each stage reads from disk (a package's), instead of the fewest that fit.
    precision: the formats each layer may run at (engine.placement.precision), chosen with the split; cost is then
    the model at its checkpoint's own formats.
    """
    L, P = cost.num_layers, len(devices)
    if P == 0:
        raise PlacementError("no devices to place the model on")
    if batch_size < 1 or context_len < 1 or block_size < 1 or kv_reserve_tokens < 0:
        raise ValueError("batch_size, context_len and block_size must be positive, kv_reserve_tokens not negative")
    if P > L:
        raise PlacementError(f"{P} devices but the model has only {L} layers; every device needs at least one layer")
    ctx = _Context(cost, devices, batch_size, context_len, kv_reserve_tokens, link_bandwidth, block_size,
                   max_kv_tokens if max_kv_tokens is not None else kv_reserve_tokens, kv_cache_memory)
    if precision is not None and len(precision.names) > 1:
        return _search_precision(ctx, precision, tolerance, layers)
    if layers is not None:
        return ctx.evaluate(list(range(P)), _check_layers(layers, P, L), check=True, streamed=streamed)
    order, split = _search(ctx, tolerance)
    return ctx.evaluate(order, split)


def _search_precision(ctx: _Context, precision: Precision, tolerance: float, layers: list[int] | None) -> Plan:
    """The plan with each layer's format chosen too (engine.placement.precision)."""
    P, L = len(ctx.devices), ctx.cost.num_layers
    # What does not fit says so at the fewest bits any layer may take.
    ctx.cost = precision.costs[max(precision.floors)]
    if layers is not None:
        layers = _check_layers(layers, P, L)
        orders = [list(range(P))]
    else:
        orders = distinct_orders(ctx.devices, MAX_MIXED_ORDERS) or host_grouped_orders(ctx, MAX_MIXED_ORDERS)
    result = search_mixed(ctx, precision, orders, tolerance, layers)
    if result is not None:
        return result
    if min(precision.floors) < len(precision.names) - 1 and search_mixed(
            ctx, precision.unbounded(), orders, tolerance, layers) is not None:
        raise PlacementError(f"the model fits only with more layers at {precision.names[-1]} than --max-layer-error "
                             "allows; raise the bound, give the devices more memory or lower --max-model-len")
    if layers is not None:
        ctx.evaluate(list(range(P)), layers, check=True)  # raises where a stage does not fit at the fewest bits
    else:
        _explain_no_fit(ctx)
    raise PlacementError("the model does not fit at the formats its layers may take; give the devices more memory "
                         "or lower --max-model-len")


def _check_layers(layers: list[int], P: int, L: int) -> list[int]:
    if len(layers) != P:
        raise PlacementError(f"--layers gives {len(layers)} counts for {P} devices; give one count per device")
    if any(n < 1 for n in layers):
        raise PlacementError(f"--layers {','.join(map(str, layers))}: every device needs at least one layer")
    if sum(layers) != L:
        raise PlacementError(f"--layers {','.join(map(str, layers))} adds up to {sum(layers)}, "
                             f"but the model has {L} layers")
    return list(layers)


class _Context:
    """Everything a search needs, with each stage's cost per layer count computed once."""

    def __init__(self, cost: ModelCost, devices: list[DeviceInfo], batch: int, context_len: int, reserve: int,
                 links, block_size: int, max_kv_tokens: int, kv_cache_memory: int | None) -> None:
        self.cost, self.devices, self.batch, self.context_len = cost, devices, batch, context_len
        self.reserve, self.links, self.block_size = reserve, links, block_size
        self.max_kv_tokens, self.kv_cache_memory = max_kv_tokens, kv_cache_memory
        self._cache: dict[tuple, tuple[list[float], list[int]]] = {}
        self._stage_costs: dict[tuple[int, int], ModelCost] = {}
        self._entries: dict[tuple, tuple[float, int]] = {}
        moe = set(cost.moe_layers)
        self._moe_before = list(itertools.accumulate((i in moe for i in range(cost.num_layers)), initial=0))

    def link(self, prev: int | None, dev: int) -> LinkSpeed:
        return link_between(None if prev is None else self.devices[prev], self.devices[dev], self.links)

    def kind(self, start: int, n: int) -> tuple[int, int]:
        """What a stage of layers [start, start + n) costs by: n, and how many of them have experts (where layers
        differ; 0 where they are alike)."""
        if self.cost.uniform:
            return n, 0
        return n, self._moe_before[start + n] - self._moe_before[start]

    def at(self, start: int, n: int) -> ModelCost:
        """The model as a stage of layers [start, start + n) sees it (ModelCost.over: layers may differ)."""
        if self.cost.uniform:
            return self.cost
        kind = self.kind(start, n)
        if kind not in self._stage_costs:
            self._stage_costs[kind] = self.cost.over(range(start, start + n))
        return self._stage_costs[kind]

    def time(self, cost: ModelCost, dev: int, n: int, first: bool, last: bool, prev: int | None, batch: int,
             streamed: int = 0, host_experts: int = 0) -> StageTime:
        return stage_seconds(cost, self.devices[dev], n, first=first, last=last, batch=batch,
                             context_len=self.context_len, link=self.link(prev, dev), block_size=self.block_size,
                             streamed=streamed, host_experts=host_experts)

    def held(self, cost: ModelCost, d: DeviceInfo, n: int, first: bool, last: bool) -> tuple[int, int] | None:
        """Where a stage's weights that do not fit its memory go: (MoE layers whose experts the host's CPU runs,
        layers streamed from the tier; engine.placement.cost.expert_layers_to_host, layers_to_stream), whichever
        makes the step at the planning batch faster where both would fit; None: no fit."""
        host = expert_layers_to_host(cost, d, n, first, last, self.reserve, self.kv_cache_memory)
        streamed = layers_to_stream(cost, d, n, first, last, self.reserve, self.kv_cache_memory)
        options = ([(host, 0)] if host else []) + ([(0, streamed)] if streamed is not None else [])
        if len(options) < 2:
            return options[0] if options else None
        return min(options, key=lambda o: stage_seconds(
            cost, d, n, first=first, last=last, batch=self.batch, context_len=self.context_len, link=None,
            block_size=self.block_size, streamed=o[1], host_experts=o[0]).total_s)

    def columns(self, dev: int, first: bool, last: bool, prev: int | None,
                start: int = 0) -> tuple[list[float], list[int]]:
        """Per layer count n (index 0 unused) of a stage whose layers start at `start` (any start where layers are
        alike): predicted seconds at the planning batch (inf where the stage does not fit), and the KV blocks the
        stage would allocate (what the tie-break between near plans maximises: blocks beyond what the stage takes
        are worth nothing)."""
        start = 0 if self.cost.uniform else start
        key = (dev, first, last, prev, start)
        if key not in self._cache:
            L, d = self.cost.num_layers, self.devices[dev]
            times, blocks = [_INF] * (L + 1), [-1] * (L + 1)
            for n in range(1, L - start + 1):
                entry = (dev, first, last, prev, self.kind(start, n))  # stages alike in it cost alike
                if entry not in self._entries:
                    cost = self.at(start, n)
                    held = self.held(cost, d, n, first, last)
                    if held is None:
                        self._entries[entry] = (_INF, -1)
                    else:
                        host, streamed = held
                        self._entries[entry] = (
                            self.time(cost, dev, n, first, last, prev, self.batch, streamed, host).total_s,
                            self.kv_blocks(cost, d, n, first, last, streamed, host))
                times[n], blocks[n] = self._entries[entry]
                if times[n] == _INF:
                    break  # more layers need more memory
            self._cache[key] = (times, blocks)
        return self._cache[key]

    def column(self, dev: int, first: bool, last: bool, prev: int | None, which: int):
        """columns()[which] as the split's dynamic program takes it: a list over n where layers are alike, else a
        function of the stage's first layer giving that list."""
        if self.cost.uniform:
            return self.columns(dev, first, last, prev)[which]
        return lambda start: self.columns(dev, first, last, prev, start)[which]

    def kv_blocks(self, cost: ModelCost, d: DeviceInfo, n: int, first: bool, last: bool, streamed: int = 0,
                  host_experts: int = 0) -> int:
        """The blocks a stage of n layers on d allocates (engine.placement.cost.kv_cache_blocks, the stage's rule)."""
        weights = stage_weight_bytes(cost, n, first, last, streamed, host_experts)
        return kv_cache_blocks(stage_kv_budget(d, weights, self.kv_cache_memory),
                               stage_kv_bytes_per_token(cost, d, n) * self.block_size, self.max_kv_tokens,
                               self.block_size)

    def evaluate(self, order: list[int], split: list[int], check: bool = False,
                 streamed: list[tuple[int, ...]] | None = None) -> Plan:
        P = len(order)
        stages, start = [], 0
        for k, (dev, n) in enumerate(zip(order, split)):
            cost, d = self.at(start, n), self.devices[dev]
            first, last = k == 0, k == P - 1
            prev = order[k - 1] if k else None
            given = streamed[k] if streamed is not None else None
            host = 0
            if given is None:
                held = self.held(cost, d, n, first, last)
                host, streamed_count = held if held is not None else (0, None)
            elif stage_fits(cost, d, n, first, last, self.reserve, self.kv_cache_memory, len(given)):
                streamed_count = len(given)
            else:
                streamed_count = None
            weights = stage_weight_bytes(cost, n, first, last, streamed_count or 0, host)
            kv_per_token = stage_kv_bytes_per_token(cost, d, n)
            if check and streamed_count is None:
                kv = self.reserve * kv_per_token
                what = f"KV for {self.reserve} tokens"
                if (self.kv_cache_memory or 0) > kv:
                    kv, what = self.kv_cache_memory, "the KV cache budget"
                need = weights + kv
                raise PlacementError(
                    f"stage {k} ({d.name}) does not fit: layers {start}-{start + n - 1} need {readable_size(weights)} "
                    f"of weights plus {readable_size(kv)} of {what}, and {d.name} holds "
                    f"{readable_size(d.memory)} ({readable_size(need - d.memory)} short){_offload_hint(d)}")
            count = streamed_count or 0
            times = {b: self.time(cost, dev, n, first, last, prev, b, count, host) for b in sorted({1, self.batch})}
            stages.append(StagePlan(
                device=d, device_index=dev, layers=(start, start + n), weight_bytes=weights,
                kv_bytes_per_token=kv_per_token,
                kv_capacity_tokens=kv_capacity_tokens(cost, d, n, first, last, count, host),
                predicted_s={b: t.total_s for b, t in times.items()},
                compute_s={b: t.compute_s for b, t in times.items()},
                transfer_s={b: t.transfer_s for b, t in times.items()},
                kv_blocks=self.kv_blocks(cost, d, n, first, last, count, host),
                streamed_layers=given if given is not None else tuple(start + i for i in spread(n, count)),
                fetch_s={b: t.fetch_s for b, t in times.items()},
                host_experts=cost.host_expert_layers(range(start, start + n), host),
            ))
            start += n
        bottleneck = max(s.predicted_s[self.batch] for s in stages)
        return Plan(stages, self.batch, self.context_len, bottleneck, self.block_size, self.reserve)


def min_max_split(columns: list[list[float]], total: int) -> tuple[float, list[int]]:
    """The exact dynamic program: split `total` layers over the stages, each at least one, minimising the largest
    columns[k][n] (stage k's score with n layers; each column non-decreasing in n, inf where not allowed).
    Returns (that minimum, layers per stage); (inf, []) if no split is allowed."""
    P = len(columns)
    row = _first_row(columns[0])  # row[j]: best score with j layers on the stages so far
    choices: list[list[int]] = [list(range(total + 1))]
    for k in range(1, P):
        row, choice = _next_row(row, columns[k], k, total, only_last=k == P - 1)
        choices.append(choice)
    if row[total] == _INF:
        return _INF, []
    split, j = [], total
    for k in range(P - 1, -1, -1):
        n = choices[k][j]
        split.append(n)
        j -= n
    return row[total], split[::-1]


def _first_row(col) -> list[float]:
    row = list(col(0) if callable(col) else col)
    row[0] = _INF
    return row


def _next_row(prev: list[float], col, k: int, total: int, only_last: bool) -> tuple[list[float], list[int]]:
    """Add stage k (0-based) to a row over k stages. For j layers the stage takes n of them; prev[j - n] falls and
    col[n] rises with n, so the best n sits where they cross, and that crossing only moves right as j grows. col: a
    function of the stage's first layer where layers differ (Context.column); then every n is tried."""
    row, choice = [_INF] * (total + 1), [0] * (total + 1)
    if callable(col):
        for j in (total,) if only_last else range(k + 1, total + 1):
            best, pick = _INF, 0
            for n in range(1, j - k + 1):  # the stages before keep at least one layer each
                a = prev[j - n]
                if a >= best:
                    continue
                b = col(j - n)[n]
                if (a if a > b else b) < best:
                    best, pick = (a if a > b else b), n
            row[j], choice[j] = best, pick
        return row, choice
    n = 1
    for j in (total,) if only_last else range(k + 1, total + 1):
        while n < j - k and col[n] < prev[j - n]:  # the stages before keep at least one layer each
            n += 1
        a, b = prev[j - n], col[n]  # max() written out: this loop is the planner's hot spot
        best, pick = (a if a > b else b), n
        if n > 1:
            a, b = prev[j - n + 1], col[n - 1]
            if (a if a > b else b) <= best:
                best, pick = (a if a > b else b), n - 1
        row[j], choice[j] = best, pick
    return row, choice


def _best_per_order(orders: list[list[int]], column, total: int, tolerance: float) -> list[tuple[float, list[int]]]:
    """min_max_split's value for each order that could come within tolerance of the best (column(order, k): stage
    k's column). Orders are walked in lexicographic order so that those sharing their first stages share the DP's
    rows for them, and a prefix whose cheapest entry already exceeds the best so far (plus tolerance) stops there."""
    results: list[tuple[float, list[int]]] = []
    best = _INF
    rows: list[list[float]] = []
    prefix: tuple[int, ...] = ()
    for order in sorted(tuple(o) for o in orders):
        P = len(order)
        keep = 0
        while keep < min(len(rows), P - 1) and order[keep] == prefix[keep]:
            keep += 1
        del rows[keep:]
        prefix = order
        limit = best + abs(best) * tolerance
        for k in range(P):
            if k == len(rows):
                col = column(order, k)
                rows.append(_first_row(col) if k == 0 else _next_row(rows[-1], col, k, total, k == P - 1)[0])
            # A row over k + 1 stages is smallest at k + 1 layers (one each) where layers are alike: no completion
            # can beat that. Where they differ, only a whole order's value is compared.
            if (k == P - 1 or not callable(col)) and rows[k][total if k == P - 1 else k + 1] > limit:
                break
        else:
            results.append((rows[-1][total], list(order)))
            best = min(best, rows[-1][total])
    return results


def distinct_orders(devices: list[DeviceInfo], limit: int = MAX_ORDERS) -> list[list[int]] | None:
    """Every order of the devices up to swapping interchangeable ones (each class takes its devices in list order);
    None when there are more than `limit`."""
    classes: dict[tuple, list[int]] = {}
    for i, d in enumerate(devices):
        classes.setdefault(d.interchangeable(), []).append(i)
    groups = list(classes.values())
    count = math.factorial(len(devices))
    for g in groups:
        count //= math.factorial(len(g))
    if count > limit:
        return None
    orders: list[list[int]] = []
    remaining = [len(g) for g in groups]

    def extend(prefix: list[int]) -> None:
        if len(prefix) == len(devices):
            taken = [0] * len(groups)
            order = []
            for c in prefix:
                order.append(groups[c][taken[c]])
                taken[c] += 1
            orders.append(order)
            return
        for c in range(len(groups)):
            if remaining[c]:
                remaining[c] -= 1
                extend(prefix + [c])
                remaining[c] += 1

    extend([])
    return orders


def host_grouped_orders(ctx: _Context, limit: int = MAX_ORDERS) -> list[list[int]]:
    """Orders for more devices than can be enumerated: each host's devices together, fastest first within it, so
    that a pipeline crosses each host boundary once (the slow links); the hosts in every order, up to `limit` of
    them, else fastest host first."""
    per_layer = [layer_seconds(ctx.cost, d, ctx.batch, ctx.context_len, ctx.block_size) for d in ctx.devices]
    hosts: dict[str, list[int]] = {}
    for i in sorted(range(len(ctx.devices)), key=lambda i: per_layer[i]):
        hosts.setdefault(ctx.devices[i].host, []).append(i)
    groups = list(hosts.values())  # fastest host (by its fastest device) first
    if math.factorial(len(groups)) > limit:
        return [[i for g in groups for i in g]]
    return [[i for g in perm for i in g] for perm in itertools.permutations(groups)]


def _search(ctx: _Context, tolerance: float) -> tuple[list[int], list[int]]:
    # Where layers differ the split tries every layer count at every start: fewer orders are enumerated.
    most = MAX_ORDERS if ctx.cost.uniform else MAX_MIXED_ORDERS
    orders = distinct_orders(ctx.devices, most) or host_grouped_orders(ctx, most)
    L, P = ctx.cost.num_layers, len(ctx.devices)

    def stage(order, k: int) -> tuple:
        return order[k], k == 0, k == P - 1, order[k - 1] if k else None

    # First pass: the best bottleneck over every order.
    results = _best_per_order(orders, lambda order, k: ctx.column(*stage(order, k), 0), L, tolerance)
    best = min((t for t, _ in results), default=_INF)
    if best == _INF:
        _explain_no_fit(ctx)
    # Second pass: among plans within tolerance of it, the largest smallest KV capacity: a min-max over -blocks,
    # with stages that would be too slow not allowed.
    limit = best * (1 + tolerance)
    capped: dict[tuple, list[float]] = {}

    def capped_column(key: tuple, start: int = 0) -> list[float]:
        if (key, start) not in capped:
            times, blocks = ctx.columns(*key, start)
            capped[key, start] = [-blocks[n] if times[n] <= limit else _INF for n in range(L + 1)]
        return capped[key, start]

    def blocks_column(order, k: int):
        key = stage(order, k)
        return capped_column(key) if ctx.cost.uniform else (lambda start: capped_column(key, start))

    near = {tuple(order): t for t, order in results if t <= limit}
    by_blocks = _best_per_order(list(near), blocks_column, L, 0.0)
    most = min(v for v, _ in by_blocks)
    # Equal capacity: the order with the faster best plan.
    order = min((near[tuple(o)], o) for v, o in by_blocks if v == most)[1]
    return order, min_max_split([blocks_column(order, k) for k in range(P)], L)[1]


def _offload_hint(d: DeviceInfo) -> str:
    if stream_tier(d) is not None:
        return ""
    if d.kind == "cpu":
        return "; with --offload-dir, a CPU stage reads the layers that do not fit from disk each step"
    return "; with --cpu-offload-gb, a GPU stage keeps layers that do not fit in host memory, copied in each step"


def _explain_no_fit(ctx: _Context) -> None:
    """Raise a PlacementError that says what is missing."""
    cost, devices, reserve = ctx.cost, ctx.devices, ctx.reserve
    L, P = cost.num_layers, len(devices)
    hint = next((_offload_hint(d) for d in devices if _offload_hint(d)), "")
    for d in devices:
        one = stage_weight_bytes(cost, 1, False, False) + reserve * stage_kv_bytes_per_token(cost, d, 1)
        if one > d.memory:
            raise PlacementError(
                f"{d.name} ({d.label}) holds {readable_size(d.memory)}, less than one layer needs ({readable_size(one)} "
                f"with KV for {reserve} tokens); give it more memory, lower --max-model-len, or leave it out")
    if any(stream_tier(d) for d in devices):
        raise PlacementError(
            f"the model does not fit, even bringing layers in from disk or host memory each step (as far as "
            f"--cpu-offload-gb allows): a stage that streams holds the "
            f"{STREAM_SLOTS} layers it reads ahead ({readable_size(STREAM_SLOTS * cost.layer_weight_bytes)}), KV for "
            f"{reserve} tokens of all its layers, and the embedding or LM head where it has them; give the devices "
            f"more memory or lower --max-model-len")
    # Weights and KV at the model's dtypes; tied embeddings count twice when the first and last stages differ.
    weights = stage_weight_bytes(cost, L, True, True)
    if cost.tied_embeddings and P > 1:
        weights += cost.embed_bytes
    kv = reserve * L * cost.kv_bytes_per_token
    held = sum(d.memory for d in devices)
    if weights + kv > held:
        raise PlacementError(
            f"the model does not fit: {L} layers need {readable_size(weights)} of weights plus {readable_size(kv)} of "
            f"KV for {reserve} tokens, and the devices hold {readable_size(held)} in all "
            f"({readable_size(weights + kv - held)} short){hint}")
    raise PlacementError(
        f"the model does not fit: it needs {readable_size(weights + kv)} with KV for {reserve} tokens and the devices "
        f"hold {readable_size(held)} in all, but not in whole layers per device (each layer needs "
        f"{readable_size(cost.layer_weight_bytes + reserve * cost.kv_bytes_per_token)}, the embedding and LM head "
        f"more); give the devices more memory or lower --max-model-len{hint}")
