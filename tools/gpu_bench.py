"""Batch-1 decode speed on one CUDA GPU, beside the HBM bound: the default model and a Llama-3.1-8B-shaped
model with random bf16 weights (speed does not depend on the values).

    python tools/gpu_bench.py [--model M] [--bandwidth-gbs 3350] [--tokens 256]

`--model` takes any model `load` does (default: the embedded SmolLM2). On a machine where no shipped
model can travel, pass a random file: `python -m metronome.bench.random_gguf --shape llama-3.2-1b --out F`.

Each plan is compiled as `metronome compile --device cuda` would (bf16, static KV cache, decode step
captured as CUDA graphs); decode runs one slot, greedy, and the median of 3 runs is reported next to
the bound: bf16 weight bytes read per token / HBM bandwidth (H100 SXM: 3.35 TB/s; H200: 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metronome.compile import Plan, PlanReport, compile_plan
from metronome.compile.probe import calibrate, choose_decode_mode
from metronome.compile.runner import TorchRunner
from metronome.config import EngineConfig, ModelConfig
from metronome.kernels.ops import StaticOps
from metronome.model.transformer import KVCache, Transformer, use_ops

LLAMA_8B = ModelConfig(
    arch="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_embeddings=False,
    name="Llama-3.1-8B shape (random)",
)


def random_plan(cfg: ModelConfig, ctx: int) -> Plan:
    """A bf16 plan of `cfg` with random weights, built directly on the GPU (no file, no host copy)."""
    with torch.device("meta"):
        model = Transformer(cfg, ctx)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        model.rope = type(model.rope)(cfg, cfg.rope_theta, ctx).cuda()
    use_ops(model.eval().requires_grad_(False), StaticOps())
    config = EngineConfig(slots=1, ctx=ctx, device="cuda", weights="bf16")
    cache = KVCache.allocate(cfg, 1, ctx, torch.bfloat16, "cuda")
    runner = TorchRunner(model, cache, config)
    mode, invariance = choose_decode_mode(runner, cfg, config.slots, config.ctx)
    runner.capture_graphs()
    report = PlanReport("bf16", "cuda", 1, ctx, mode, runner.weight_bytes, cache.nbytes(), invariance=invariance)
    return Plan(runner, cfg, config, "bf16", cache, report)


def decode_rate(plan: Plan, tokens: int) -> tuple[float, float]:
    """(tokens/s median of 3 runs, calibrated step ms) for greedy batch-1 decode after a 16-token prompt."""
    predicted = calibrate(plan.runner, 1, plan.config.ctx, plan.device, plan.config.prefill_chunk).step_ms[1]
    rates = []
    for _ in range(3):
        logits = plan.prefill(list(range(1, 17)), 0)
        token = int(torch.argmax(logits))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(tokens):
            token = int(torch.argmax(plan.decode([0], [token], [16 + i])[0]))  # the sync a sampler pays
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates), predicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="HBM bandwidth for the bound (H100 SXM: 3350)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--model", default=None, help="a GGUF path or a registered model's short name (default: SmolLM2)")
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    from metronome.model.loader import load

    model = load(args.model, param="--model")
    small = compile_plan(model, EngineConfig(slots=1, ctx=1024, device="cuda", weights="bf16"), cache=False)
    big = random_plan(LLAMA_8B, ctx=1024)
    for name, plan in [(model.config.name or str(args.model), small), (LLAMA_8B.name, big)]:
        rate, step_ms = decode_rate(plan, args.tokens)
        bytes_per_token = plan.report.weight_bytes
        bound = args.bandwidth_gbs * 1e9 / bytes_per_token
        print(
            f"| {name} | {plan.decode_mode} | {bytes_per_token / 1e9:.2f} GB | {rate:,.0f} tok/s | "
            f"{bound:,.0f} tok/s | {rate / bound:.0%} | calibrated step {step_ms:.3f} ms vs measured {1000 / rate:.3f} ms |"
        )


if __name__ == "__main__":
    main()
