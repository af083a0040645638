"""Weight-only quantized linear layers, applied to a built model (the model itself never knows).

- int4: GGUF Q4_0/Q4_1 blocks (32 weights: x = d*q + m, or d*(q-8)) map exactly onto torch's int4pack
  groups (x = (q-8)*scale + zero) with scale = d, zero = m + 8d (Q4_0: zero = 0). Nothing is requantized;
  only the scales are rounded to bf16, the kernel's scale format.
- int8: per-output-channel symmetric int8 (torch's int8pack kernel), for matrices stored in other formats.

Both kernels take bf16 activations; the plan runs the rest of the network in bf16 too.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from metronome.kernels.blocks import BLOCK_KINDS, FILE_KINDS, PACKED_KINDS, Q4_PACKED_KIND, Q8_0_KIND
from metronome.kernels.decoder import BlockPart
from metronome.kernels.ops import CppOps
from metronome.model.loader import QuantTensor

GROUP = 32  # GGUF's block size, used as the int4 group size


class Int4Linear(nn.Module):
    """y = x @ W.T (+ b) with W held as packed 4-bit groups of 32 along the input dimension."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_zeros: torch.Tensor,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)  # (in/32, out, 2) bf16
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = out_features, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, GROUP, self.scales_zeros
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes


class Int8Linear(nn.Module):
    """y = x @ W.T (+ b) with W as int8 rows and one bf16 scale per output channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_int8", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bf16
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, self.scales
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    @property
    def nbytes(self) -> int:
        return self.weight_int8.nbytes + self.scales.nbytes


class Q8Linear(nn.Module):
    """y = x @ W.T with W kept as the file's Q8_0 blocks (an fp16 scale per 32 int8 weights), read by a
    fused kernel: the LM head of most GGUF files, at its stored precision."""

    def __init__(self, blocks: torch.Tensor, out_features: int, in_features: int, ops) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks)  # (out, in/32*34) uint8
        self.out_features, self.in_features = out_features, in_features
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.ops.q8_0_linear(x.reshape(-1, shape[-1]), self.blocks)  # float32
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


def q4_fields(t: QuantTensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A GGUF Q4_0/Q4_1 matrix's blocks as stored: d (N, K/32) fp16, m (N, K/32) fp16 (None for Q4_0,
    whose m is -8d), and the 16 code bytes of each block (N, K/32, 16)."""
    n, k = t.shape
    width = 20 if t.qtype == "Q4_1" else 18
    raw = np.ascontiguousarray(t.raw).reshape(n, k // GROUP, width)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0]
    if t.qtype == "Q4_1":
        return d, raw[..., 2:4].copy().view(np.float16)[..., 0], raw[..., 4:20]
    return d, None, raw[..., 2:18]


def q4_blocks(t: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (N, K) int32 in [0, 16), scales d and zeros (N, K/32) float32 with x = (q-8)*d + zero."""
    n, k = t.shape
    d16, m16, qs = q4_fields(t)
    d = d16.astype(np.float32)
    zero = m16.astype(np.float32) + 8.0 * d if m16 is not None else np.zeros_like(d)
    codes = q4_codes(qs).reshape(n, k).astype(np.int32)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero)


def q4_codes(qs: np.ndarray) -> np.ndarray:
    """A Q4 block's 16 code bytes (..., 16) as its 32 codes (..., 32) in [0, 16), in weight order: byte j
    holds weight j in its low nibble and weight j + 16 in its high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# torch's CPU int4 packing takes output rows in multiples of this (an odd vocabulary's head, such as GPT-2's
# 50,257 rows, is refused with a RuntimeError); such a matrix runs as int8 per channel instead
INT4_ROWS = 16


def int4_packs(t: QuantTensor) -> bool:
    """torch's int4 kernels can hold `t` (a Q4_0/Q4_1 matrix)."""
    return t.shape[0] % INT4_ROWS == 0


def int4_linear(t: QuantTensor, bias: torch.Tensor | None) -> Int4Linear:
    n, k = t.shape
    codes, d, zero = q4_blocks(t)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_zeros = torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/32, N, 2)
    return Int4Linear(packed, scales_zeros, n, k, None if bias is None else bias.to(torch.bfloat16))


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Linear(q, scales.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))


