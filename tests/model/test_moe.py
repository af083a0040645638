"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers on tiny random models
built here (tests/helpers/tiny_moe.py): HF folders in both expert layouts and GGUF files, routing rules,
the determinism contract on the torch path, and the active-bytes accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_moe

from metronome.config import EngineConfig, ModelConfig, ParamError, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.model.moe import active_weight_bytes, route


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """arch -> (transformers model, HF folder (per-expert tensors), HF folder (stacked), F32 GGUF)."""
    built = {}

    def make(arch: str):
        if arch not in built:
            hf = tiny_moe.build(arch)
            root = tmp_path_factory.mktemp(arch)
            flat = tiny_moe.save_hf(hf, root / "hf", stacked=False)
            stacked = tiny_moe.save_hf(hf, root / "hf-stacked", stacked=True)
            gguf = tiny_moe.write_gguf(load(flat), root / "f32.gguf", expert_type="F32", matrix_type="F32")
            built[arch] = hf, flat, stacked, gguf
        return built[arch]

    return make


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (6, 23)]


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("source", ["hf", "hf-stacked", "gguf"])
@pytest.mark.parametrize("arch", tiny_moe.ARCHS)
def test_moe_matches_transformers(moe, arch, source):
    """float32 path: prompt logits within 1e-5 of the logit range, greedy continuations identical."""
    hf, flat, stacked, gguf = moe(arch)
    path = {"hf": flat, "hf-stacked": stacked, "gguf": gguf}[source]
    engine = Engine.from_model(path, EngineConfig(slots=1, ctx=128, weights="f32", spec_tokens=0))
    worst = 0.0
    for ids in _prompts(len(tiny_moe.VOCAB)):
        ours = engine.plan.prefill(ids, 0, all_logits=True)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-5 * (ref.max() - ref.min()).item(), f"{arch} {source}: logits differ by {diff:.3g}"
        ours_ids = engine.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True)).token_ids
        assert list(ours_ids) == _hf_greedy(hf, ids, 16), f"{arch} {source}: greedy continuations differ"
    print(f"\n{arch} {source}: max |logit diff| vs transformers = {worst:.3g}")


@pytest.mark.parametrize("arch", tiny_moe.ARCHS)
def test_gguf_and_hf_configs_agree(moe, arch):
    _hf, flat, _stacked, gguf = moe(arch)
    a, b = load(flat).config, load(gguf).config
    fields = ("num_experts", "experts_per_token", "moe_intermediate_size", "norm_topk_prob", "shared_expert_size")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert a.qk_norm_full == b.qk_norm_full == (arch == "olmoe")
    assert (
        a.num_experts == 8
        and a.experts_per_token == (2 if arch == "mixtral" else 3)
        and a.norm_topk_prob == (arch in ("mixtral", "qwen3moe"))
    )
    assert a.shared_expert_size == (96 if arch == "qwen2moe" else 0)


def test_routing_is_softmax_then_top_k_with_ties_to_the_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    w, ids = route(logits, 2, normalize=False)
    assert ids.tolist() == [[1, 2], [0, 1]]  # three-way tie at 2.0: ids 1 and 2; then 1 of four zeros
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(w, torch.stack([p[0, [1, 2]], p[1, [0, 1]]]))
    wn, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(wn.sum(-1), torch.ones(2))
    # without ties, the same experts and weights as torch.topk
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    w, ids = route(x, 3, normalize=False)
    top, top_ids = torch.topk(torch.softmax(x, -1), 3)
    assert torch.equal(ids, top_ids) and torch.equal(w, top)


