"""How four other serving systems split a model's decoder layers over a list of devices, reproduced from their own
source, so that `strata plan` can price their splits with Strata's cost model and show them beside its own plan.

Each split takes the ModelCost and the devices as the user listed them and returns layers per device in that order
(a device may get 0), or None where the system cannot place the model at all. `price` turns a split into a Plan with
the same cost model the planner uses (engine.placement.search.plan with fixed layers).

The splits are computed from weight bytes only, as the systems themselves compute them: none of them sizes the KV
cache when it splits the layers. `price` then checks each stage's weights plus its KV reserve, as Strata's own plan
does, and returns None where a stage overflows.

A system may run its stages in another order than the devices are listed in (exo's ring starts at the node with
the most memory; llama.cpp's CPU holds the first layers): ORDERS gives each system's stage order, which `price`
takes as `order=` (by default the listed order). Imports no torch.
"""
from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.placement.cost import ModelCost, stage_weight_bytes
from engine.placement.devices import DeviceInfo
from engine.placement.plan import Plan
from engine.placement.search import PlacementError, plan

MiB = 1 << 20


def _with_rest(order: list[int], count: int) -> list[int]:
    """`order`, then the devices it leaves out (they hold no layers)."""
    return order + [i for i in range(count) if i not in set(order)]


# ---- Accelerate ----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Module:
    """A module as infer_auto_device_map sees it: its size in bytes and its children (none: it cannot be split;
    decoder layers are in the model's no-split classes, so they are leaves here)."""

    name: str
    size: int
    children: list[_Module] = field(default_factory=list)


def _lm_head_bytes(cost: ModelCost) -> int:
    """The LM head's matrix alone (Strata's head_bytes also counts the final norm)."""
    return int(cost.vocab_size * cost.hidden_size * cost.bits("head") / 8)


def _hf_modules(cost: ModelCost) -> list[_Module]:
    """A causal LM as transformers builds it: `model` (embed_tokens, layers.0..N-1, norm) and `lm_head`."""
    layers = [_Module(f"model.layers.{i}", cost.layer_weight_bytes) for i in range(cost.num_layers)]
    embed = _Module("model.embed_tokens", cost.embed_bytes)
    norm = _Module("model.norm", max(cost.head_bytes - _lm_head_bytes(cost), 0))
    stack = _Module("model.layers", cost.num_layers * cost.layer_weight_bytes, layers)
    body = _Module("model", embed.size + stack.size + norm.size, [embed, stack, norm])
    if cost.tied_embeddings:
        # compute_module_sizes counts a tied weight once (named_parameters drops the duplicate), so lm_head weighs
        # nothing, and the tied-parameter rule puts it on the embedding's device: it takes no room anywhere.
        return [body]
    return [body, _Module("lm_head", _lm_head_bytes(cost))]


def _max_layer_size(modules: list[_Module]) -> tuple[int, list[str]]:
    """accelerate.utils.modeling.get_max_layer_size: the largest module that cannot be split, and its names."""
    best, names = 0, []
    todo = list(modules)
    while todo:
        m = todo.pop(0)
        if m.children:
            todo = list(m.children) + todo
        elif m.size > best:
            best, names = m.size, [m.name]
        elif m.size == best:
            names.append(m.name)
    return best, names


def _infer_auto_device_map(modules: list[_Module], max_memory: list[int], main: set[int]) -> dict[str, int]:
    """accelerate.utils.modeling.infer_auto_device_map's loop: module name -> device index, where index
    len(max_memory) is "disk" (unbounded). `main`: the devices that keep room for the largest remaining layer."""
    disk = len(max_memory)
    device_map: dict[str, int] = {}
    used = [0] * (disk + 1)
    current = 0
    todo = list(modules)
    max_size, max_names = _max_layer_size(todo)
    while todo:
        m = todo.pop(0)
        # The largest layer may have changed now that this module is taken.
        max_names = [n for n in max_names if n != m.name and not n.startswith(m.name + ".")]
        if not max_names:
            max_size, max_names = _max_layer_size(todo)
        limit = None if current == disk else max_memory[current]
        reserved = 0
        if limit is not None and current in main:
            limit -= max_size
            reserved = max_size
        if limit is None or used[current] + m.size <= limit:
            used[current] += m.size
            device_map[m.name] = current
            continue
        if m.children:  # too big, but it can be split: treat its children next, on the same device
            todo = list(m.children) + todo
            max_size, max_names = _max_layer_size(todo)
            continue
        # Neither fits nor splits: the next device.
        used[current] += reserved
        current += 1
        todo.insert(0, m)
    return device_map


