"""The fused decoder's kernels for the GGUF formats it reads in place (Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
and for Q5_0, Q4_K, Q6_K and Q8_0 repacked 16 rows side by side (Q5_0X16, Q4_KX16, Q6_KX16, Q8_0X16: what
the plans run for those formats): against the `gguf` package's
dequantizer (an independent reference), row independence, thread-count determinism, the same bits on AMX
as on the vector path, and matrices stacked from parts of different formats."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from helpers.x16_packing import pack_q4_1, pack_q4_k, pack_q5_0, pack_q6_k, pack_q8_0

from metronome.compile.quant import pack_16_rows
from metronome.kernels.blocks import BLOCK_KINDS, FILE_KINDS
from metronome.kernels.ops import KernelBuildError, load_kernels
from metronome.model.loader import QuantTensor

try:
    OPS = load_kernels()
except KernelBuildError as exc:  # pragma: no cover - every CI machine has AVX-512 or AVX2
    pytest.skip(f"C++ kernels unavailable: {exc}", allow_module_level=True)

FORMATS = ["Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0X16", "Q4_KX16", "Q6_KX16", "Q8_0X16", "Q4_1X16"]
FORMATS += ["Q4_0X16"]  # not a kind: Q4_0 rows packed as Q4_1X16
QUANTIZABLE = {"Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"}  # gguf.quants quantizes these; K-quants are random bytes
# a packed kind -> the file format it is packed from
STORED = {"Q5_0X16": "Q5_0", "Q4_KX16": "Q4_K", "Q6_KX16": "Q6_K", "Q8_0X16": "Q8_0", "Q4_1X16": "Q4_1"}
STORED["Q4_0X16"] = "Q4_0"
KIND = {"Q4_0X16": "Q4_1X16"}  # the block kind a test format runs as, where it is not its own name


def _super(qtype: str) -> bool:
    """Whether `qtype` has 256-weight super-blocks (x quantized per 256)."""
    return STORED.get(qtype, qtype).endswith("_K")


def _blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """A (n, k) matrix in `qtype` as a GGUF file stores it: gguf's own quantizer where it has one, else
    random bytes (every bit pattern of codes and 6-bit scales is valid) with small random fp16 scales."""
    rng = np.random.default_rng(seed)
    qtype = STORED.get(qtype, qtype)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in QUANTIZABLE:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        raw = gguf.quants.quantize(w, kind).reshape(n, -1)
        if qtype == "Q8_0":  # the quantizer's codes stay in [-127, 127]; a file may hold -128 too
            codes = raw.reshape(n, k // 32, 34)[..., 2:]
            codes[rng.random(codes.shape) < 0.1] = 0x80
        return raw
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    scales = (rng.standard_normal((n, k // block, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == "Q6_K":
        raw[..., 208:210] = scales[..., 0:2]  # d is the last field
    else:
        raw[..., 0:4] = scales  # d, dmin
    return raw.reshape(n, -1)


def _dequantized(raw: np.ndarray, qtype: str, n: int, k: int) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType[STORED.get(qtype, qtype)]
    return torch.from_numpy(gguf.quants.dequantize(raw, kind).reshape(n, k)).double()


def _int8_x(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels quantize it: per block, dx = max|x|/127 and round(x/dx) (float64 result)."""
    M, K = x.shape
    b = x.double().reshape(M, K // block, block)
    amax = b.abs().amax(-1, keepdim=True)
    xq = torch.where(amax > 0, torch.round(b * (127 / amax)) * (amax / 127), torch.zeros_like(b))
    return xq.reshape(M, K)


def _linear(x: torch.Tensor, raw: np.ndarray, qtype: str) -> torch.Tensor:
    n = raw.shape[0]
    if qtype in STORED:
        part = QuantTensor(raw=raw, qtype=STORED[qtype], shape=(n, x.shape[1]))
        blocks, kind = pack_16_rows(part, OPS)
        assert kind == BLOCK_KINDS[KIND.get(qtype, qtype)]
        return OPS.block_linear(x, blocks, kind, n)
    return OPS.block_linear(x, torch.from_numpy(raw), FILE_KINDS[qtype], n)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 7, 14, 37])
