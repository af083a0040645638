"""The fused decoder's mixture-of-experts block (csrc/moe.h): routing, static dispatch that reads only the
chosen experts, the row contract (alone = batched = prefill, bitwise), and every MoE architecture against
the torch model on GGUF files written with the gguf package (Q8_0 and Q4_0 experts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_moe

from metronome.compile.fused import FusedRunner
from metronome.compile.quant import Q8_0_KIND, dense, pack_16_rows, quantize_q8_0
from metronome.config import EngineConfig, ModelConfig
from metronome.engine import Engine
from metronome.kernels.blocks import BLOCK_KINDS
from metronome.kernels.ops import KernelBuildError, dequantize_q8_0, load_kernels
from metronome.model.loader import QuantTensor, load
from metronome.model.moe import MoE, route

try:
    OPS = load_kernels()
except KernelBuildError as exc:  # pragma: no cover - every CI machine has AVX-512 or AVX2
    pytest.skip(f"C++ kernels unavailable: {exc}", allow_module_level=True)

D, W, E, S = 64, 32, 6, 64  # hidden, expert width, experts, shared width


def _block(seed: int, shared: bool = True, k: int = 2, normalize: bool = True, router: torch.Tensor | None = None):
    """A random MoE block as the C++ MoeLayer (Q8_0 experts) and as the torch module on the same
    (dequantized) weights."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(
        arch="qwen2moe", vocab_size=8, hidden_size=D, intermediate_size=D, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position=64, num_experts=E, experts_per_token=k,
        moe_intermediate_size=W, norm_topk_prob=normalize, shared_expert_size=S if shared else 0,
    )  # fmt: skip
    ref = MoE(cfg)
    router = torch.randn(E, D, generator=g) if router is None else router
    blocks = {}

    def q8(w: torch.Tensor, name: str) -> torch.Tensor:
        blocks[name] = quantize_q8_0(w)
        return dequantize_q8_0(blocks[name])

    with torch.no_grad():
        ref.router.weight.copy_(router)
        for e, ex in enumerate(ref.experts):
            ex.w_gate_up.weight.copy_(q8(torch.randn(2 * W, D, generator=g) * 0.2, f"gu{e}"))
            ex.w_down.weight.copy_(q8(torch.randn(D, W, generator=g) * 0.2, f"d{e}"))
        if shared:
            ref.shared.w_gate_up.weight.copy_(q8(torch.randn(2 * S, D, generator=g) * 0.2, "sgu"))
            ref.shared.w_down.weight.copy_(q8(torch.randn(D, S, generator=g) * 0.2, "sd"))
            ref.shared_gate.weight.copy_(torch.randn(1, D, generator=g))
    layer = OPS.moe_layer(
        router=router.contiguous(),
        gate_up=[[(blocks[f"gu{e}"], Q8_0_KIND, 2 * W)] for e in range(E)],
        down=[[(blocks[f"d{e}"], Q8_0_KIND, D)] for e in range(E)],
        width=W,
        top_k=k,
        normalize=normalize,
        shared_gate_up=[(blocks["sgu"], Q8_0_KIND, 2 * S)] if shared else [],
        shared_down=[(blocks["sd"], Q8_0_KIND, D)] if shared else [],
        shared_width=S if shared else 0,
        shared_gate=ref.shared_gate.weight.detach().reshape(-1).contiguous() if shared else None,
    )
    return layer, ref.eval(), blocks


@pytest.mark.parametrize("shared,k,normalize", [(True, 2, False), (False, 3, True)])
def test_moe_block_matches_the_torch_module(shared, k, normalize):
    layer, ref, _ = _block(0, shared, k, normalize)
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(1))
    got = layer.apply(x)
    with torch.no_grad():
        want = ref(x)
    # the C++ matmuls quantize activations to int8 per 32 (about 1 %); routing is float32 in both
    assert (got - want).pow(2).mean().sqrt() <= 0.02 * want.pow(2).mean().sqrt()
    w, ids = layer.route(x)
    rw, rids = route(x @ ref.router.weight.T, k, normalize)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


def test_cpp_routing_breaks_ties_toward_the_lowest_expert_id():
    router = torch.zeros(E, D)
    router[[1, 3, 4]] = 1.0  # experts 1, 3, 4 tie for first; 0, 2, 5 tie below them
    layer, _, _ = _block(0, router=router, k=2)
    x = torch.ones(3, D)
    _, ids = layer.route(x)
    assert ids.tolist() == [[1, 3]] * 3
    layer, _, _ = _block(0, router=router, k=4)
    assert layer.route(x)[1].tolist() == [[1, 3, 4, 0]] * 3