@pytest.mark.parametrize("tensor", ["gate_up_proj", "down_proj"])
def test_stacked_experts_of_another_shape_are_refused_by_name(moe, tmp_path, tensor):
    """One expert too many in gate_up_proj loaded the first num_experts silently; down_proj's shape was not
    checked at all (one expert too few: an IndexError at the last expert)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from metronome.model.errors import ModelFileError

    _hf, _flat, stacked, _gguf = moe("qwen2moe")
    folder = shutil.copytree(stacked, tmp_path / "bad")
    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in state if k.endswith(f"layers.0.mlp.experts.{tensor}"))
    t = state[name]
    state[name] = torch.cat([t, t[:1]]) if tensor == "gate_up_proj" else t[:-1].contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="layer 0: stacked experts must be gate_up_proj"):
        load(folder)


def test_moe_config_checks_its_fields():
    base = dict(
        arch="mixtral", vocab_size=8, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=16, max_position=64, num_experts=4, moe_intermediate_size=32,
    )  # fmt: skip
    with pytest.raises(ParamError, match="experts_per_token"):
        ModelConfig(**base, experts_per_token=5)
    with pytest.raises(ParamError, match="moe_intermediate_size"):
        ModelConfig(**(base | {"moe_intermediate_size": 0}), experts_per_token=2)
    cfg = ModelConfig(**base, experts_per_token=2)
    every = dataclasses.replace(cfg, experts_per_token=4)
    # a token reads 2 of the 4 experts of each layer: 2 * 3 * 32 * 32 weights fewer than all 4
    assert every.active_parameters() - cfg.active_parameters() == 2 * 3 * 32 * 32
    assert every.active_parameters() == every.num_parameters()


@pytest.mark.parametrize("arch", ["qwen2moe", "olmoe"])
@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_torch_path_rows_are_independent(moe, arch, weights):
    """A row's logits are bitwise the same alone, batched with others, and in another slot (the torch
    runner, compact or fixed as its probe chose; MoE dispatch follows)."""
    _hf, flat, _stacked, _gguf = moe(arch)
    engine = Engine.from_model(flat, EngineConfig(slots=4, ctx=64, weights=weights, kernels="torch", spec_tokens=0))
    plan = engine.plan
    prompts = _prompts(len(tiny_moe.VOCAB))
    lens = [len(prompts[s % 2]) for s in range(4)]

    def fresh() -> None:  # a fixed-shape step writes every slot's cache (idle rows at position 0): refill
        for slot in range(4):
            plan.prefill(prompts[slot % 2], slot)

    tokens = [11, 12, 13, 14]
    fresh()
    together = plan.decode([0, 1, 2, 3], tokens, lens)
    for s in range(4):
        fresh()
        alone = plan.decode([s], [tokens[s]], [lens[s]])
        assert torch.equal(alone[0], together[s]), f"{arch} {weights} ({plan.decode_mode}): slot {s}"
    # slots 0 and 2 hold the same prompt: the same token there gives the same bits
    fresh()
    pair = plan.decode([0, 2], [9, 9], [lens[0], lens[2]])
    fresh()
    assert torch.equal(pair[0], pair[1]) and torch.equal(pair[1], plan.decode([2], [9], [lens[2]])[0])


def test_active_bytes_count_only_the_routed_experts(moe):
    """The plan's bytes per token: every non-expert matrix, the float32 router, and k of the E experts.
    Checked against the same model with k = E (every expert read): the difference is (E - k) experts; and
    against the transformers model's own tensors: everything but the norms and the embedding table (one row
    of it), the routers and the shared expert's gate included."""
    hf, flat, _stacked, _gguf = moe("qwen2moe")
    loaded = load(flat)
    cfg = loaded.config
    config = EngineConfig(slots=1, ctx=32, weights="f32", kernels="torch", spec_tokens=0)
    sparse = Engine.from_model(config=config, loaded=loaded).plan.report.weight_bytes
    every = dataclasses.replace(loaded, config=dataclasses.replace(cfg, experts_per_token=cfg.num_experts))
    dense = Engine.from_model(config=config, loaded=every).plan.report.weight_bytes
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # float32 gate, up, down
    assert dense - sparse == cfg.num_layers * (cfg.num_experts - cfg.experts_per_token) * expert
    assert active_weight_bytes(1000, 800, cfg) == 200 + 800 * cfg.experts_per_token // cfg.num_experts
    sizes = {name: p.numel() for name, p in hf.named_parameters()}
    assert any(".mlp.gate." in n for n in sizes) and any("shared_expert_gate" in n for n in sizes)
    experts = 4 * sum(v for n, v in sizes.items() if ".mlp.experts." in n)
    read = sum(v for n, v in sizes.items() if "norm" not in n and "embed_tokens" not in n and ".experts." not in n)
    assert sparse == active_weight_bytes(4 * read + experts, experts, cfg) + 4 * cfg.hidden_size