def quantize(model: nn.Module, weights: dict[str, QuantTensor | torch.Tensor], mode: str, q8_ops=None) -> nn.Module:
    """Replace every nn.Linear in `model` (in place): int4 where the file holds Q4_0/Q4_1 blocks, mode is
    "int4" and torch's int4 kernels take its row count (`int4_packs`); the file's own Q8_0 blocks where
    `q8_ops` (ops with a fast `q8_0_linear`) is given; int8 per channel otherwise. `weights` are the loader's (possibly quantized) tensors."""
    from metronome.model.transformer import weight_sources

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            names = weight_sources(f"{full}.weight")
            if names == ["head.weight"] and "head.weight" not in weights:
                names = ["embed.weight"]  # tied
            source = QuantTensor.stack([weights[n] for n in names])
            bias = child.bias.detach() if child.bias is not None else None
            if mode == "int4" and source is not None and source.qtype in ("Q4_0", "Q4_1") and int4_packs(source):
                new: nn.Module = int4_linear(source, bias)
            elif q8_ops is not None and bias is None and source is not None and source.qtype == "Q8_0":
                blocks = torch.from_numpy(np.array(source.raw)).reshape(source.shape[0], -1)  # a writable copy
                new = Q8Linear(blocks, source.shape[0], source.shape[1], q8_ops)
            else:
                new = int8_linear(child.weight.detach(), bias)
            setattr(parent, child_name, new)
    return model


# ---------------------------------------------------------------------------------------------
# Block formats of the fused CPU decoder (csrc/blocks.h, block_linear_rows): the kind codes and sizes
# are kernels.blocks' (Q8_0_KIND, Q4_PACKED_KIND, PACKED_KINDS, FILE_KINDS), checked there against the C++ export.


def pack_16_rows(part: QuantTensor, ops: CppOps) -> tuple[torch.Tensor, int]:
    """A Q5_0, Q4_K, Q6_K, Q8_0, Q4_0 or Q4_1 tensor's blocks repacked 16 rows side by side (csrc/pack.cpp;
    the layouts are in csrc/blocks.cpp), with their block kind. Exact: the file's scales, minimums and codes
    are moved, not recomputed (Q4_0 becomes Q4_1 with m = -8d, exact in fp16; where a scale is too large for
    that, Q8_0 of the same weights)."""
    packed = {**PACKED_KINDS, "Q4_0": Q4_PACKED_KIND, "Q4_1": Q4_PACKED_KIND}
    if part.qtype not in packed:
        raise ValueError(f"pack_16_rows packs {', '.join(packed)} tensors, got {part.qtype}")
    if part.qtype == "Q4_0" and np.abs(q4_fields(part)[0].astype(np.float32)).max(initial=0.0) > Q4_0_MAX_SCALE:
        part = q4_0_as_q8_0(part)
    rows, k = part.shape
    kind = BLOCK_KINDS[packed[part.qtype]]
    return ops.pack_x16(file_view(part.raw, rows), kind, rows, k), kind


# Q4_0's m = -8d is exact in fp16 only while 8|d| fits in it (fp16's largest is 65,504). A larger scale is
# legal, if never seen in a real file; m overflowed to -inf and the whole row's output with it
Q4_0_MAX_SCALE = 65504.0 / 8


