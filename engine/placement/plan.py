"""A placement's result: per stage its device, layers, memory and predicted times."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.placement.devices import DeviceInfo


@dataclass(slots=True)
class StagePlan:
    device: DeviceInfo
    device_index: int  # into the list given to plan()
    layers: tuple[int, int]  # [start, end)
    weight_bytes: int
    kv_bytes_per_token: int  # of its layers
    kv_capacity_tokens: int  # what its memory holds beside the weights
    predicted_s: dict[int, float]  # batch size -> seconds per step, compute plus the transfer in
    compute_s: dict[int, float] = field(default_factory=dict)
    transfer_s: dict[int, float] = field(default_factory=dict)
    kv_blocks: int = 0  # what the stage will allocate (engine.placement.cost.kv_cache_blocks)
    streamed_layers: tuple[int, ...] = ()  # brought in from its device's tier each step (model indices)
    fetch_s: dict[int, float] = field(default_factory=dict)  # batch size -> seconds reading them, overlapped
    # Per layer, the format the planner chose it to run at (engine.placement.precision); empty where it chose none.
    formats: tuple[str, ...] = ()
    # Mixture-of-experts layers (model indices) whose routed experts a GPU stage keeps in host memory, run by the
    # host's CPU (engine.placement.cost.expert_layers_to_host).
    host_experts: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(slots=True)
class Plan:
    stages: list[StagePlan]
    batch_size: int
    context_len: int
    bottleneck_s: float  # the slowest stage's predicted step at batch_size
    block_size: int = 16
    kv_reserve_tokens: int = 0

    @property
    def num_kv_blocks(self) -> int:
        """The blocks every stage holds, so the pipeline's: the fewest any stage allocates."""
        return min(s.kv_blocks for s in self.stages)
