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

    def kv_blocks(self, block_size: int | None = None) -> list[int]:
        bs = block_size or self.block_size
        return [max(s.kv_capacity_tokens, 0) // bs for s in self.stages]