def q4_0_as_q8_0(part: QuantTensor) -> QuantTensor:
    """Q4_0 blocks as Q8_0 blocks of the same weights, exactly: the same fp16 d, and each code q as the int8
    q - 8 (34 bytes a block where Q4_0 has 18)."""
    n, k = part.shape
    d, _, qs = q4_fields(part)
    codes = q4_codes(qs).astype(np.int16) - 8
    blocks = np.concatenate([d[..., None].view(np.uint8), codes.astype(np.int8).view(np.uint8)], axis=-1)
    return QuantTensor(np.ascontiguousarray(blocks.reshape(n, -1)), "Q8_0", part.shape)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Dense (N, K) weights -> GGUF Q8_0 rows (N, K/32*34) uint8: per 32 weights an fp16 d = max|w|/127
    (the file format's scale, bit for bit) and round(w / d) as int8, divided by d as stored in fp16 where
    llama.cpp's quantizer divides by the float32 d: 0.7 % of codes differ by one from its, and they dequantize
    slightly closer to w (summed squared error 7.509 against 7.518 on torch.randn(256, 1024), seed 0)."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"Q8_0 needs the input dimension to be a multiple of {GROUP}, got {k}")
    blocks = w.float().reshape(n, k // GROUP, GROUP)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    d16 = d.to(torch.float16)
    inv = torch.where(d16 > 0, 1.0 / d16.float(), torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp(-127, 127).to(torch.int8)
    out = torch.cat([d16.view(torch.uint8).reshape(n, -1, 2), q.view(torch.uint8)], dim=-1)  # (N, nb, 34)
    return out.reshape(n, -1).contiguous()


def dense(w: QuantTensor | torch.Tensor) -> torch.Tensor:
    """A loader weight as a float32 tensor."""
    return w.dequantize() if isinstance(w, QuantTensor) else w.float()


def file_view(raw: np.ndarray, rows: int) -> torch.Tensor:
    """A GGUF tensor's stored blocks as a (rows, bytes per row) uint8 tensor sharing the loader's memory:
    for a GGUF file, its read-only map (no copy; pages come in as the kernels first read them)."""
    arr = np.asarray(raw).reshape(rows, -1)
    with warnings.catch_warnings():
        # torch warns that writing through a read-only array is undefined; the kernels only read it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def block_matrix(
    parts: list[QuantTensor | torch.Tensor], mode: str, ops: CppOps, cached: list[BlockPart] | None = None
) -> list[BlockPart]:
    """The rows of `parts` stacked, in the fused decoder's formats: one (blocks, kind, rows) segment per
    part. Q5_0, Q4_K, Q6_K and Q8_0 blocks are repacked 16 rows side by side (pack_16_rows: the same bits,
    faster to multiply than the file's rows); the other blocks the kernels read as the
    file stores them (Q5_1, Q5_K) stay views of the file; Q4_0/Q4_1 blocks are repacked 16 rows side by
    side when mode is "int4"; anything else is quantized to Q8_0 (32-weight blocks, finer than per-channel
    int8). `cached`: the same matrix from the plan cache (`cacheable`), whose packed segments are taken
    instead of packing again."""
    segments: list[BlockPart] = []
    for i, part in enumerate(parts):
        rows = part.shape[0]
        saved = cached[i] if cached is not None else None
        if saved is not None and saved[0] is not None:
            segments.append(saved)
        elif isinstance(part, QuantTensor) and part.qtype in PACKED_KINDS:
            segments.append((*pack_16_rows(part, ops), rows))
        elif isinstance(part, QuantTensor) and part.qtype in FILE_KINDS:
            segments.append((file_view(part.raw, rows), FILE_KINDS[part.qtype], rows))
        elif mode == "int4" and isinstance(part, QuantTensor) and part.qtype in ("Q4_0", "Q4_1"):
            segments.append((*pack_16_rows(part, ops), rows))
        else:
            segments.append((quantize_q8_0(dense(part)), Q8_0_KIND, rows))
    return segments


def cacheable(segments: list[BlockPart]) -> list[tuple[torch.Tensor | None, int, int]]:
    """A matrix as the plan cache keeps it: packed segments as they are, views of the file as None
    (block_matrix takes them from the file again, at no cost; the cache stays the size of what was packed)."""
    file_kinds = set(FILE_KINDS.values())
    return [(None if kind in file_kinds else blocks, kind, rows) for blocks, kind, rows in segments]
