"""One layer's weights for the C++ fused decoder (csrc/decoder.h, `Decoder.add_layer`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

__all__ = ["LayerWeights"]


@dataclass(frozen=True)
class LayerWeights:
    """The arguments of `Decoder.add_layer`, by name. Matrices are block tensors with their kind
    (kernels.blocks: Q8_0 rows or packed Q4 groups); norms are contiguous float32 vectors; the decoder keeps
    a reference to every tensor it is given."""

    qkv: Tensor
    qkv_kind: int
    qkv_bias: Tensor | None
    o: Tensor
    o_kind: int
    gate_up: Tensor
    gate_up_kind: int
    down: Tensor
    down_kind: int
    attn_norm: Tensor
    mlp_norm: Tensor
    post_attn_norm: Tensor | None = None
    post_mlp_norm: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    window: int = 0  # 0: global attention
    local_rope: bool = False  # use the local (sliding-window) RoPE table

    def kwargs(self) -> dict[str, Any]:
        """The fields as add_layer's keyword arguments (the tensors themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