def test_file_format_kernel_vs_dequantized_weights(qtype: str, M: int) -> None:
    # an odd row count (a tile tail); K spans 3 super-blocks, or 25 blocks (32-weight kinds run two
    # blocks per step: the odd last one runs alone); 37 rows of x: two 16-row AMX tiles where the CPU has
    # them, and five rows on the vector path; with AVX2, passes of 8 rows that read a group's unpacked
    # records (Q4_K, Q6_K), the last of 5 (Q6_K: two pairs of rows, then one); AVX2's Q4_K unpacks the
    # nibbles in registers for 1, 2, 3 and 5 (3 + 2) rows (q4k_sub_rows), and once for four rows of x
    # then the rest at 7 (4 + 3), 14 (8 + 4 + 2, from records) and 37's last pass (4 + 1)
    n, k = 37, 768 if _super(qtype) else 800
    raw = _blocks(qtype, n, k, seed=1)
    w = _dequantized(raw, qtype, n, k)
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(2))
    y = _linear(x, raw, qtype).double()
    scale = (x.double().abs() @ w.abs().T).max().item()
    # Against the exact product: the only loss is x's int8 quantization (half a step of 1/127 per entry).
    exact = x.double() @ w.T
    assert (y - exact).abs().max().item() <= 4e-3 * scale
    # Against the exact product with x quantized as llama.cpp does for this format: float32 rounding only.
    block = 256 if _super(qtype) else 32
    assert (y - _int8_x(x, block) @ w.T).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("qtype", FORMATS)
def test_file_format_rows_are_independent_and_thread_count_free(qtype: str) -> None:
    # 544: 17 blocks, the odd one alone; 19 rows of x: a 16-row AMX tile where the CPU has them, 3 on the vector path
    n, k, M = 40, 512 if _super(qtype) else 544, 19
    raw = _blocks(qtype, n, k, seed=3)
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(4))
    try:
        OPS.set_threads(2)
        batch = _linear(x, raw, qtype)
        alone = torch.cat([_linear(x[i : i + 1], raw, qtype) for i in range(M)])
        OPS.set_threads(1)
        one_thread = _linear(x, raw, qtype)
    finally:
        OPS.set_threads(torch.get_num_threads())
    assert torch.equal(batch, alone) and torch.equal(batch, one_thread)


@pytest.mark.parametrize("qtype", ["Q5_0X16", "Q8_0X16", "Q4_1X16", "Q4_0X16", "Q4_KX16"])
@pytest.mark.parametrize(("M", "blocks"), [(16, 1), (16, 17), (48, 25), (37, 18)])
def test_amx_gives_the_vector_paths_bits(qtype: str, M: int, blocks: int) -> None:
    """Where the CPU has AMX, the packed Q4_1/Q5_0/Q8_0/Q4_K kinds run whole tiles of 16 rows of x on it:
    every bit as the vector path computes them (the same integer sums, then the same float steps in the same
    order), for one block, odd and even block counts, a group of 16 weight rows cut short (37), and rows
    past the last whole tile."""
    if not OPS.set_amx(True):
        pytest.skip("no AMX here (the CPU, the kernels' build or Linux lacks it)")
    k = blocks * (256 if _super(qtype) else 32)
    raw = _blocks(qtype, 37, k, seed=5)
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(6)) * 3
    try:
        with_amx = _linear(x, raw, qtype)
        OPS.set_amx(False)
        vector = _linear(x, raw, qtype)
    finally:
        OPS.set_amx(True)
    assert torch.equal(with_amx, vector)


@pytest.mark.parametrize("qtype", ["Q5_0X16", "Q4_KX16", "Q6_KX16", "Q8_0X16", "Q4_1X16", "Q4_0X16"])
@pytest.mark.parametrize("n", [16, 37])
def test_packing_is_the_layouts_numpy_reference(qtype: str, n: int) -> None:
    """csrc/pack.cpp's bytes against the layouts written again in numpy (tests/helpers/x16_packing.py), a
    whole group and a partial last one (its missing rows zero)."""
    k = 512
    raw = _blocks(qtype, n, k, seed=6)
    reference = {
        "Q5_0X16": pack_q5_0,
        "Q4_KX16": pack_q4_k,
        "Q6_KX16": pack_q6_k,
        "Q8_0X16": pack_q8_0,
        "Q4_1X16": pack_q4_1,
        "Q4_0X16": lambda raw, n, k: pack_q4_1(raw, n, k, has_min=False),
    }[qtype](raw, n, k)
    packed, kind = pack_16_rows(QuantTensor(raw=raw, qtype=STORED[qtype], shape=(n, k)), OPS)
    assert kind == BLOCK_KINDS[KIND.get(qtype, qtype)] and torch.equal(packed, reference)
    with pytest.raises(RuntimeError, match="raw must be the file's contiguous uint8 blocks"):
        OPS.pack_x16(torch.from_numpy(raw[:, :-1].copy()), kind, n, k)