def _accelerate_order(devices: list[DeviceInfo]) -> list[int]:
    """The devices infer_auto_device_map gets, in its order: those on the first device's host (one process plans
    one machine), GPUs by index, then that host's CPU (one "cpu" entry: the first listed)."""
    if not devices:
        return []
    host = devices[0].host
    gpus = sorted((i for i, d in enumerate(devices) if d.host == host and d.kind == "cuda"),
                  key=lambda i: (_cuda_index(devices[i]), i))
    cpus = [i for i, d in enumerate(devices) if d.host == host and d.kind == "cpu"][:1]
    return gpus + cpus


def _cuda_index(d: DeviceInfo) -> int:
    _, _, index = d.name.partition(":")
    return int(index) if index.isdigit() else 0


def accelerate_split(cost: ModelCost, devices: list[DeviceInfo]) -> list[int] | None:
    """Hugging Face Accelerate's automatic device map, with max_memory = each device's memory.

    Follows huggingface/accelerate, src/accelerate/utils/modeling.py: `infer_auto_device_map` (with
    `_init_infer_auto_device_map`, `get_max_layer_size`, `get_module_size_with_ties`, `compute_module_sizes`,
    `find_tied_parameters`, and `get_max_memory`'s device order), modelled on transformers' module tree: `model`
    (embed_tokens, layers.0..N-1 in the no-split classes, norm), then `lm_head`. Modules are taken in order and
    each goes on the current device if it fits under that device's max_memory, else it is split into its children
    if it has any, else the next device is used: GPUs by index, then "cpu", then "disk".

    - The largest-layer buffer: on the first GPU and on the CPU (Accelerate's `main_devices`, [gpus[0], "cpu"];
      only "cpu" without GPUs) the room of the largest module not yet placed is kept free, for an offloaded layer to
      be brought back into. Other GPUs keep none. Strata's cost model has no such buffer; it is modelled here
      because it changes the split. The largest module is found as Accelerate finds it, among the modules still
      to be placed, which can be the embedding or LM head; and while a whole container (`model`, `model.layers`)
      is tested, among the modules after it, so a model that fits whole on the first GPU keeps no buffer.
    - Tied embeddings: Accelerate counts the tied matrix once, under the embedding, and places lm_head with it;
      lm_head then takes no room.
    - Sizes are Strata's: layer_weight_bytes per layer, embed_bytes, and head_bytes split into the LM head's
      matrix and the final norm. Buffers (the rotary table) are left out.
    - One machine: only the devices on the first listed device's host take part, and of its CPUs only the first
      (Accelerate has one "cpu"); other devices get 0 layers.

    Returns layers per device in the listed order; None where something would be offloaded to disk.
    """
    order = _accelerate_order(devices)
    gpus = [k for k, i in enumerate(order) if devices[i].kind == "cuda"]
    main = {k for k, i in enumerate(order) if devices[i].kind == "cpu"}
    if gpus:
        main.add(gpus[0])
    device_map = _infer_auto_device_map(_hf_modules(cost), [devices[i].memory for i in order], main)
    disk = len(order)
    if disk in device_map.values():
        return None
    counts = [0] * len(devices)
    for layer in range(cost.num_layers):
        name = f"model.layers.{layer}"
        for owner in (name, "model.layers", "model"):  # the module placed whole that holds the layer
            if owner in device_map:
                counts[order[device_map[owner]]] += 1
                break
    return counts


# ---- exo -----------------------------------------------------------------------------------------------------------

def _exo_order(devices: list[DeviceInfo]) -> list[int]:
    """exo's ring: nodes by (memory, node id) descending; a device's name stands for its node id."""
    return sorted(range(len(devices)), key=lambda i: (_exo_memory(devices[i]), devices[i].name), reverse=True)


def _exo_memory(d: DeviceInfo) -> int:
    """exo's DeviceCapabilities.memory is in MB (bytes // 2**20)."""
    return d.memory // MiB


