"""The mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), in plain PyTorch.

Each token row is routed on its own: softmax over the router's logits (float32), the `experts_per_token`
best experts, ties going to the lowest expert id, the k weights optionally renormalized. A row's output
is the weighted sum of its experts' outputs, added in expert-id order, so it depends on that row alone
(the determinism contract; docs/moe.md). Two ways to run the experts, same values:

- "gather" (default): each expert runs on exactly the rows routed to it (reads only the active experts).
  Row-independent as long as the linear kernels give a row the same bits at any row count, which is
  what the plan's probe checks ("compact").
- "dense": every expert runs on every row and unrouted rows get weight zero: fixed shapes whatever the
  routing (CUDA graphs, or a plan whose probe chose "fixed"). Set with `use_dense_dispatch`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from metronome.config import ModelConfig
from metronome.kernels.ops import Ops, TorchOps


def route(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> weights (N, k) float32 and expert ids (N, k) int64, best first.

    Softmax in float32, then the k largest; a stable descending sort puts equal probabilities in
    ascending expert-id order, so ties go to the lowest id (torch.topk does not promise an order)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    top, ids = top[:, :k], ids[:, :k]
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return top, ids


class Router(nn.Module):
    """x @ W.T in float32; W stays float32 whatever the plan's weight format (routing decides which
    experts run, so it is kept at the file's precision, as llama.cpp does)."""

    def __init__(self, outputs: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.float().T


class Expert(nn.Module):
    """One gated MLP (SwiGLU) of width `width`: an expert, or the shared expert."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(hidden, 2 * width, bias=False)  # gate, up stacked
        self.w_down = nn.Linear(width, hidden, bias=False)
        self.ops: Ops = TorchOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.ops.silu_mul(self.w_gate_up(x)))


class MoE(nn.Module):
    """The sparse feed-forward block: router, experts, and an optional gated shared expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.k, self.normalize = cfg.experts_per_token, cfg.norm_topk_prob
        self.router = Router(cfg.num_experts, d)
        self.experts = nn.ModuleList(Expert(d, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared = Expert(d, cfg.shared_expert_size) if cfg.shared_expert_size else None
        self.shared_gate = Router(1, d) if cfg.shared_expert_size else None
        self.dense = False  # see the module docstring; `use_dense_dispatch`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = route(self.router(flat), self.k, self.normalize)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        add_experts(out, flat, weights, ids, [lambda r, e=e: e(r).float() for e in self.experts], self.dense)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat).float()
        return out.to(x.dtype).reshape(shape)


def add_experts(
    out: torch.Tensor,
    flat: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    experts: list[Callable[[torch.Tensor], torch.Tensor]],
    dense: bool,
) -> None:
    """Add each routed expert's float32 output, times its routing weight, into `out` (N, D), in expert-id
    order: on exactly the rows routed to it, or (`dense`) on every row with weight zero where unrouted."""
    for e, expert in enumerate(experts):
        if dense:
            w = (weights * (ids == e)).sum(dim=-1, keepdim=True)  # (N, 1): 0 where e was not chosen
            out += expert(flat) * w
            continue
        rows, rank = (ids == e).nonzero(as_tuple=True)  # rows ascending
        if rows.numel():
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, rank, None])


def use_dense_dispatch(model: nn.Module) -> nn.Module:
    """Run every MoE block of `model` at fixed shapes (every expert on every row; same values)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.dense = True
    return model


def active_weight_bytes(total: int, expert_bytes: int, cfg: ModelConfig) -> int:
    """Bytes one token's decode step reads, from `total` (every matrix once) where `expert_bytes` of it
    are the routed experts' matrices (all layers, all experts): only `experts_per_token` of every
    `num_experts` are read per token; the router and any shared expert always are. The one accounting
    the plan report, `bench --decode-only` and the fleet planner use (docs/moe.md)."""
    if not cfg.is_moe:
        return total
    return total - expert_bytes + expert_bytes * cfg.experts_per_token // cfg.num_experts
