"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router scores every expert for each token, each token
goes to the experts_per_token highest, and its output is their outputs weighted by the router's probabilities
(renormalised over the chosen ones where the family does), plus a shared expert every token takes where the family
has one (Qwen2-MoE, scaled by a sigmoid gate).

The experts run grouped: the tokens routed to each expert are gathered into one block of rows, and each expert with
any tokens multiplies its block once, through the same products a dense layer's MLP uses (engine.model.linear: the
engine's bf16 and quantized kernels on a CPU). The host loops over the experts a step reached, never over tokens.
Each token's outputs are added back in expert order, as the reference implementation adds them (on a CPU; a GPU's
index_add_ adds in any order). On a GPU whose experts are plain matrices, the experts' weights are stacked and all
blocks go through one grouped GEMM per product (torch's, CUTLASS on Hopper): no loop on the host and no wait for the
routing to reach it.
"""
from __future__ import annotations

import torch

from engine.model.layer_ops import GATED
from engine.model.linear import Linear


class ExpertProducts:
    """A mixture-of-experts layer's products. router: the router's logits, and the shared expert's gate as one more
    column where it has one; experts: (gate_up, down) per expert; shared: the shared expert's (gate_up, down).
    host: where the routed experts live elsewhere than the rest (a GPU stage's experts kept in host memory, run by
    the host's CPU), (compute dtype there, its gated activation); None: beside the rest."""

    __slots__ = ("router", "experts", "shared", "top_k", "normalise", "host", "stacked")

    def __init__(self, prefix: str, cfg, products, expert_products=None) -> None:
        """expert_products: builds the routed experts where they live elsewhere (on the host's CPU)."""
        m = prefix + "mlp."
        self.router = products([m + "gate.weight"] + ([m + "shared_expert_gate.weight"]
                                                      if cfg.shared_expert_intermediate_size else []))
        self.experts = [_mlp(f"{m}experts.{e}.", expert_products or products) for e in range(cfg.num_experts)]
        self.shared = _mlp(m + "shared_expert.", products) if cfg.shared_expert_intermediate_size else None
        self.top_k, self.normalise = cfg.experts_per_token, cfg.norm_topk_prob
        self.host = None if expert_products is None else (expert_products.compute_dtype, GATED[cfg.activation])
        # (gate_up [E, 2I, H], down [E, H, I]): every expert's weights in one tensor each, for the grouped GEMM
        # (stack()); None: one product per expert.
        self.stacked = None

    def stack(self) -> bool:
        """Stack plain experts' weights for the grouped GEMM, where it runs on them (each expert's products then
        view the stack, so the weights are held once); whether they were. A GPU stage stacks the experts it keeps
        (not those it packs to copy in every step: a packed view would be stored beside its stack)."""
        plain = all(isinstance(p, Linear) and p.bias is None for pair in self.experts for p in pair)
        if not self.experts or self.host is not None or not plain:
            return False
        gate_up = torch.stack([g.weight for g, _ in self.experts])
        if not grouped_gemm_runs(gate_up):
            return False
        down = torch.stack([d.weight for _, d in self.experts])
        self.experts = [(Linear(gate_up[e], None), Linear(down[e], None)) for e in range(len(self.experts))]
        self.stacked = (gate_up, down)
        return True

    def __call__(self, h: torch.Tensor, silu_mul, load: torch.Tensor | None = None) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden]; silu_mul: the gated activation ([T, 2I] -> [T, I]); load: a [experts]
        counter the tokens routed to each expert are added to."""
        n = len(self.experts)
        logits = self.router(h)
        probs = torch.softmax(logits[:, :n].float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.host is not None:
            y = self._on_host(h, chosen, weights, load)
        elif self.stacked is not None:
            y = self._grouped_gemm(h, chosen, weights, silu_mul, load)
        elif h.shape[0] == 1:  # one token (a single stream's decode): its experts one after the other
            y = self._one_token(h, chosen[0].tolist(), weights[0].to(h.dtype).unbind(), silu_mul)
            if load is not None:
                load.index_add_(0, chosen[0], torch.ones_like(chosen[0]))
        else:
            y = self._grouped(h, chosen, weights, silu_mul, load)
        if self.shared is not None:
            gate_up, down = self.shared
            y.add_(torch.sigmoid(logits[:, n:].to(h.dtype)) * down(silu_mul(gate_up(h))))
        return y

    def _grouped_gemm(self, h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, silu_mul,
                      load: torch.Tensor | None) -> torch.Tensor:
        """Every expert's block through one grouped GEMM per product, the blocks' ends on the device: nothing here
        waits for the routing."""
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(len(self.experts), dtype=torch.int64, device=h.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        if load is not None:
            load += counts
        rows = order // self.top_k
        ends = counts.cumsum(0).to(torch.int32)
        gate_up, down = self.stacked
        mid = silu_mul(torch._grouped_mm(h.index_select(0, rows), gate_up.transpose(1, 2), offs=ends))
        out = torch._grouped_mm(mid, down.transpose(1, 2), offs=ends)
        out.mul_(weights.flatten()[order].unsqueeze(1).to(h.dtype))
        return torch.zeros_like(h).index_add_(0, rows, out)

    def _on_host(self, h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                 load: torch.Tensor | None) -> torch.Tensor:
        """The routed experts run by the host's CPU: the tokens' rows and their routing copied to it, the experts'
        summed outputs copied back."""
        dtype, act = self.host
        if load is not None:  # counted where the stage keeps its load
            load.index_add_(0, chosen.flatten(), torch.ones_like(chosen.flatten()))
        cpu = torch.device("cpu")
        x, chosen, weights = h.to(cpu, dtype), chosen.to(cpu), weights.to(cpu)
        if x.shape[0] == 1:
            y = self._one_token(x, chosen[0].tolist(), weights[0].to(dtype).unbind(), act)
        else:
            y = self._grouped(x, chosen, weights, act, None)
        return y.to(h.device, h.dtype)

    def _one_token(self, h: torch.Tensor, chosen: list[int], weights: tuple[torch.Tensor, ...], silu_mul) -> torch.Tensor:
        """One token's output: its experts' outputs, weighted, summed in expert order."""
        y = None
        for e, w in sorted(zip(chosen, weights), key=lambda ew: ew[0]):
            gate_up, down = self.experts[e]
            out = down(silu_mul(gate_up(h))).mul_(w)
            y = out if y is None else y.add_(out)
        return y

    def _grouped(self, h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, silu_mul,
                 load: torch.Tensor | None) -> torch.Tensor:
        """Many tokens: each expert multiplies the block of tokens routed to it at once."""
        n = len(self.experts)
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)  # the (token, choice) pairs grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=n)
        if load is not None:
            load += counts
        rows = order // self.top_k
        sizes = counts.tolist()
        blocks = h.index_select(0, rows).split(sizes)  # each expert's tokens, one view each
        if not rows.numel():
            return torch.zeros_like(h)
        outs = []
        for e, block in enumerate(blocks):
            if sizes[e]:
                gate_up, down = self.experts[e]
                outs.append(down(silu_mul(gate_up(block))))
        out = torch.cat(outs).mul_(weights.flatten()[order].unsqueeze(1).to(h.dtype))
        return torch.zeros_like(h).index_add_(0, rows, out)


def grouped_gemm_runs(weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM multiplies rows by stacked weights like these ([E, out, in]) on their device: one
    row is run through it (a device without the kernel, or shapes and strides it does not take, raise)."""
    try:
        x = torch.zeros(1, weights.shape[2], dtype=weights.dtype, device=weights.device)
        offs = torch.ones(weights.shape[0], dtype=torch.int32, device=weights.device)
        torch._grouped_mm(x, weights.transpose(1, 2), offs=offs)
    except (RuntimeError, AttributeError, TypeError):
        return False
    return True


def _mlp(prefix: str, products) -> tuple:
    return products([prefix + "gate_proj.weight", prefix + "up_proj.weight"]), products([prefix + "down_proj.weight"])
