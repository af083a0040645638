"""Every MoE architecture's GGUF against llama.cpp (llama-cpp-python; CI does not install it, so this module
skips there): the tiny random models of tests/helpers/tiny_moe.py, with weights spread so that logits span
several units, written by the `gguf` writer and read by both engines from the same file.

- F32 file, metronome's float32 path vs llama.cpp with a float32 KV cache: the same arithmetic up to
  summation order, so logits agree to about 1e-6 of their range and greedy tokens agree everywhere.
- Q8_0 / Q4_0 expert blocks (the formats the fused decoder reads from the file), the fused plan vs llama.cpp:
  both round activations to 8 bits before the block dot products, but their other roundings differ
  (metronome's KV cache is bf16), so most rows agree within 3 % of the logit range, and a row whose router
  nearly ties may go to another expert in one engine (tests/helpers/llama_peer.py `assert_near`)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_moe
from helpers.llama_peer import assert_near, greedy_against_llama_cpp, open_llama

from metronome.compile.fused import FusedRunner
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

TOKENS = 24  # greedy tokens after each prompt
# Narrow routers: each row's top-k softmax weights are then of one size (not one expert taking nearly all),
# so every chosen expert and the renormalization rule move the logits (with the fused plan's rule flipped,
# the median row differs from llama.cpp by 7-18 % of the logit range instead of under 1 %). How often the
# engines' different rounding flips a router near-tie hardly depends on the routers' scale: the gaps and
# the errors in the router logits scale together.
ROUTER_STD = 0.12


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(3, len(tiny_moe.VOCAB), (n,), generator=g).tolist() for n in (5, 12, 8, 16)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """arch -> {"F32" | "Q8_0" | "Q4_0": GGUF path} (the block type of the experts; other matrices F32 or
    Q8_0). OLMoE without grouped-query attention: llama.cpp's olmoe graph takes its K norm as wide as the
    hidden size (as OLMoE's own checkpoints are), so a file with fewer KV heads does not load there."""
    built = {}

    def make(arch: str):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            hf = tiny_moe.build(arch, kv_heads=4 if arch == "olmoe" else 2, gain=1.0, router_std=ROUTER_STD)
            loaded = load(tiny_moe.save_hf(hf, root / "hf", stacked=False))
            built[arch] = {
                t: tiny_moe.write_gguf(loaded, root / f"{t}.gguf", expert_type=t, matrix_type=m)
                for t, m in (("F32", "F32"), ("Q8_0", "Q8_0"), ("Q4_0", "Q8_0"))
            }
        return built[arch]

    return make


@pytest.mark.parametrize("arch", tiny_moe.ARCHS)
def test_f32_gguf_matches_llama_cpp(files, arch):
    """The float32 path and llama.cpp on the F32 file: logits within 1e-5 of their range on every prompt row
    and every step, and the same greedy token at every step of every prompt."""
    path = files(arch)["F32"]
    plan = Engine.from_model(path, EngineConfig(slots=1, ctx=128, weights="f32", kernels="torch", spec_tokens=0)).plan
    llm = open_llama(path, f32_cache=True)
    worst = 0.0
    for prompt in _prompts():
        a = greedy_against_llama_cpp(plan, llm, prompt, TOKENS)
        assert a.max_diff <= 1e-5 * a.span, f"{arch}: logits differ by {a.max_diff:.3g} (range {a.span:.3g})"
        assert not a.parted, f"{arch}: greedy tokens part at {a.parted}"
        worst = max(worst, a.max_diff)
    print(f"\n{arch} F32: {len(_prompts()) * TOKENS} greedy tokens agree, max |logit diff| {worst:.3g}")


@pytest.mark.parametrize("experts", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", tiny_moe.ARCHS)
def test_fused_gguf_matches_llama_cpp_up_to_near_ties(files, arch, experts):
    """The fused plan (the file's expert blocks, int8 activations, bf16 cache) and llama.cpp on the same file."""
    path = files(arch)[experts]
    weights = "int4" if experts == "Q4_0" else "int8"
    plan = Engine.from_model(path, EngineConfig(slots=1, ctx=128, weights=weights, spec_tokens=0)).plan
    assert isinstance(plan.runner, FusedRunner)
    llm = open_llama(path, f32_cache=True)
    results = [greedy_against_llama_cpp(plan, llm, prompt, TOKENS) for prompt in _prompts()]
    print("\n" + assert_near(results, f"{arch} {experts}"))