def exo_split(cost: ModelCost, devices: list[DeviceInfo]) -> list[int]:
    """exo's memory-weighted ring partitioning.

    Follows exo-explore/exo (the Python exo before its v1 rewrite, last at the parent of commit 0fcee7083):
    exo/topology/ring_memory_weighted_partitioning_strategy.py, `RingMemoryWeightedPartitioningStrategy.partition`
    (nodes sorted by (memory, node_id) descending; node k's partition ends at round(start + memory/total, 5)), and
    exo/topology/partitioning_strategy.py, `map_partitions_to_shards` (start_layer = int(start * n),
    end_layer = int(end * n) - 1, the last shard extended to the last layer, empty shards dropped). The truncation
    can leave a node no layers.

    Each listed device stands for one exo node (exo runs one per machine), its memory in MB as exo reports it, its
    name for the node id. Returns layers per device in the listed order; the ring runs in ORDERS' order.
    """
    n = cost.num_layers
    order = _exo_order(devices)
    memory = [_exo_memory(devices[i]) for i in order]
    if sum(memory) == 0:  # below a MB each: the bytes keep the proportions
        memory = [devices[i].memory for i in order]
    total = sum(memory)
    if total <= 0:
        raise ValueError("exo splits by memory, and the devices report none")
    partitions, start = [], 0.0
    for m in memory:
        end = round(start + (m / total), 5)
        partitions.append((start, end))
        start = end
    shards: list[tuple[int, int, int]] = []  # (position in the ring, start_layer, end_layer), inclusive
    for k, (lo, hi) in enumerate(partitions):
        start_layer, end_layer = int(lo * n), int(hi * n) - 1
        if k == len(partitions) - 1:
            end_layer = n - 1
        if start_layer <= end_layer:
            shards.append((k, start_layer, end_layer))
    if shards and shards[-1][2] < n - 1:
        k, s, _ = shards[-1]
        shards[-1] = (k, s, n - 1)
    counts = [0] * len(devices)
    for k, s, e in shards:
        counts[order[k]] += e - s + 1
    return counts


# ---- llama.cpp -----------------------------------------------------------------------------------------------------

def _f32(x: float) -> float:
    """x rounded to single precision (llama.cpp computes its split points in float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _llama_cpp_roles(devices: list[DeviceInfo]) -> tuple[int | None, list[int]]:
    """(the CPU that keeps the layers not offloaded, the devices of the split in order). llama.cpp runs on the first
    listed device's host: its first CPU entry there is the host CPU, its other CPU entries take no layers; devices
    on other hosts (GPUs, and CPUs served by rpc-server) join the split as RPC devices, as GPUs do."""
    if not devices:
        return None, []
    host = devices[0].host
    host_cpus = [i for i, d in enumerate(devices) if d.kind == "cpu" and d.host == host]
    split = [i for i, d in enumerate(devices) if not (d.kind == "cpu" and d.host == host)]
    return (host_cpus[0] if host_cpus else None), split


def _llama_cpp_layers(n_layer: int, memory: list[int], n_gpu_layers: int) -> list[int | None]:
    """Device (index into `memory`, None: the CPU) of layers 0..n_layer, n_layer being the output layer."""
    splits, total = [], 0.0
    for m in memory:
        total = _f32(total + _f32(float(m)))
        splits.append(total)
    splits = [_f32(s / total) for s in splits]
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act_gpu_layers = min(n_gpu_layers, n_layer + 1) if memory else 0
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act_gpu_layers:
            out.append(None)
            continue
        x = _f32(float(il - i_gpu_start) / act_gpu_layers)
        out.append(min(bisect.bisect_right(splits, x), len(memory) - 1))  # std::upper_bound
    return out


def llama_cpp_split(cost: ModelCost, devices: list[DeviceInfo]) -> list[int] | None:
    """llama.cpp's layer split (--split-mode layer, the default) with --tensor-split left at its default, each
    device's free memory, and -ngl as high as the devices hold.

    Follows ggml-org/llama.cpp, src/llama-model.cpp, `llama_model::load_tensors`: the split points are the running
    sums of the devices' free memory over their total, in float; with i_gpu_start = max(n_layer + 1 - n_gpu_layers,
    0) and act_gpu_layers = min(n_gpu_layers, n_layer + 1), layer il (il = n_layer: the output layer) stays on the
    CPU if il < i_gpu_start, else goes to device std::upper_bound(splits, float(il - i_gpu_start) / act_gpu_layers).
    So the layers not offloaded are the first ones, and the output layer takes the last offloaded slot (on the last
    device unless that one's share is below one slot). The input embedding always stays on the CPU. (Older sources, e.g. commit 00342301, had i_gpu_start =
    max(n_layer - n_gpu_layers, 0), -ngl not counting the output layer; the split of a full offload is the same.)

    -ngl: the largest value for which every device of the split holds its layers' weights plus the output layer
    where it lands (head_bytes: llama.cpp duplicates a tied embedding for the output), as a user sets it; with no
    CPU in the list, all layers must be offloaded. The CPU then holds the first layers and the embedding (and the
    output layer if it is not offloaded). Free memory is each device's memory. llama.cpp's --fit, which also sizes
    the KV cache and compute buffers, is not modelled.

    The host CPU, the other CPUs and RPC devices: see _llama_cpp_roles. Returns layers per device in the listed
    order (stages run CPU first: ORDERS); None where the model does not fit even with every device full.
    """
    n = cost.num_layers
    cpu, split = _llama_cpp_roles(devices)
    if cpu is None and not split:
        return None
    memory = [devices[i].memory for i in split]
    if split and sum(memory) <= 0:
        return None
    lowest = 0 if cpu is not None else n + 1
    for ngl in range(n + 1, lowest - 1, -1):
        where = _llama_cpp_layers(n, memory, ngl) if split else [None] * (n + 1)
        held = [0] * len(split)
        for il in range(n):
            if where[il] is not None:
                held[where[il]] += cost.layer_weight_bytes
        if where[n] is not None:
            held[where[n]] += cost.head_bytes
        if any(h > m for h, m in zip(held, memory)):
            continue
        counts = [0] * len(devices)
        for il in range(n):
            counts[cpu if where[il] is None else split[where[il]]] += 1
        if cpu is not None:
            on_cpu = sum(1 for il in range(n) if where[il] is None)
            need = stage_weight_bytes(cost, on_cpu, first=True, last=where[n] is None)
            if need > devices[cpu].memory:
                return None  # fewer layers offloaded would only put more on the CPU
        return counts
    return None


def _llama_cpp_order(devices: list[DeviceInfo]) -> list[int]:
    """The host CPU first (it holds the first layers), then the split's devices, then the CPUs left out."""
    cpu, split = _llama_cpp_roles(devices)
    return _with_rest(([cpu] if cpu is not None else []) + split, len(devices))


