"""The 16-row packed layouts (csrc/blocks.cpp: Q5_0X16, Q4_KX16, Q6_KX16, Q8_0X16, Q4_1X16) written a second time, in numpy,
from the layout comments: the reference tests/kernels/test_block_formats.py holds csrc/pack.cpp's bytes to."""

from __future__ import annotations

import numpy as np
import torch

from metronome.kernels.blocks import BLOCK_BYTES


def pack_q5_0(raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    """GGUF Q5_0 rows (N, K/32*22 bytes) -> 16 rows side by side (ceil(N/16), K/32*352) uint8, the layout
    csrc/blocks.cpp's Q5_0Codes reads: per block, 16 fp16 d, then 64 bytes of fifth-bit planes (byte 4r+j,
    bit g: row r's weight 4g+j), then 4 x 64 nibble bytes (vector v, byte 4r+j: row r's weight 8v+j low,
    8v+4+j high). Exact: the file's d and 5-bit codes are moved, not recomputed. Missing rows are zeros."""
    nb = k // 32
    blocks = np.asarray(raw).reshape(n, nb, 22)
    d = blocks[..., :2]  # (N, nb, 2) fp16 bytes
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # (N, nb, 32): fifth bit of weight j
    qs = blocks[..., 6:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (high << 4)  # (N, nb, 32) in [0, 32)
    groups = (n + 15) // 16
    pad = groups * 16 - n
    if pad:
        d = np.pad(d, ((0, pad), (0, 0), (0, 0)))
        codes = np.pad(codes, ((0, pad), (0, 0), (0, 0)))
    d = d.reshape(groups, 16, nb, 2).transpose(0, 2, 1, 3).reshape(groups, nb, 32)
    # (G, nb, quad g, row r, j): weight 4g+j of row r
    quads = codes.reshape(groups, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4)
    fifth = (quads >> 4).reshape(groups, nb, 8, 64).transpose(0, 1, 3, 2)  # (G, nb, byte 4r+j, quad g)
    bits = np.packbits(fifth, axis=-1, bitorder="little").reshape(groups, nb, 64)
    low = quads & 0x0F
    nibbles = (low[:, :, 0::2] | (low[:, :, 1::2] << 4)).reshape(groups, nb, 256)  # vector v: quads 2v, 2v+1
    out = np.concatenate([d, bits, nibbles], axis=-1).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(groups, nb * BLOCK_BYTES["Q5_0X16"]))


def _by_16_rows(a: np.ndarray, n: int) -> np.ndarray:
    """(N, nb, ...) per-row fields -> (G, nb, 16, ...): groups of 16 rows, block-major, rows side by side;
    missing rows of the last group are zeros."""
    groups = (n + 15) // 16
    if groups * 16 != n:
        a = np.pad(a, [(0, groups * 16 - n)] + [(0, 0)] * (a.ndim - 1))
    return np.moveaxis(a.reshape(groups, 16, *a.shape[1:]), 1, 2)


def _nibble_vectors(codes: np.ndarray) -> np.ndarray:
    """(G, nb, 16, W) codes' low 4 bits -> (G, nb, W/8, 64) nibble vectors: vector v, byte 4r+i = row r's
    weight 8v+i in the low nibble and 8v+4+i in the high one (csrc/blocks.cpp, nibble_quads)."""
    g, nb, _, width = codes.shape
    quads = np.moveaxis((codes & 0x0F).reshape(g, nb, 16, width // 4, 4), 2, 3)  # (G, nb, quad, row, i)
    return (quads[:, :, 0::2] | (quads[:, :, 1::2] << 4)).reshape(g, nb, width // 8, 64)


def pack_q4_k(raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    """GGUF Q4_K rows (N, K/256*144 bytes) -> 16 rows side by side (ceil(N/16), K/256*2368) uint8, the
    layout csrc/blocks.cpp's Q4_Kx16 reads: per super-block, 16 fp16 d, 16 fp16 dmin, the 6-bit scales
    and minimums unpacked to bytes, then the codes as nibble vectors. Exact: the file's d, dmin, scales,
    minimums and codes are moved, not recomputed. Missing rows are zeros."""
    nb = k // 256
    blocks = np.asarray(raw).reshape(n, nb, 144)
    s = blocks[..., 4:16].astype(np.uint8)  # the 12 scale bytes: 6-bit sc_j and m_j, j = 0..7
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(n, nb, 4, 32)  # 64 weights per 32 bytes: low nibbles first, then high
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 256)  # in weight order
    d, dmin = _by_16_rows(blocks[..., 0:2], n), _by_16_rows(blocks[..., 2:4], n)  # (G, nb, 16, 2)
    groups = d.shape[0]
    scales = np.swapaxes(_by_16_rows(sc, n), 2, 3)  # (G, nb, 8 sub-blocks, 16 rows)
    mins = np.swapaxes(_by_16_rows(mn, n).reshape(groups, nb, 16, 4, 2), 2, 3)  # (G, nb, pair, row, 2)
    out = np.concatenate(
        [a.reshape(groups, nb, -1) for a in (d, dmin, scales, mins, _nibble_vectors(_by_16_rows(codes, n)))], axis=-1
    )
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8).reshape(groups, nb * BLOCK_BYTES["Q4_KX16"]))


def pack_q6_k(raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    """GGUF Q6_K rows (N, K/256*210 bytes) -> 16 rows side by side (ceil(N/16), K/256*3360) uint8, the
    layout csrc/blocks.cpp's Q6_Kx16 reads: per super-block, 16 fp16 d, the int8 scales, then per 32
    weights the codes' low 4 bits as nibble vectors and their top 2 bits (vector h, byte 4r+i, bits
    2e..2e+1: row r's weight 16h+4e+i of the 32). Exact: the file's d, scales and codes are moved, not
    recomputed. Missing rows are zeros."""
    nb = k // 256
    blocks = np.asarray(raw).reshape(n, nb, 210)
    ql = blocks[..., 0:128].reshape(n, nb, 2, 2, 32)  # (half, low/high 32 bytes, l)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    # weight 128h + 32c + l: low 4 bits from ql[h][c % 2] (low nibble for c < 2), top 2 bits qh[h] >> 2c
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3)  # (n, nb, 2, 4, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)) & 3
    codes = _by_16_rows((low | (high << 4)).reshape(n, nb, 256), n)  # (G, nb, 16, 256) in [0, 64)
    groups = codes.shape[0]
    d = _by_16_rows(blocks[..., 208:210], n)
    scales = np.swapaxes(_by_16_rows(blocks[..., 192:208], n), 2, 3)  # (G, nb, 16 groups, 16 rows)
    nibbles = _nibble_vectors(codes).reshape(groups, nb, 8, 256)  # per 32 weights: 4 vectors
    top = np.moveaxis((codes >> 4).reshape(groups, nb, 16, 8, 2, 4, 4), 2, 5)  # (G, nb, t, h, e, row, i)
    top = (top << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 1, 4, 1, 1)).sum(axis=4, dtype=np.uint8)
    runs = np.concatenate([nibbles, top.reshape(groups, nb, 8, 128)], axis=-1)  # (G, nb, 8, 384)
    out = np.concatenate([d.reshape(groups, nb, -1), scales.reshape(groups, nb, -1), runs.reshape(groups, nb, -1)], -1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8).reshape(groups, nb * BLOCK_BYTES["Q6_KX16"]))


