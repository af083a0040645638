"""One layer's weights for the C++ fused decoder (csrc/decoder.h, `Decoder.add_layer`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

__all__ = ["BlockPart", "LayerWeights"]

BlockPart = tuple[Tensor, int, int]  # (blocks, kind, rows)


@dataclass(frozen=True)
class LayerWeights:
    """The arguments of `Decoder.add_layer`, by name. Each matrix is a list of (blocks, kind, rows) parts
    whose rows are stacked in order (kernels.blocks: a q/k/v matrix whose parts the file stores in different
    formats keeps each in its own); norms are contiguous float32 vectors; the decoder keeps a reference to
    every tensor it is given."""

    qkv: list[BlockPart]
    qkv_bias: Tensor | None
    o: list[BlockPart]
    gate_up: list[BlockPart]
    down: list[BlockPart]
    attn_norm: Tensor
    mlp_norm: Tensor
    post_attn_norm: Tensor | None = None
    post_mlp_norm: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    window: int = 0  # 0: global attention
    local_rope: bool = False  # use the local (sliding-window) RoPE table
    moe: Any = None  # a C++ MoeLayer (CppOps.moe_layer) in place of the MLP; gate_up and down are then []
    # tensor parallel (parallel/fused_tp.py): o / down as chunks of equal K ranges (then o / down are [])
    o_chunks: list[list[BlockPart]] = field(default_factory=list)
    down_chunks: list[list[BlockPart]] = field(default_factory=list)
    moe_chunks: list[Any] = field(default_factory=list)  # the MoE block as chunks of every expert's width (moe None)

    def kwargs(self) -> dict[str, Any]:
        """The fields as add_layer's keyword arguments (the tensors themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