# ---- vLLM ----------------------------------------------------------------------------------------------------------

def vllm_split(cost: ModelCost, devices: list[DeviceInfo]) -> list[int]:
    """vLLM's pipeline-parallel partition, one rank per device in the listed order.

    Follows vllm-project/vllm, vllm/distributed/utils.py, `get_pp_indices` (without VLLM_PP_LAYER_PARTITION): each
    of the pp_size partitions gets num_layers // pp_size layers, and the remaining r layers go one each to
    partitions[-2], ..., partitions[-(r + 1)]: never the last (it has the final norm and LM head), nor the first
    while r <= pp_size - 2. 10 layers on 3 ranks: [3, 4, 3].
    """
    pp_size = len(devices)
    per = cost.num_layers // pp_size
    partitions = [per] * pp_size
    remaining = cost.num_layers % pp_size
    for i in range(2, remaining + 2):
        partitions[-i] += 1
    return partitions


# ---- the table -----------------------------------------------------------------------------------------------------

PEERS: dict[str, Callable[[ModelCost, list[DeviceInfo]], list[int] | None]] = {
    "Accelerate (infer_auto_device_map)": accelerate_split,
    "exo (memory-weighted ring)": exo_split,
    "llama.cpp (--tensor-split by VRAM)": llama_cpp_split,
    "vLLM (even pipeline split)": vllm_split,
}

# The order each system runs its stages in, as indices into the listed devices.
ORDERS: dict[str, Callable[[list[DeviceInfo]], list[int]]] = {
    "Accelerate (infer_auto_device_map)": lambda devices: _with_rest(_accelerate_order(devices), len(devices)),
    "exo (memory-weighted ring)": _exo_order,
    "llama.cpp (--tensor-split by VRAM)": _llama_cpp_order,
    "vLLM (even pipeline split)": lambda devices: list(range(len(devices))),
}


def price(cost: ModelCost, devices: list[DeviceInfo], counts: list[int], *, order: list[int] | None = None,
          **plan_kwargs) -> Plan | None:
    """A split priced by Strata's cost model: plan() over the devices with a nonzero count, with those counts and no
    search, the devices taken in the listed order (or in `order`, indices into `devices`, e.g. ORDERS[name]).
    plan_kwargs: batch_size, context_len, kv_reserve_tokens, block_size, link_bandwidth, ... as plan() takes them.
    The stages' device_index is into `devices`. None where a stage does not hold its weights plus KV for
    kv_reserve_tokens (PlacementError)."""
    if len(counts) != len(devices):
        raise ValueError(f"{len(counts)} counts for {len(devices)} devices")
    sequence = list(range(len(devices))) if order is None else list(order)
    if sorted(sequence) != list(range(len(devices))):
        raise ValueError(f"order {sequence} is not an order of the {len(devices)} devices")
    used = [i for i in sequence if counts[i] > 0]
    try:
        result = plan(cost, [devices[i] for i in used], layers=[counts[i] for i in used], **plan_kwargs)
    except PlacementError:
        return None
    for stage in result.stages:
        stage.device_index = used[stage.device_index]
    return result