def test_rows_are_independent_and_unrouted_experts_are_never_read():
    layer, _, blocks = _block(2)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3))
    together = layer.apply(x)
    for r in (0, 5, 15):  # a row's result is the same alone and among others, bitwise
        assert torch.equal(layer.apply(x[r : r + 1])[0], together[r])
    # poison the first expert no row chose (2 rows pick 4 of 6): NaN scales in every block of its matrices
    x, together = x[:2].contiguous(), together[:2]
    _, ids = layer.route(x)
    idle = next(e for e in range(E) if not (ids == e).any())
    for name in (f"gu{idle}", f"d{idle}"):
        b = blocks[name].view(blocks[name].shape[0], -1, 34)
        b[:, :, 0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # fp16 NaN, little endian
    assert torch.equal(layer.apply(x), together)
    busy = int(ids[0, 0])
    b = blocks[f"d{busy}"].view(blocks[f"d{busy}"].shape[0], -1, 34)
    b[:, :, 0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)
    assert layer.apply(x)[0].isnan().all()  # and a chosen one is read (the poison shows)


def _file_blocks(rng: np.random.Generator, kind: str, rows: int, cols: int) -> tuple[torch.Tensor, int, int]:
    """A random (rows, cols) matrix as one (blocks, kind, rows) part: Q4_0 packed 16 rows side by side,
    GGUF Q8_0 or Q4_K rows as a file stores them (random codes, small random fp16 scales)."""
    if kind == "Q8_0_X8":
        w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)) * cols**-0.5
        return quantize_q8_0(w), BLOCK_KINDS[kind], rows
    block, size, scales = {"Q4_1X16": (32, 18, 2), "Q4_K": (256, 144, 4)}[kind]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    raw[..., :scales] = (
        (rng.uniform(0.5, 1.0, (rows, cols // block, scales // 2)) * 0.02).astype(np.float16).view(np.uint8)
    )
    raw = raw.reshape(rows, -1)
    if kind == "Q4_1X16":
        return (*pack_16_rows(QuantTensor(raw, "Q4_0", (rows, cols)), OPS), rows)
    return torch.from_numpy(raw), BLOCK_KINDS[kind], rows


@pytest.mark.parametrize("M", [1, 16])
def test_grouped_experts_are_the_per_expert_matmuls_at_any_thread_count(M):
    """The block runs all chosen experts' gate_up in one parallel region and all downs in another (the pool's
    threads split the experts' rows by cost). Each output must be bitwise what each expert's own matmuls
    give (block_linear per expert, the C++ activation, the weighted sum in ascending expert id), at 1, 2
    and 3 threads (different splits, one inside an expert). Big enough that the work is split: gate and up
    in different formats, downs in two formats (int8 per 32 and per 256 activations in one region)."""
    d, w, e, k = 512, 256, 8, 3
    rng = np.random.default_rng(7)
    gate_up = [[_file_blocks(rng, "Q4_1X16", w, d), _file_blocks(rng, "Q8_0_X8", w, d)] for _ in range(e)]
    down = [[_file_blocks(rng, "Q4_K" if i % 2 else "Q4_1X16", d, w)] for i in range(e)]
    router = torch.from_numpy(rng.standard_normal((e, d)).astype(np.float32))
    layer = OPS.moe_layer(
        router=router, gate_up=gate_up, down=down, width=w, top_k=k, normalize=True,
        shared_gate_up=[], shared_down=[], shared_width=0, shared_gate=None,
    )  # fmt: skip
    x = torch.randn(M, d, generator=torch.Generator().manual_seed(8))
    weights, ids = layer.route(x)
    want = torch.zeros(M, d)
    for r in range(M):
        for j in sorted(range(k), key=lambda j: int(ids[r, j])):
            ex = int(ids[r, j])
            xr = x[r : r + 1]
            gu = torch.cat([OPS.block_linear(xr, *part) for part in gate_up[ex]], dim=1)
            y = OPS.block_linear(OPS.silu_mul(gu), *down[ex][0])
            want[r] = want[r] + weights[r, j] * y[0]
    before = OPS.threads()
    try:
        for threads in (1, 2, 3):
            OPS.set_threads(threads)
            assert torch.equal(layer.apply(x), want), f"{threads} threads"
    finally:
        OPS.set_threads(before)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """arch -> {"Q8_0": path, "Q4_0": path}: experts in that block type, attention in Q8_0."""
    built = {}

    def make(arch: str):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            loaded = load(tiny_moe.save_hf(tiny_moe.build(arch), root / "hf", stacked=False))
            built[arch] = {t: tiny_moe.write_gguf(loaded, root / f"{t}.gguf", expert_type=t) for t in ("Q8_0", "Q4_0")}
        return built[arch]

    return make


@pytest.mark.parametrize("experts", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", tiny_moe.ARCHS)
def test_fused_moe_matches_the_torch_model(ggufs, arch, experts):
    """The fused decoder (int8 activations, the file's blocks) vs the float32 torch model on the same file."""
    loaded = load(ggufs(arch)[experts])
    weights = "int4" if experts == "Q4_0" else "int8"
    fused = Engine.from_model(config=EngineConfig(slots=2, ctx=64, weights=weights, spec_tokens=0), loaded=loaded)
    ref = Engine.from_model(config=EngineConfig(slots=2, ctx=64, weights="f32", kernels="torch"), loaded=loaded)
    assert isinstance(fused.plan.runner, FusedRunner) and fused.plan.decode_mode == "compact"
    ids = [1] + [5 + (7 * i) % 90 for i in range(20)]
    a = fused.plan.prefill(ids, 1, all_logits=True)
    b = ref.plan.prefill(ids, 1, all_logits=True)
    span = (b.max() - b.min()).item()
    assert (a - b).abs().max().item() <= 0.03 * span, f"{arch} {experts}: {(a - b).abs().max().item():.3g}"
    next_a = fused.plan.decode([1], [9], [len(ids)])
    next_b = ref.plan.decode([1], [9], [len(ids)])
    assert (next_a - next_b).abs().max().item() <= 0.03 * span, arch
    # each layer routes as the model says (softmax, top-k, renormalized or not): checked on its own
    cfg = loaded.config
    h = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    for i, layer in enumerate(fused.plan.runner.moe_layers):
        w, experts_ids = layer.route(h)
        rw, rids = route(
            h @ dense(loaded.weights[f"layers.{i}.router.weight"]).T, cfg.experts_per_token, cfg.norm_topk_prob
        )
        assert torch.equal(experts_ids, rids)
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    assert len(fused.plan.runner.moe_layers) == cfg.num_layers


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe"])
def test_fused_moe_prefill_decode_and_batching_are_one_computation(ggufs, arch):
    """Prompt rows, one-at-a-time decode rows, and rows batched with other slots' rows: bitwise the same."""
    config = EngineConfig(slots=3, ctx=64, weights="int4", spec_tokens=0)
    plan = Engine.from_model(ggufs(arch)["Q4_0"], config, calibrate=True).plan  # calibrated plans are cached
    ids = [1] + [3 + (11 * i) % 90 for i in range(12)]
    prompt_rows = plan.prefill(ids, 0, all_logits=True)
    plan.prefill(ids[:4], 1)
    stepwise = [plan.decode([1], [t], [p])[0] for p, t in enumerate(ids[4:], start=4)]
    assert torch.equal(torch.stack(stepwise), prompt_rows[4:])
    plan.prefill(ids[:6], 2)
    other = [40, 41, 42]
    mixed = plan.runner.decode([2, 0, 1], [ids[6], other[0], other[1]], [6, len(ids), len(ids)])
    assert torch.equal(mixed[0], prompt_rows[6])
    # the plan cache holds the experts' blocks too: a second compile reads them back, same bits
    again = Engine.from_model(ggufs(arch)["Q4_0"], config, calibrate=True).plan
    assert again.report.cached and again.report.weight_bytes == plan.report.weight_bytes
    assert torch.equal(again.prefill(ids, 0, all_logits=True), prompt_rows)


def test_fused_moe_layer_counts_its_bytes_and_builds_matrices_in_the_plan_caches_order():
    """fused_moe_layer's byte counts feed the plan's bytes per token (expert matrices: every segment of
    every expert's gate_up and down; floats: the router and the shared gate), and its matrices are built
    in the order the plan cache stores them (each expert's gate_up then down, then the shared expert's)."""
    from types import SimpleNamespace

    from metronome.compile.moe import fused_moe_layer

    cfg = ModelConfig(
        arch="qwen2moe", vocab_size=8, hidden_size=D, intermediate_size=D, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position=64, num_experts=3, experts_per_token=2,
        moe_intermediate_size=W, norm_topk_prob=True, shared_expert_size=S,
    )  # fmt: skip
    built: list[tuple[str, ...]] = []

    def matrix(*names):  # two segments per matrix, 10 bytes each per name
        built.append(names)
        return [(torch.zeros(10 * len(names), dtype=torch.uint8), Q8_0_KIND, 1)] * 2

    weights = {"layers.0.router.weight": torch.zeros(3, D), "layers.0.shared_gate.weight": torch.zeros(1, D)}
    ops = SimpleNamespace(moe_layer=lambda **kw: kw)
    block, experts, floats = fused_moe_layer(ops, cfg, weights, 0, matrix)
    assert experts == 3 * (2 * 20 + 2 * 10)  # per expert: gate_up (2 names) and down, two segments each
    assert floats == 3 * D * 4 + D * 4
    e = "layers.0.experts."
    assert built == [
        *[n for i in range(3) for n in ((f"{e}{i}.w_gate.weight", f"{e}{i}.w_up.weight"), (f"{e}{i}.w_down.weight",))],
        ("layers.0.shared.w_gate.weight", "layers.0.shared.w_up.weight"),
        ("layers.0.shared.w_down.weight",),
    ]
    assert block["top_k"] == 2 and block["shared_width"] == S and block["shared_gate"].shape == (D,)
