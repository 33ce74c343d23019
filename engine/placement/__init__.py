"""Where each layer runs: the devices, the cost model, the search over device orders and layer splits, and a plan's
rendering. What this package exports imports no torch, so `strata plan` and its tests start fast; the probe
(probe.py), the torch side of a device (local_device.py) and the plan built on this machine (planning.py) are
imported by name."""
from engine.placement.cost import (DTYPE_BYTES, GEMM_ROWS, SMALL_GEMM_ROWS, THIN_ROWS, LinkSpeed, ModelCost, StageTime,
                                   kv_cache_dtype, kv_capacity_tokens, layer_seconds, link_between,
                                   predict_stage_seconds, stage_fits, stage_kv_bytes_per_token, stage_seconds,
                                   stage_weight_bytes)
from engine.placement.devices import (DeviceInfo, DeviceRequest, parse_devices, parse_layers, parse_size,
                                      share_host_memory)
from engine.placement.plan import Plan, StagePlan
from engine.placement.render import GiB, peer_table, plan_json, plan_table, readable_size, throughput
from engine.placement.search import PlacementError, distinct_orders, min_max_split, plan

__all__ = [
    "DTYPE_BYTES", "GEMM_ROWS", "GiB", "SMALL_GEMM_ROWS", "THIN_ROWS", "DeviceInfo", "DeviceRequest", "LinkSpeed",
    "ModelCost", "PlacementError", "Plan", "StagePlan", "StageTime", "distinct_orders", "kv_cache_dtype",
    "kv_capacity_tokens", "layer_seconds", "link_between", "min_max_split", "parse_devices", "parse_layers",
    "parse_size", "peer_table", "plan", "plan_json", "plan_table", "throughput", "predict_stage_seconds", "readable_size", "share_host_memory",
    "stage_fits", "stage_kv_bytes_per_token", "stage_seconds", "stage_weight_bytes",
]