def pack_q8_0(raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    """GGUF Q8_0 rows (N, K/32*34 bytes) -> 16 rows side by side (ceil(N/16), K/32*544) uint8, the layout
    csrc/blocks.cpp's Q8_0x16 reads: per block, 16 fp16 d, then 8 x 64 code bytes (vector g, byte 4r+i: row
    r's weight 4g+i as q + 128). Exact: the file's d and codes are moved (the codes offset to unsigned),
    not recomputed. Missing rows are zeros."""
    nb = k // 32
    blocks = np.asarray(raw).reshape(n, nb, 34)
    d = _by_16_rows(blocks[..., :2], n)  # (G, nb, 16, 2)
    codes = _by_16_rows(blocks[..., 2:] ^ 0x80, n)  # (G, nb, 16 rows, 32): q + 128 as a byte (missing rows 0)
    groups = d.shape[0]
    quads = np.moveaxis(codes.reshape(groups, nb, 16, 8, 4), 2, 3)  # (G, nb, quad g, row r, i)
    out = np.concatenate([d.reshape(groups, nb, 32), quads.reshape(groups, nb, 512)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8).reshape(groups, nb * BLOCK_BYTES["Q8_0X16"]))


def pack_q4_1(raw: np.ndarray, n: int, k: int, has_min: bool = True) -> torch.Tensor:
    """GGUF Q4_1 rows (N, K/32*20 bytes), or Q4_0 rows (K/32*18, has_min=False: m = -8d in fp16) -> 16 rows
    side by side (ceil(N/16), K/32*320) uint8, the layout csrc/blocks.cpp's Q4_1Codes reads: per block, 16
    fp16 d, 16 fp16 m, then 4 nibble vectors. Missing rows are zeros."""
    nb = k // 32
    blocks = np.asarray(raw).reshape(n, nb, 20 if has_min else 18)
    d = blocks[..., :2]
    if has_min:
        m, qs = blocks[..., 2:4], blocks[..., 4:]
    else:
        m = (d.copy().view(np.float16).astype(np.float32) * -8.0).astype(np.float16).view(np.uint8)
        qs = blocks[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, nb, 32): weight j
    d16, m16 = _by_16_rows(d, n).reshape(-1, nb, 32), _by_16_rows(m, n).reshape(-1, nb, 32)
    nibbles = _nibble_vectors(_by_16_rows(codes, n)).reshape(-1, nb, 256)
    out = np.concatenate([d16, m16, nibbles], axis=-1).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(out.shape[0], nb * BLOCK_BYTES["Q4_1X16"]))