def test_stacked_parts_must_add_up_to_the_matrix() -> None:
    """A fused q/k/v matrix may hold parts in different formats (each its own segment; the Gemma 3 test
    below runs one: Q5_0 q/k with a Q8_0 v), but their rows must add up to what the layer needs."""
    k = 512
    parts = [("Q5_0", 24), ("Q8_0", 8), ("Q6_K", 16)]
    segments = [(torch.from_numpy(_blocks(q, n, k, seed=i)), FILE_KINDS[q], n) for i, (q, n) in enumerate(parts)]
    layer = OPS.decoder(
        hidden=k,
        heads=2,
        kv_heads=1,
        head_dim=16,
        intermediate=k,
        eps=1e-6,
        scale=0.25,
        gelu=False,
        k_cache=torch.zeros(1, 1, 1, 4, 16),
        v_cache=torch.zeros(1, 1, 1, 4, 16),
    )
    with pytest.raises(RuntimeError, match="hold 48 rows, expected 64"):  # q/k/v need (2 + 2*1) * 16 rows
        layer.add_layer(
            qkv=segments,
            qkv_bias=None,
            o=segments[:1],
            gate_up=segments[:1],
            down=segments[:1],
            attn_norm=torch.ones(k),
            mlp_norm=torch.ones(k),
            post_attn_norm=None,
            post_mlp_norm=None,
            q_norm=None,
            k_norm=None,
            window=0,
            local_rope=False,
        )


def test_gemma3_runs_on_the_files_own_blocks(gemma_path) -> None:
    """Gemma 3 270M's file mixes Q8_0 (tied embedding/head, some v), Q5_0, Q4_K and Q6_K: every matrix is
    read in its own format, packed 16 rows side by side (the bytes read per token are the file's), and the
    fused path's logits and greedy text follow the float32 path's."""
    from metronome.config import EngineConfig, SamplingParams
    from metronome.engine import Engine
    from metronome.model.loader import load

    loaded = load(gemma_path)
    fused = Engine.from_model(config=EngineConfig(slots=2, ctx=256, spec_tokens=0), loaded=loaded)
    ref = Engine.from_model(config=EngineConfig(slots=2, ctx=256, weights="f32", kernels="torch"), loaded=loaded)
    kinds = {kind for segments in fused.plan.runner.matrices for _blocks, kind, _rows in segments}
    assert kinds == {BLOCK_KINDS[q] for q in ("Q5_0X16", "Q4_KX16", "Q6_KX16", "Q8_0X16")}
    assert fused.plan.report.weight_bytes <= loaded.file_bytes  # nothing requantized to a larger format
    prompt = "Name three colors of the rainbow."
    ids = fused.encode_prompt(prompt, True)
    a, b = fused.plan.prefill(ids, 0, all_logits=True), ref.plan.prefill(ids, 0, all_logits=True)
    span = b.max(-1).values - b.min(-1).values
    assert ((a - b).abs().max(-1).values / span).max().item() <= 0.08  # int8 activations in every matmul
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    params = SamplingParams(max_tokens=16)
    assert fused.generate(prompt, params).token_ids == ref.generate(prompt, params).token_ids


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_rows_are_the_gguf_packages_dequantization(qtype: str) -> None:
    """The fused runner's embedding lookup (csrc gguf_rows) against gguf.quants.dequantize, bitwise."""
    n, k = 50, 96
    raw = gguf.quants.quantize(
        np.random.default_rng(5).standard_normal((n, k)).astype(np.float32), gguf.GGMLQuantizationType[qtype]
    ).reshape(n, -1)
    ids = torch.tensor([3, 0, 49, 3, 17])
    got = OPS.gguf_rows(torch.from_numpy(raw), ids, qtype)
    assert torch.equal(got, _dequantized(raw[ids.numpy()], qtype, len(ids), k).float())
    with pytest.raises(ValueError, match="qtype"):
        OPS.gguf_rows(torch.from_numpy(raw), ids, "Q6_K")


