"""Numerics against an independent reference: HF transformers on the same weights, in float32.

Real files: HF loads the same GGUF (`from_pretrained(dir, gguf_file=...)`), dequantizing it as we do.
Tiny random models: built and saved by transformers here, read through metronome's HF-folder path."""

from __future__ import annotations

import pytest
import torch

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load

SMOLLM_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers.",
    "How do I boil an egg?",
]
GEMMA_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]
GREEDY_TOKENS = 64


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _hf_greedy(hf, ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids) :].tolist()


def _compare(engine: Engine, hf, prompts_ids: list[list[int]], label: str) -> None:
    """Prompt logits within 1e-3 of the logit range; greedy continuations identical."""
    worst = 0.0
    for ids in prompts_ids:
        ours = engine.plan.prefill(ids, 0, all_logits=True)  # (T, V)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        rel = diff / (ref.max() - ref.min()).item()
        worst = max(worst, rel)
        assert rel <= 1e-3, f"{label}: logits differ by {diff:.3g} ({rel:.3g} of the range)"
    print(f"\n{label}: max |logit diff| / logit range over {len(prompts_ids)} prompts = {worst:.3g}")
    for ids in prompts_ids:
        theirs = _hf_greedy(hf, ids, GREEDY_TOKENS, engine.tokenizer.eos_ids)
        ours = engine.generate(ids, SamplingParams(max_tokens=GREEDY_TOKENS)).token_ids
        assert list(ours) == theirs[: len(ours)] and len(ours) == len(theirs), (
            f"{label}: greedy continuations diverge:\n ours   {engine.tokenizer.decode(ours)!r}\n theirs "
            f"{engine.tokenizer.decode(theirs)!r}"
        )


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm, smollm_path):
    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=512, weights="f32"), loaded=smollm)
    prompts = [engine.encode_prompt(p) for p in SMOLLM_PROMPTS]
    _compare(engine, _hf_gguf(smollm_path), prompts, "SmolLM2-135M Q4_1")


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma_path):
    engine = Engine.from_model(gemma_path, EngineConfig(slots=1, ctx=1024, weights="f32"))
    prompts = [engine.encode_prompt(p, chat=False) for p in GEMMA_PROMPTS]
    # One prompt longer than the 512-token sliding window, so that local layers really slide.
    long_text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(90))
    prompts.append(engine.encode_prompt(long_text + " The last item is", chat=False))
    assert len(prompts[-1]) > 600
    _compare(engine, _hf_gguf(gemma_path), prompts, "Gemma-3-270M Q4_K_M")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_tiny_hf_folders_match_transformers(tiny_hf, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny_hf(arch)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = Engine.from_model(folder, EngineConfig(slots=1, ctx=128, weights="f32"))
    g = torch.Generator().manual_seed(7)
    prompts = [[1] + torch.randint(5, engine.plan.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 19, 40)]
    for ids in prompts:
        ours = engine.plan.prefill(ids, 0, all_logits=True)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, (ref.max() - ref.min()).item()), arch
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids) :].tolist()
        assert list(engine.generate(ids, params).token_ids) == theirs, arch


def test_tiny_config_is_read_from_the_folder(tiny_hf):
    gemma = load(tiny_hf("gemma3")).config
    assert (gemma.arch, gemma.sliding_window, gemma.sliding_window_pattern) == ("gemma3", 8, 3)
    assert [gemma.is_sliding(i) for i in range(3)] == [True, True, False]
    assert (gemma.rope_theta, gemma.rope_local_theta) == (1e6, 1e4)
    llama = load(tiny_hf("llama")).config
    assert llama.rope_scaling is not None and llama.rope_scaling.kind == "llama3" and not llama.tie_embeddings
    assert load(tiny_hf("qwen2")).config.qkv_bias and load(tiny_hf("qwen3")).config.qk_norm


def test_rope_scalings_give_the_frequencies_transformers_and_gguf_files_use(tiny_hf):
    """Linear interpolation divides every frequency by the factor; a GGUF's rope_freqs divides each by its own
    factor; llama3 as transformers computes it (the tiny llama's end-to-end check covers only llama3)."""
    import dataclasses

    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from metronome.config import RopeScaling
    from metronome.model.transformer import rope_frequencies

    cfg = load(tiny_hf("llama")).config
    d, theta = cfg.head_dim, cfg.rope_theta
    plain = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    linear = dataclasses.replace(cfg, rope_scaling=RopeScaling(kind="linear", factor=4.0))
    torch.testing.assert_close(rope_frequencies(linear, theta, True), (plain / 4.0).float())
    assert torch.equal(rope_frequencies(linear, theta, False), plain.float())  # Gemma's local layers: unscaled
    factors = tuple(1.0 + i for i in range(d // 2))
    gguf_freqs = dataclasses.replace(cfg, rope_scaling=RopeScaling(kind="factors", factors=factors))
    torch.testing.assert_close(
        rope_frequencies(gguf_freqs, theta, True), (plain / torch.tensor(factors, dtype=torch.float64)).float()
    )
    hf = T.LlamaConfig.from_pretrained(tiny_hf("llama"))
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg, theta, True), inv.float())