@pytest.mark.parametrize("arch", tiny_moe.ARCHS)
def test_the_fleet_planner_sizes_moe_models_as_the_loader_does(moe, arch):
    """The planner's shape (fleet/shapes.py) of an MoE folder and GGUF file: expert width, shared expert and
    the experts a token leaves idle, as the loaded model's own config counts them."""
    from metronome.fleet.shapes import load_shape

    _hf, flat, _stacked, gguf = moe(arch)
    cfg = load(flat).config
    idle = cfg.num_parameters() - cfg.active_parameters()
    for source in (flat, gguf):
        shape = load_shape(str(source))
        assert shape.expert_params() == 3 * cfg.hidden_size * cfg.moe_intermediate_size
        assert cfg.num_layers * shape.shared_params() == (
            cfg.num_parameters() - dataclasses.replace(cfg, shared_expert_size=0).num_parameters()
        )
        assert cfg.num_layers * (shape.mlp_params_total() - shape.mlp_params_active(1)) == idle


def test_info_describes_the_experts(moe, capsys):
    """`metronome info` on a mixture of experts: the experts, their width, how many run, the shared expert
    and the active parameters (it showed only the dense ffn width, which every sparse layer leaves unused)."""
    from metronome.cli import main

    _hf, flat, _stacked, _gguf = moe("qwen2moe")
    c = load(flat).config
    assert main(["info", str(flat)]) == 0
    out = capsys.readouterr().out
    assert f"{c.num_experts} of width {c.moe_intermediate_size}, {c.experts_per_token} per token" in out
    assert f"shared expert of width {c.shared_expert_size}" in out and "active parameters" in out


def test_routers_and_norms_keep_the_files_float32_in_a_bf16_plan(moe):
    """Routing decides which experts run: a bf16 plan keeps every router, shared-expert gate and norm weight
    at the file's float32 bits (as llama.cpp does), whatever it rounds the matrices to. They were cast back to
    float32 after the model's cast to bf16: float32 tensors holding bf16-rounded values."""
    from metronome.model.moe import Router
    from metronome.model.transformer import RMSNorm

    _hf, flat, _stacked, _gguf = moe("qwen2moe")
    loaded = load(flat)
    config = EngineConfig(slots=1, ctx=32, weights="bf16", kernels="torch", spec_tokens=0)
    model = Engine.from_model(config=config, loaded=loaded).plan.runner.model
    kept = {name: m for name, m in model.named_modules() if isinstance(m, (Router, RMSNorm))}
    assert {"layers.0.mlp.router", "layers.0.mlp.shared_gate", "layers.0.attn_norm"} <= set(kept)
    for name, m in kept.items():
        source = name.replace(".mlp.router", ".router").replace(".mlp.shared_gate", ".shared_gate")
        assert m.weight.dtype == torch.float32, name
        assert torch.equal(m.weight, loaded.weights[f"{source}.weight"].float()), name
    assert model.layers[0].attn.wqkv.weight.dtype == torch.bfloat16


def test_the_router_multiplies_in_float32_whatever_the_activations_dtype():
    """bf16 activations are widened, not the router narrowed: the logits are x @ W.T in float32."""
    from metronome.model.moe import Router

    g = torch.Generator().manual_seed(3)
    router = Router(8, 64)
    router.weight.data = torch.randn(8, 64, generator=g) / 8
    x = torch.randn(5, 64, generator=g).bfloat16()
    logits = router(x)
    want = (x.double() @ router.weight.double().T).float()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