def test_q4_0_scales_too_large_for_q4_1s_minimum_pack_exactly() -> None:
    """Q4_0 packs as Q4_1 with m = -8d, which fp16 holds only while |d| <= 8188: a (legal) d of 10,000 made
    m -inf and the row's output with it. Such a matrix packs as Q8_0 blocks of the same weights."""
    n, k = 16, 64
    raw = _blocks("Q4_0X16", n, k, seed=3)
    raw.reshape(n, k // 32, 18)[3, 1, 0:2] = np.array([10000.0], np.float16).view(np.uint8)  # one block's d
    w = _dequantized(raw, "Q4_0X16", n, k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(4))
    blocks, kind = pack_16_rows(QuantTensor(raw=raw, qtype="Q4_0", shape=(n, k)), OPS)
    assert kind == BLOCK_KINDS["Q8_0X16"]
    y = OPS.block_linear(x, blocks, kind, n).double()
    scale = (x.double().abs() @ w.abs().T).max().item()
    assert torch.isfinite(y).all() and (y - _int8_x(x, 32) @ w.T).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("qtype", ["Q8_0X16", "Q4_KX16", "Q5_1"])
def test_activations_too_small_for_127_over_their_max_stay_finite(qtype: str) -> None:
    """127 / max|x| overflows float32 below about 3.7e-37: x of 1e-38 (a normal float) became inf, every
    code -128, and the product 20-30x the exact one. The block now quantizes against a floor of 1e-36."""
    n, k = 16, 256
    raw = _blocks(qtype, n, k, seed=5)
    w = _dequantized(raw, qtype, n, k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(6)) * 1e-38
    y = _linear(x, raw, qtype).double()
    exact = x.double() @ w.T
    # the codes are coarse at the floor (|x| / 1e-36 * 127, about 1 to 3 here) and the products fall among
    # float32's subnormals: what is asked is an error of the size of |x| |w|, not 20-30x of it
    scale = (x.double().abs() @ w.abs().T).max().item()
    assert torch.isfinite(y).all() and (y - exact).abs().max().item() <= 0.5 * scale


def test_block_matrix_keeps_q4_for_int4_reads_the_file_again_for_cached_views_and_keeps_a_q8_bias() -> None:
    """Which format a matrix runs in: Q4 blocks are packed as Q4 only in int4 mode (int8 requantizes them to
    Q8_0); a matrix the plan cache kept as a view of the file (None) is taken from the file again, not run as
    None; and a Q8_0 matrix with a bias on the torch path keeps its bias."""
    from torch import nn

    from metronome.compile.quant import Q8_0_KIND, Q8Linear, block_matrix, cacheable, quantize

    n, k = 16, 64
    q4 = QuantTensor(raw=_blocks("Q4_0X16", n, k, seed=5), qtype="Q4_0", shape=(n, k))
    assert block_matrix([q4], "int4", OPS)[0][1] == BLOCK_KINDS["Q4_1X16"]
    assert block_matrix([q4], "int8", OPS)[0][1] == Q8_0_KIND
    q51 = QuantTensor(raw=_blocks("Q5_1", n, k, seed=6), qtype="Q5_1", shape=(n, k))
    ((blocks, kind, rows),) = block_matrix([q51], "int8", OPS)
    assert kind == FILE_KINDS["Q5_1"] and cacheable([(blocks, kind, rows)])[0][0] is None
    ((again, kind_again, _),) = block_matrix([q51], "int8", OPS, cached=cacheable([(blocks, kind, rows)]))
    assert kind_again == kind and again is not None and torch.equal(again, blocks)

    q8 = QuantTensor(raw=_blocks("Q8_0", n, k, seed=7), qtype="Q8_0", shape=(n, k))
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(k, n, bias=True))
    with torch.no_grad():
        model.proj.weight.copy_(torch.from_numpy(q8.dequantize().numpy()))
        model.proj.bias.copy_(torch.arange(n, dtype=torch.float32))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(8))
    want = model(x).double()
    quantize(model, {"proj.weight": q8}, "int8", q8_ops=OPS)
    assert not isinstance(model.proj, Q8Linear)  # the fused Q8_0 kernel takes no bias
    assert (model(x).double() - want).abs().max().item() <= 0.02 * want.abs().max().item()
