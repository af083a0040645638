"""The MoE blocks of the fused CPU decoder: one C++ `MoeLayer` per layer (kernels/csrc/moe.h), its experts in
the decoder's block formats. Static dispatch inside: no drops, no allocation per step, only the chosen
experts' blocks are read (docs/moe.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from metronome.compile.quant import dense
from metronome.config import ModelConfig
from metronome.kernels.decoder import BlockPart
from metronome.kernels.ops import CppOps
from metronome.model.loader import Weight
from metronome.model.transformer import FUSED

Matrix = Callable[..., list[BlockPart]]  # FusedRunner's matrix(*names): the named rows stacked, as block parts


@dataclass(frozen=True)
class MoeCut:
    """One rank's MoE blocks cut for tensor parallel (parallel/fused_tp.py `rank_weights`): per layer, the
    weights of each of the rank's chunks under the file's names (every expert's gate and up rows and down
    columns of one width range, the shared expert's likewise; the router and the shared gate whole), and
    `cfg`, the model with one chunk's expert widths. Each chunk becomes a block of its own, whose output is
    one partial sum of the layer's (the decoder adds them in chunk order, as parallel/tp.py `ChunkedMoE`)."""

    cfg: ModelConfig
    layers: dict[int, list[dict[str, Weight]]]


def part_bytes(parts: list[BlockPart]) -> int:
    return sum(blocks.nbytes for blocks, _kind, _rows in parts)


def fused_moe_layer(
    ops: CppOps, cfg: ModelConfig, weights: dict[str, Weight], layer: int, matrix: Matrix
) -> tuple[Any, int, int]:
    """Layer `layer`'s MoE block: (the C++ MoeLayer, bytes of its routed experts' matrices, bytes of its
    float32 router and shared-expert gate). Matrices are built through `matrix` in a fixed order (each
    expert's gate_up then down, then the shared expert's), which is the plan cache's order."""
    p = f"layers.{layer}."
    gate_up, down = [], []
    for e in range(cfg.num_experts):
        q = f"{p}experts.{e}."
        gate_up.append(matrix(*(q + f"{n}.weight" for n in FUSED["w_gate_up"])))
        down.append(matrix(q + "w_down.weight"))
    experts = sum(part_bytes(g) + part_bytes(d) for g, d in zip(gate_up, down))
    router = dense(weights[p + "router.weight"]).contiguous()
    shared_gate_up: list[BlockPart] = []
    shared_down: list[BlockPart] = []
    shared_gate: torch.Tensor | None = None
    if cfg.shared_expert_size:
        shared_gate_up = matrix(*(f"{p}shared.{n}.weight" for n in FUSED["w_gate_up"]))
        shared_down = matrix(p + "shared.w_down.weight")
        shared_gate = dense(weights[p + "shared_gate.weight"]).reshape(-1).contiguous()
    block = ops.moe_layer(
        router=router,
        gate_up=gate_up,
        down=down,
        width=cfg.moe_intermediate_size,
        top_k=cfg.experts_per_token,
        normalize=cfg.norm_topk_prob,
        shared_gate_up=shared_gate_up,
        shared_down=shared_down,
        shared_width=cfg.shared_expert_size,
        shared_gate=shared_gate,
    )
    floats = router.nbytes + (shared_gate.nbytes if shared_gate is not None else 0)
    return block, experts, floats
