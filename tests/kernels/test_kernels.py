"""metronome.kernels.ops: the C++ kernels (CppOps) against the pure-torch reference (TorchOps) and float64.

Equality is bitwise where both sides evaluate the same float32 formula in the same order (residual add,
RoPE); elsewhere the tolerance is derived from how the two differ (reduction order, exp implementation)
and stated next to each check. Batch invariance is always bitwise: row i of an M-row call equals the
same row computed alone, for M = 1..8 (and the thread count does not matter either).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from metronome.kernels.ops import (
    CppOps,
    KernelBuildError,
    TorchOps,
    dequantize_kv_int8,
    dequantize_q8_0,
    kv_int8_row_bytes,
    load_kernels,
    quantize_kv_int8,
)

DTYPES = [torch.bfloat16, torch.float32]
REF = TorchOps()


@pytest.fixture(scope="module")
def cpp() -> CppOps:
    try:
        return load_kernels()
    except KernelBuildError as e:
        if "AVX-512" in str(e):  # another CPU kind: the kernels need x86-64 with AVX-512 or AVX2
            pytest.skip(str(e))
        raise


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |v| (float64), 2^(e-7); the smallest normal spacing below 2^-126."""
    e = torch.floor(torch.log2(v.double().abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 7)


def assert_within_bf16_ulp(a: torch.Tensor, b: torch.Tensor, ulps: float = 1.0, atol: float = 0.0) -> None:
    """Two bf16 roundings of float32 values that differ by a few float32 ulps land on the same bf16 value
    or on neighbours: allow `ulps` bf16 steps (of the larger magnitude), or `atol`."""
    assert a.dtype == b.dtype == torch.bfloat16
    diff = (a.double() - b.double()).abs()
    tol = (ulps * bf16_ulp(torch.maximum(a.double().abs(), b.double().abs()))).clamp_min(atol)
    bad = diff > tol
    assert not bad.any(), f"{int(bad.sum())} elements differ by more than {ulps} bf16 ulp; max diff {diff.max():.3g}"


def q8_blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-4).half().view(torch.uint8)
    q = torch.randint(-128, 128, (n, k // 32, 32), generator=g, dtype=torch.int8).view(torch.uint8)
    return torch.cat([d, q], dim=-1).reshape(n, k // 32 * 34)


# ------------------------------------------------------------------------------------------ rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [576, 64, 100, 2048])
def test_rms_norm_matches_torch(cpp: CppOps, dtype: torch.dtype, d: int) -> None:
    x = randn(16, d, dtype=dtype, scale=3.0)
    w = torch.rand(d, generator=gen(1)) + 0.5
    got, want = cpp.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        # Only the sum of squares' order differs (16-lane partial sums vs torch's): a relative difference
        # of a few float32 ulps in rstd, far below 1e-6.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        truth = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
        torch.testing.assert_close(got.double(), truth, rtol=1e-6, atol=0)
    else:
        assert_within_bf16_ulp(got, want)


def test_rms_norm_keeps_leading_dims_and_accepts_bf16_weight(cpp: CppOps) -> None:
    x = randn(2, 3, 576, dtype=torch.bfloat16)
    w = (torch.rand(576, generator=gen(1)) + 0.5).to(torch.bfloat16)
    got = cpp.rms_norm(x, w, 1e-6)
    assert got.shape == (2, 3, 576)
    assert torch.equal(got, cpp.rms_norm(x, w.float(), 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(cpp: CppOps, dtype: torch.dtype) -> None:
    x, r = randn(8, 576, dtype=dtype, seed=1), randn(8, 576, dtype=dtype, seed=2, scale=4.0)
    w = torch.rand(576, generator=gen(3)) + 0.5
    normed, new_res = cpp.add_rms_norm(x, r, w, 1e-5)
    want_normed, want_res = REF.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(new_res, want_res)  # one f32 add, one rounding: identical
    assert torch.equal(normed, cpp.rms_norm(new_res, w, 1e-5))  # the norm of the rounded sum
    if dtype == torch.float32:
        torch.testing.assert_close(normed, want_normed, rtol=1e-6, atol=0)
    else:
        assert_within_bf16_ulp(normed, want_normed)


# ------------------------------------------------------------------------------------------ rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dh", [64, 128, 80])
def test_rope_equals_torch_bitwise(cpp: CppOps, dtype: torch.dtype, dh: int) -> None:
    b, t, h = 3, 5, 9
    x = randn(b, t, h, dh, dtype=dtype)
    ang = torch.rand(b, t, dh // 2, generator=gen(1)) * 1000
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    got = cpp.rope(x, cos, sin)
    assert got.dtype == dtype
    assert torch.equal(got, REF.rope(x, cos, sin))  # x*c + rot*s: two products, one sum, same rounding
    # non-contiguous input (the model's transposed views)
    xt = randn(b, h, t, dh, dtype=dtype).transpose(1, 2)
    assert torch.equal(cpp.rope(xt, cos, sin), REF.rope(xt, cos, sin))


# ------------------------------------------------------------------------------------------ gated MLP


def _gelu_tanh_f64(g: torch.Tensor) -> torch.Tensor:
    # 0.5*g*(1 + tanh(u)) == g / (1 + exp(-2u)); the second form has no cancellation for negative g
    u = math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)
    return g / (1 + torch.exp(-2 * u))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation(cpp: CppOps, dtype: torch.dtype, act: str) -> None:
    f = 1536
    gu = randn(8, 2 * f, dtype=dtype, scale=3.0)
    got = getattr(cpp, f"{act}_mul")(gu)
    want = getattr(REF, f"{act}_mul")(gu)
    assert got.shape == (8, f) and got.dtype == dtype
    g, u = gu.double()[:, :f], gu.double()[:, f:]
    truth = (F.silu(g) if act == "silu" else _gelu_tanh_f64(g)) * u
    if dtype == torch.float32:
        # Our e^x is within ~2 float32 ulps and silu passes that through unamplified. gelu's argument
        # -2u is itself computed in float32 (relative error a few ulps), which e^x turns into a relative
        # error of a few ulps times |2u|: bound (4|2u| + 8) * 2^-24 relative (|2u| reaches ~100 here, for
        # outputs below 1e-30; it is < 10 wherever the output exceeds 1e-3). Below 1e-36 (e^-2u near float32
        # underflow, where we and torch return 0) only an absolute floor applies.
        two_u = 2 * math.sqrt(2 / math.pi) * (g + 0.044715 * g**3).abs()
        rel = 8 * 2.0**-24 if act == "silu" else (4 * two_u + 8) * 2.0**-24
        err = (got.double() - truth).abs()
        assert (err <= rel * truth.abs() + 1e-36).all(), f"max relative error {(err / truth.abs()).max():.3g}"
        # torch's own gelu_tanh computes 1 + tanh(u), which cancels for negative g: compare it with an
        # absolute floor there (its outputs below ~1e-6 carry few correct digits).
        torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6)
    else:
        # (torch's gelu_tanh again: an absolute floor where its 1 + tanh(u) cancels, |error| <~ |g u| 2^-24)
        assert_within_bf16_ulp(got, want, atol=0.0 if act == "silu" else 2e-5)
        assert_within_bf16_ulp(got, truth.to(torch.bfloat16), atol=1e-36)  # (outputs that underflow)


def test_gated_activation_extremes(cpp: CppOps) -> None:
    g = torch.tensor([-200.0, -90.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 90.0, 200.0, float("inf"), float("-inf")])
    gu = torch.cat([g, torch.ones_like(g)])[None]
    # same values as torch, including inf -> inf, -inf -> nan (-inf / inf) and the sign of zero
    torch.testing.assert_close(cpp.silu_mul(gu)[0], F.silu(g), rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(
        cpp.gelu_tanh_mul(gu)[0], F.gelu(g, approximate="tanh"), rtol=1e-6, atol=0, equal_nan=True
    )
    assert torch.equal(cpp.silu_mul(gu)[0].signbit(), F.silu(g).signbit())
    assert cpp.silu_mul(torch.tensor([[float("nan"), 1.0]])).isnan().all()


# ------------------------------------------------------------------------------------------ attention


def _attention_f64(q, k_cache, v_cache, slots, ends, window, scale):
    b_, h, dh = q.shape
    hkv = k_cache.shape[1]
    out = torch.zeros(b_, h, dh, dtype=torch.float64)
    for b in range(b_):
        end = int(ends[b])
        first = max(0, end - window) if window > 0 else 0
        if end <= first:
            continue
        k = k_cache[int(slots[b]), :, first:end].double().repeat_interleave(h // hkv, 0)  # (H, L, Dh)
        v = v_cache[int(slots[b]), :, first:end].double().repeat_interleave(h // hkv, 0)
        p = torch.softmax((q[b].double()[:, None, :] * k).sum(-1) * scale, -1)
        out[b] = (p[:, :, None] * v).sum(1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("window", [0, 16])
def test_decode_attention_matches_sdpa(cpp: CppOps, dtype: torch.dtype, ratio: int, window: int) -> None:
    hkv, dh, slots_n, ctx = 3, 64, 5, 160
    h = hkv * ratio
    kc = randn(slots_n, hkv, ctx, dh, dtype=dtype, seed=1)
    vc = randn(slots_n, hkv, ctx, dh, dtype=dtype, seed=2)
    q = randn(6, h, dh, dtype=dtype, seed=3, scale=2.0)
    slots = torch.tensor([4, 0, 2, 1, 3, 0])
    ends = torch.tensor([160, 1, 37, 0, 16, 100])  # full, one key, odd, empty (zeros), = window, mid
    scale = dh**-0.5
    got = cpp.decode_attention(q, kc, vc, slots, ends, window, scale)
    want = REF.decode_attention(q, kc, vc, slots, ends, window, scale)
    truth = _attention_f64(q, kc, vc, slots, ends, window, scale)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    if dtype == torch.float32:
        # float32 everywhere: outputs are convex combinations of N(0, 1) values; both sides sit within
        # ~1e-6 of float64 (different summation orders and exp implementations).
        torch.testing.assert_close(got.double(), truth, rtol=0, atol=2e-6)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    else:
        # Our float32 accumulation rounds once: within 1 bf16 ulp of the float64 result. torch's bf16
        # SDPA rounds its intermediates to bf16 too, so it is only within a few bf16 ulps of either.
        assert_within_bf16_ulp(got, truth.to(torch.bfloat16))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_decode_attention_mixed_dtypes_and_strided_cache(cpp: CppOps) -> None:
    # bf16 cache with a float32 query, and a per-layer view of a (layers, slots, Hkv, ctx, Dh) cache
    full_k = randn(2, 3, 3, 96, 64, dtype=torch.bfloat16, seed=1)
    full_v = randn(2, 3, 3, 96, 64, dtype=torch.bfloat16, seed=2)
    kc, vc = full_k[1], full_v[1]
    q = randn(2, 9, 64, seed=3)
    slots, ends = torch.tensor([2, 0]), torch.tensor([96, 50])
    got = cpp.decode_attention(q, kc, vc, slots, ends, 0, 0.125)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _attention_f64(q, kc, vc, slots, ends, 0, 0.125), rtol=0, atol=2e-6)
    # a non-contiguous cache view (slots sliced with a step) gives the same as its contiguous copy
    kv, vv = full_k[0, ::2], full_v[0, ::2]
    assert torch.equal(
        cpp.decode_attention(q, kv, vv, torch.tensor([1, 0]), ends, 0, 0.125),
        cpp.decode_attention(q, kv.contiguous(), vv.contiguous(), torch.tensor([1, 0]), ends, 0, 0.125),
    )


def test_decode_attention_heads_are_independent(cpp: CppOps) -> None:
    # Query heads sharing a kv head are computed together (up to 16 query vectors a unit, 6 on AVX2); each head's
    # result must not depend on that grouping: the same heads asked for one per kv head give the same bits.
    kc = randn(2, 3, 300, 64, dtype=torch.bfloat16, seed=1)
    vc = randn(2, 3, 300, 64, dtype=torch.bfloat16, seed=2)
    q = randn(2, 18, 64, dtype=torch.bfloat16, seed=3)  # 6 heads per kv head
    slots, ends = torch.tensor([1, 0]), torch.tensor([300, 123])
    full = cpp.decode_attention(q, kc, vc, slots, ends, 0, 0.125)
    for pick in ([0, 6, 12], [5, 11, 17], [3, 9, 15]):
        one = cpp.decode_attention(q[:, pick], kc, vc, slots, ends, 0, 0.125)
        assert torch.equal(one, full[:, pick])


def _attention_cases(cpp: CppOps, tiles: bool):
    """Outputs of decode_attention over shapes that reach every path: float32 and bf16, head dims 64-256
    (80: a partial output group), 1 to 20 query heads per kv head (20: two units of heads), spans of 1, 15,
    16, 17, 31, 33 keys (batches of 16 and their tails), empty spans, windows. With `tiles`, runs of rows
    of one slot with consecutive ends (a prompt's rows, computed together) beside rows of another slot."""
    g = torch.Generator().manual_seed(0)
    shapes = ((3, 1, 64), (2, 6, 128), (1, 4, 256), (2, 3, 80)) + (((1, 20, 64),) if tiles else ())
    for dtype in (torch.float32, torch.bfloat16):
        for hkv, ratio, dh in shapes:
            kc = torch.randn(2 if tiles else 3, hkv, 300, dh, generator=g).to(dtype)
            vc = torch.randn(2 if tiles else 3, hkv, 300, dh, generator=g).to(dtype)
            q = (torch.randn(21 if tiles else 9, hkv * ratio, dh, generator=g) * 3).to(dtype)
            if tiles:
                slots = torch.tensor([1] * 9 + [0] * 3 + [1] * 9)
                ends = torch.tensor([*range(240, 249), 3, 0, 17, *range(1, 10)])
            else:
                slots = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
                ends = torch.tensor([300, 1, 15, 16, 17, 31, 33, 255, 0])
            for window in (0, 5, 20) if tiles else (0, 20):
                yield q, kc, vc, slots, ends, window, dh**-0.5


def test_decode_attention_bits_are_pinned(cpp: CppOps) -> None:
    # The scores are summed 16 keys at a time (hsum16) and a prompt's rows share each key's loads; each
    # (row, head) must still run the one-query sequence of operations. These digests are the outputs of
    # that sequence as written before either change (commit f48ed38: one hsum per key, one row at a time).
    # A change that alters any output bit fails here; if it is meant to, say why and pin the new digests.
    import hashlib

    for tiles, want in (
        (False, "cf4ddd885d63e8df55f045c4e3e16dfba7a0d5f22122869ed8580201a7431657"),
        (True, "39e1a93f8a923a643c8bb6678c39e8e91fe81dc770c8391681d02d046320f93e"),
    ):
        digest = hashlib.sha256()
        for case in _attention_cases(cpp, tiles):
            digest.update(cpp.decode_attention(*case).float().numpy().tobytes())
        assert digest.hexdigest() == want, f"tiles={tiles}"


def test_decode_attention_rows_in_tiles_equal_rows_alone(cpp: CppOps) -> None:
    for q, kc, vc, slots, ends, window, scale in _attention_cases(cpp, tiles=True):
        full = cpp.decode_attention(q, kc, vc, slots, ends, window, scale)
        for b in (0, 4, 8, 11, 12, 20):
            one = cpp.decode_attention(q[b : b + 1], kc, vc, slots[b : b + 1], ends[b : b + 1], window, scale)
            assert torch.equal(one[0], full[b]), (b, window)


def test_one_rows_heads_split_among_threads_give_the_bits_of_a_batch(cpp: CppOps) -> None:
    """A row alone, with fewer (kv head) units than threads, has its query heads split among more units; in
    a batch it is one unit per kv head. Both must give the same bits (Gemma 3's one kv head, SmolLM2's three)."""
    before = cpp.threads()
    try:
        for threads in (2, 4):
            cpp.set_threads(threads)
            for hkv, ratio, dh in ((1, 4, 256), (3, 3, 64)):
                kc, vc = (
                    randn(4, hkv, 700, dh, seed=1, dtype=torch.bfloat16),
                    randn(4, hkv, 700, dh, seed=2, dtype=torch.bfloat16),
                )
                q = randn(4, hkv * ratio, dh, seed=3)
                slots, ends = torch.tensor([0, 1, 2, 3]), torch.tensor([650, 300, 700, 5])
                batch = cpp.decode_attention(q, kc, vc, slots, ends, 0, dh**-0.5)
                for b in range(3):
                    one = cpp.decode_attention(q[b : b + 1], kc, vc, slots[b : b + 1], ends[b : b + 1], 0, dh**-0.5)
                    assert torch.equal(one[0], batch[b]), (threads, hkv, b)
    finally:
        cpp.set_threads(before)


def test_decode_attention_head_dims(cpp: CppOps) -> None:
    for dh in (32, 80, 128, 256):  # 80: a partial 64-dim output group
        kc, vc = randn(2, 2, 40, dh, seed=1), randn(2, 2, 40, dh, seed=2)
        q = randn(2, 4, dh, seed=3)
        slots, ends = torch.tensor([1, 0]), torch.tensor([40, 7])
        torch.testing.assert_close(
            cpp.decode_attention(q, kc, vc, slots, ends, 0, dh**-0.5).double(),
            _attention_f64(q, kc, vc, slots, ends, 0, dh**-0.5),
            rtol=0,
            atol=2e-6,
        )


def test_decode_attention_rejects_bad_inputs(cpp: CppOps) -> None:
    kc = torch.zeros(2, 3, 8, 64)
    q = torch.zeros(1, 9, 64)
    with pytest.raises(RuntimeError, match=r"ends\[0\] = 9 is out of range"):
        cpp.decode_attention(q, kc, kc, torch.tensor([0]), torch.tensor([9]), 0, 0.1)
    with pytest.raises(RuntimeError, match=r"slots\[0\] = 2 is out of range"):
        cpp.decode_attention(q, kc, kc, torch.tensor([2]), torch.tensor([1]), 0, 0.1)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        cpp.decode_attention(torch.zeros(1, 8, 64), kc, kc, torch.tensor([0]), torch.tensor([1]), 0, 0.1)
    with pytest.raises(RuntimeError, match="int64"):
        cpp.decode_attention(q, kc, kc, torch.tensor([0], dtype=torch.int32), torch.tensor([1]), 0, 0.1)


# ------------------------------------------------------------------------------------------ int8 KV cache


def test_int8_kv_rows_round_trip_within_half_a_step() -> None:
    x = randn(3, 5, 128, seed=4, scale=3.0)
    x[0, 0, 16:32] = 0.0  # an all-zero chunk: scale 0, values 0
    x[1, 2, 7] = 40.0  # an outlier: only its own chunk of 16 gets the coarse step
    rows = quantize_kv_int8(x)
    assert rows.dtype == torch.int8 and rows.shape == (3, 5, kv_int8_row_bytes(128)) == (3, 5, 160)
    back = dequantize_kv_int8(rows)
    step = x.unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True) / 127  # each chunk's scale
    assert ((back - x).unflatten(-1, (-1, 16)).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(back[0, 0, 16:32], torch.zeros(16))
    assert (back[1, 2, 16:] - x[1, 2, 16:]).abs().max() < 0.05  # the outlier's step stays in its chunk
    with pytest.raises(ValueError, match="head_dim \\* 5/4 bytes"):
        dequantize_kv_int8(torch.zeros(2, 70, dtype=torch.int8))


def _int8_caches(slots: int, hkv: int, ctx: int, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_kv_int8(randn(slots, hkv, ctx, dh, seed=1)), quantize_kv_int8(randn(slots, hkv, ctx, dh, seed=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv, ratio, dh", [(3, 3, 64), (1, 4, 256), (2, 7, 64), (2, 1, 80)])
@pytest.mark.parametrize("window", [0, 16])
def test_decode_attention_on_int8_rows_is_attention_on_their_values(cpp, dtype, hkv, ratio, dh, window) -> None:
    """An int8 cache (rows of bytes and a scale for each 16) gives the attention of the values it stands
    for: the float64 reference over the dequantized cache."""
    kc, vc = _int8_caches(5, hkv, 160, dh)
    q = randn(6, hkv * ratio, dh, dtype=dtype, seed=3, scale=2.0)
    slots = torch.tensor([4, 0, 2, 1, 3, 0])
    ends = torch.tensor([160, 1, 37, 0, 16, 100])
    got = cpp.decode_attention(q, kc, vc, slots, ends, window, dh**-0.5)
    truth = _attention_f64(q, dequantize_kv_int8(kc), dequantize_kv_int8(vc), slots, ends, window, dh**-0.5)
    assert got.dtype == dtype and torch.equal(got[3], torch.zeros_like(got[3]))
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), truth, rtol=0, atol=2e-6)
    else:  # 1 bf16 ulp, or float32's accumulation error where the output nears zero (seen: 7e-6, off by 2 ulps)
        assert_within_bf16_ulp(got, truth.to(torch.bfloat16), atol=4e-6)


def test_int8_rows_give_the_same_bits_alone_in_tiles_and_split_among_threads(cpp: CppOps) -> None:
    before = cpp.threads()
    try:
        for threads in (2, 4):
            cpp.set_threads(threads)
            for hkv, ratio, dh in ((1, 4, 256), (3, 3, 64)):
                kc, vc = _int8_caches(2, hkv, 300, dh)
                q = randn(12, hkv * ratio, dh, seed=3)
                slots = torch.tensor([1] * 9 + [0] * 3)  # a prompt's rows (one tile) beside three decode rows
                ends = torch.tensor([*range(240, 249), 300, 1, 0])
                batch = cpp.decode_attention(q, kc, vc, slots, ends, 0, dh**-0.5)
                for b in (0, 5, 8, 9, 10, 11):
                    one = cpp.decode_attention(q[b : b + 1], kc, vc, slots[b : b + 1], ends[b : b + 1], 0, dh**-0.5)
                    assert torch.equal(one[0], batch[b]), (threads, hkv, b)
    finally:
        cpp.set_threads(before)


def test_decode_attention_names_an_int8_cache_of_the_wrong_row_size(cpp: CppOps) -> None:
    kc = torch.zeros(2, 3, 8, 68, dtype=torch.int8)  # one scale a row: not the format
    with pytest.raises(RuntimeError, match="cache rows of 68 must hold q's head dim 64 int8 values"):
        cpp.decode_attention(torch.zeros(1, 9, 64), kc, kc, torch.tensor([0]), torch.tensor([1]), 0, 0.1)


# ------------------------------------------------------------------------------------------ Q8_0 head


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8, 11])
def test_q8_0_linear_vs_float64(cpp: CppOps, dtype: torch.dtype, m: int) -> None:
    n, k = 1003, 576  # n odd: exercises the single-column tail
    blocks = q8_blocks(n, k)
    x = randn(m, k, dtype=dtype, seed=m)
    got = cpp.q8_0_linear(x, blocks)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    w = dequantize_q8_0(blocks, torch.float64)
    truth = x.double() @ w.T
    # d*q is exact in float32, so the only error is float32 accumulation: each of 16 lanes sums K/16
    # products with FMA, then 4 tree levels; the classic bound is (K/16 + 4) * 2^-24 * sum |w x|.
    magnitude = x.double().abs() @ w.abs().T
    assert ((got.double() - truth).abs() <= (k / 16 + 4) * 2.0**-24 * magnitude).all()
    # torch's float32 matmul obeys the any-order bound (K + 1) * 2^-24 * sum |w x|; the two differ by
    # at most the sum of both bounds (results near zero cancel, so no relative tolerance would do).
    want = REF.q8_0_linear(x, blocks)
    assert ((got.double() - want.double()).abs() <= (k + k / 16 + 5) * 2.0**-24 * magnitude).all()


def test_q8_0_linear_rejects_bad_blocks(cpp: CppOps) -> None:
    with pytest.raises(RuntimeError, match="34 bytes per row"):
        cpp.q8_0_linear(torch.zeros(1, 32), torch.zeros(4, 33, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpp.q8_0_linear(torch.zeros(1, 40), torch.zeros(4, 34, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="uint8"):
        cpp.q8_0_linear(torch.zeros(1, 32), torch.zeros(4, 34, dtype=torch.int8))


# ------------------------------------------------------------------------------------------ invariance


def _row_ops(cpp: CppOps, dtype: torch.dtype):
    """(name, fn(rows) -> output whose first dim is the row) for each op, on SmolLM2 shapes."""
    w = torch.rand(576, generator=gen(9)) + 0.5
    x8, r8 = randn(8, 576, dtype=dtype, seed=10), randn(8, 576, dtype=dtype, seed=11)
    gu8 = randn(8, 3072, dtype=dtype, seed=12, scale=3.0)
    q8 = randn(8, 1, 9, 64, dtype=dtype, seed=13)
    ang = torch.rand(8, 1, 32, generator=gen(14)) * 500
    cos8, sin8 = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kc, vc = randn(8, 3, 600, 64, dtype=dtype, seed=15), randn(8, 3, 600, 64, dtype=dtype, seed=16)
    qa8 = randn(8, 9, 64, dtype=dtype, seed=17)
    slots8, ends8 = torch.tensor([3, 1, 7, 0, 5, 2, 6, 4]), torch.tensor([64, 512, 1, 600, 300, 17, 0, 129])
    blocks = q8_blocks(2051, 576)
    # each fn takes an index tensor of rows
    return [
        ("rms_norm", lambda s: cpp.rms_norm(x8[s], w, 1e-5)),
        ("add_rms_norm", lambda s: torch.cat(cpp.add_rms_norm(x8[s], r8[s], w, 1e-5), dim=-1)),
        ("rope", lambda s: cpp.rope(q8[s], cos8[s], sin8[s])),
        ("silu_mul", lambda s: cpp.silu_mul(gu8[s])),
        ("gelu_tanh_mul", lambda s: cpp.gelu_tanh_mul(gu8[s])),
        ("decode_attention", lambda s: cpp.decode_attention(qa8[s], kc, vc, slots8[s], ends8[s], 0, 0.125)),
        ("decode_attention_window", lambda s: cpp.decode_attention(qa8[s], kc, vc, slots8[s], ends8[s], 100, 0.125)),
        ("q8_0_linear", lambda s: cpp.q8_0_linear(x8[s], blocks)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance(cpp: CppOps, dtype: torch.dtype) -> None:
    for name, fn in _row_ops(cpp, dtype):
        alone = [fn(torch.tensor([i])) for i in range(8)]
        for m in range(1, 9):
            batch = fn(torch.arange(m))
            for i in range(m):
                assert torch.equal(batch[i : i + 1], alone[i]), f"{name}: row {i} of {m} rows differs from it alone"
        # a row's result does not depend on its neighbours' values either
        rev = fn(torch.arange(7, -1, -1))
        for i in range(8):
            assert torch.equal(rev[7 - i : 8 - i], alone[i]), f"{name}: row {i} differs when rows are reversed"


def test_thread_count_invariance(cpp: CppOps) -> None:
    # Large enough that every op splits its work across threads.
    x = randn(512, 576, dtype=torch.bfloat16)
    w = torch.rand(576, generator=gen(1)) + 0.5
    gu = randn(512, 3072, dtype=torch.bfloat16, seed=2)
    q = randn(64, 16, 9, 64, dtype=torch.bfloat16, seed=3)
    ang = torch.rand(64, 16, 32, generator=gen(4))
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kc, vc = randn(8, 3, 700, 64, dtype=torch.bfloat16, seed=5), randn(8, 3, 700, 64, dtype=torch.bfloat16, seed=6)
    qa = randn(8, 9, 64, dtype=torch.bfloat16, seed=7)
    slots, ends = torch.arange(8), torch.tensor([700, 650, 600, 3, 512, 100, 0, 699])
    blocks = q8_blocks(8192, 576)
    calls = [
        lambda: cpp.rms_norm(x, w, 1e-5),
        lambda: cpp.add_rms_norm(x, x, w, 1e-5)[0],
        lambda: cpp.silu_mul(gu),
        lambda: cpp.rope(q, cos, sin),
        lambda: cpp.decode_attention(qa, kc, vc, slots, ends, 0, 0.125),
        lambda: cpp.q8_0_linear(x[:8], blocks),
    ]
    before = cpp.threads()
    try:
        outputs = {}
        for n in (1, 2, 3):  # the kernels' own pool (torch's thread count plays no part in them)
            cpp.set_threads(n)
            assert cpp.threads() == n
            outputs[n] = [c() for c in calls]
    finally:
        cpp.set_threads(before)
    for n in (2, 3):
        for i, (a, b) in enumerate(zip(outputs[1], outputs[n])):
            assert torch.equal(a, b), f"call {i} differs with {n} pool threads from 1"


def test_torch_ops_is_the_default_reference() -> None:
    # TorchOps needs no build; it is what CppOps is measured against.
    x = randn(2, 576, dtype=torch.bfloat16)
    w = torch.ones(576)
    assert REF.rms_norm(x, w, 1e-5).dtype == torch.bfloat16
    assert REF.name == "torch"


def test_the_reference_rms_norm_rounds_once_from_float32_math() -> None:
    """bf16 activations and a float32 weight (kept float32: build_model): the norm and the weight's product
    are float32, rounded to bf16 once, so almost every value is the exact result rounded."""
    x = randn(4, 576, dtype=torch.bfloat16)
    w = 1 + torch.randn(576, generator=torch.Generator().manual_seed(5)) / 3
    exact = F.rms_norm(x.double(), (576,), w.double(), 1e-6)
    got = REF.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    assert (got != exact.to(torch.bfloat16)).float().mean().item() < 0.01


def test_the_q8_0_reference_refuses_rows_that_are_not_whole_blocks() -> None:
    for bad in (torch.zeros(2, 35, dtype=torch.uint8), torch.zeros(68, dtype=torch.uint8), torch.zeros(2, 34)):
        with pytest.raises(ValueError, match="multiple of 34 bytes per row"):
            dequantize_q8_0(bad)


def test_block_formats_match_the_cpp_export(cpp: CppOps) -> None:
    # kernels.blocks is the one Python copy of the block kinds (quant.py and ops.py use it); the C++ module
    # exports the real ones (csrc/blocks.h), and load_kernels refuses a build whose export differs.
    from metronome.compile import quant
    from metronome.kernels import blocks

    m = cpp._m
    assert dict(m.BLOCK_KINDS) == blocks.BLOCK_KINDS
    assert (blocks.BLOCK_KINDS["Q8_0"], blocks.BLOCK_BYTES["Q8_0"]) == (blocks.Q8_0_KIND, blocks.Q8_0_BYTES)
    assert dict(m.BLOCK_BYTES) == blocks.BLOCK_BYTES and dict(m.BLOCK_WEIGHTS) == blocks.BLOCK_WEIGHTS
    assert dict(m.BLOCK_GROUPS) == blocks.BLOCK_GROUPS
    assert blocks.BLOCK_WEIGHTS[blocks.Q4_PACKED_KIND] == quant.GROUP
    import gguf  # the file formats' own sizes, for the kinds that read GGUF blocks in place

    for qtype, kind in blocks.FILE_KINDS.items():
        name = next(n for n, k in blocks.BLOCK_KINDS.items() if k == kind)
        want = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        assert (blocks.BLOCK_WEIGHTS[name], blocks.BLOCK_BYTES[name]) == want, qtype
    assert (quant.Q8_0_KIND, quant.Q4_PACKED_KIND) == (blocks.Q8_0_KIND, blocks.Q4_PACKED_KIND)
    blocks.check_exports(m)


@pytest.mark.parametrize("table", ["BLOCK_KINDS", "BLOCK_BYTES", "BLOCK_WEIGHTS", "BLOCK_GROUPS"])
def test_an_export_that_differs_in_any_one_table_is_refused(table: str) -> None:
    # Needs no compiler: a stand-in for the C++ module, equal to kernels.blocks but for one entry of one table.
    from types import SimpleNamespace

    from metronome.kernels import blocks

    tables = {
        name: dict(getattr(blocks, name)) for name in ("BLOCK_KINDS", "BLOCK_BYTES", "BLOCK_WEIGHTS", "BLOCK_GROUPS")
    }
    blocks.check_exports(SimpleNamespace(**tables))  # equal: accepted
    tables[table]["Q6_K"] += 1
    with pytest.raises(ValueError, match="differ from metronome/kernels/blocks.py"):
        blocks.check_exports(SimpleNamespace(**tables))


def test_build_is_keyed_on_every_source_file(tmp_path, monkeypatch) -> None:
    # Needs no compiler: the build directory's name changes with any file of csrc/, headers included.
    from metronome.kernels import build

    names = {p.name for p in build.source_files()}
    assert {"bindings.cpp", "simd.h", "decoder.cpp"} <= names
    for f in build.source_files():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    first = build.build_directory()
    (tmp_path / "simd.h").write_bytes((tmp_path / "simd.h").read_bytes() + b"\n")
    assert build.build_directory() != first


def test_two_checkouts_of_the_same_sources_build_once(tmp_path, monkeypatch) -> None:
    """The build directory is keyed by the sources' bytes, but ninja rebuilds when a source's path or time
    changes: a clone of the same code, or a reinstalled wheel, rebuilt the shared directory in turn (a
    minute or more each time). The build names copies of csrc/ inside the directory, written once."""
    from metronome.kernels import build

    build.load_module()
    directory = build.build_directory()
    ninja = (directory / "build.ninja").read_text()
    assert str(build.SOURCE_DIR) not in ninja and str(directory / "src" / "decoder.cpp") in ninja
    clone = tmp_path / "clone-csrc"  # the same bytes, elsewhere and newer
    clone.mkdir()
    for f in build.source_files():
        (clone / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", clone)
    assert build.build_directory() == directory
    before = {p.name: p.stat().st_mtime_ns for p in (directory / "src").iterdir()}
    copies = build._stable_sources(directory)
    assert {p.name: p.stat().st_mtime_ns for p in copies} == before  # nothing rewritten: ninja sees no change
    assert all(p.read_bytes() == (clone / p.name).read_bytes() for p in copies)
    elsewhere = tmp_path / "build"
    elsewhere.mkdir()
    build._stable_sources(elsewhere)
    (elsewhere / "src" / "simd.h").write_bytes(b"damaged")
    build._stable_sources(elsewhere)
    assert (elsewhere / "src" / "simd.h").read_bytes() == (clone / "simd.h").read_bytes()  # other bytes: rewritten


def test_the_cpu_vendor_is_a_build_constant_and_part_of_the_build_key(monkeypatch) -> None:
    # the kernels' reads-ahead distances are constants chosen by vendor (csrc/simd.h kAmdCpu): an AMD and an
    # Intel CPU with the same flags must not share a build
    from metronome.kernels import build

    monkeypatch.setattr(build, "_cpu_vendor", lambda: "AuthenticAMD")
    amd = build.build_directory()
    assert "-DMETRONOME_AMD=1" in build.compile_flags()
    monkeypatch.setattr(build, "_cpu_vendor", lambda: "GenuineIntel")
    assert "-DMETRONOME_AMD=0" in build.compile_flags()
    assert build.build_directory() != amd


def test_a_failed_check_raises_its_message_without_a_cpp_stack(cpp: CppOps) -> None:
    """A TORCH_CHECK in the kernels raises the Python exception with the check's message, and never asks c10
    for the C++ stack: symbolizing it ended the process on a lent machine's image. In a child with
    TORCH_SHOW_CPP_STACKTRACES=1, where torch's own translator would append the symbolized stack."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from metronome.kernels.ops import load_kernels
        ops = load_kernels()
        try:
            ops.pack_x16(torch.zeros(16, 10, dtype=torch.uint8), 8, 16, 32)
        except RuntimeError as e:
            print(repr(str(e)))
        try:
            ops.rms_norm(torch.zeros(2, 4), torch.zeros(3), 1e-5)
        except RuntimeError as e:
            print(repr(str(e)))
    """)
    env = {**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    messages = out.stdout.splitlines()
    assert len(messages) == 2, out.stdout + out.stderr[-3000:]
    assert "raw must be the file's contiguous uint8 blocks" in messages[0]
    assert "rms_norm: weight must have shape (4,)" in messages[1]
    assert not any("Exception raised from" in m or "Traceback" in m for m in messages), messages


def test_the_build_lock_removes_a_killed_builds_lock_and_never_a_live_one(tmp_path, capsys, monkeypatch):
    """torch's build lock stays when a build is killed, and every later process waited on it for ever,
    saying nothing; removing it by its age raced with a live build (two processes read the old age, the
    second removed the first's fresh lock, and both built in one directory)."""
    import subprocess
    import sys
    import textwrap

    from metronome.kernels import build

    holder_code = textwrap.dedent(f"""
        import fcntl, sys, time
        fh = open({str(tmp_path / "build.flock")!r}, "a")
        fcntl.flock(fh, fcntl.LOCK_EX)
        open({str(tmp_path / "lock")!r}, "w").close()  # torch's lock, as a live build holds it
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(build, "BUILD_WAIT_S", 1.0)
        monkeypatch.setattr(build, "BUILD_SAID_S", 0.2)
        with pytest.raises(build.KernelBuildError, match="for over"):
            with build._build_lock(tmp_path):
                pass
        assert (tmp_path / "lock").exists(), "a live build's lock was removed"
        assert "waiting for another process's build" in capsys.readouterr().err
        holder.kill()  # killed midway: its flock goes with it, torch's lock file stays
        holder.wait(timeout=30)
    finally:
        holder.kill()
    with build._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "removing" in capsys.readouterr().err
    with build._build_lock(tmp_path):  # nothing left over: nothing to say
        pass
    assert capsys.readouterr().err == ""


def test_a_prebuilt_kernel_cache_on_a_read_only_file_system_loads(tmp_path):
    """A container image's prebuilt cache, mounted read-only: the build lock's file and torch's loader
    (which rewrites build.ninja) both failed, and the plan fell back to torch's ops, 4x slower and silently.
    The module built for these sources is now loaded as it is. Run in a user and mount namespace
    (`unshare -rm`), where the cache can be bind-mounted read-only; skipped where that is not allowed."""
    import shutil
    import subprocess
    import sys

    from metronome.kernels import build

    build.load_module()  # built here first, where the cache is writable
    built = build.build_directory() / f"{build.EXTENSION_NAME}.so"
    cache = tmp_path / "cache"
    relative = build.build_directory().relative_to(build.cache_root())
    (cache / relative).mkdir(parents=True)
    shutil.copy2(built, cache / relative / built.name)
    probe = "from metronome.kernels.build import load_module; load_module(); print('loaded')"
    script = f'mount --bind -o ro {cache} {cache} && exec {sys.executable} -c "{probe}"'
    env = {**os.environ, "METRONOME_CACHE_DIR": str(cache)}
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], check=False).returncode != 0:
        pytest.skip("no user namespaces here (unshare -rm)")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-3000:]
    assert not (cache / relative / "build.ninja").exists()
