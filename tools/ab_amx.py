"""AMX against the vector path for the packed kinds it runs (Q8_0X16, Q5_0X16, Q4_1X16, Q4_KX16): the same matrices
and rows of x, alternating in one process (`CppOps.set_amx`), and then a prompt's TTFT in the engine each way
(docs/performance.md, "AMX for prompts").

    flock /tmp/metronome-bench.lock .venv/bin/python tools/ab_amx.py [--threads 2] [--rows 16 32 256] \
        [--rounds 7] [--model qwen2.5-coder-0.5b ... --prompt-tokens 1000 --prompt-rounds 5]

Both paths give the same bits (tests/kernels/test_block_formats.py); this measures only their time. Matrices
come from gguf's quantizer (Q4_K: random valid blocks), packed as the plans pack them. Without AMX (an AMD CPU, a build without it, or
Linux refusing it) the tool says so and stops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from ab_x16 import blocks as random_blocks  # tools/
from bench_kernels import alternating  # tools/
from gguf import GGMLQuantizationType, quants

from metronome.compile.quant import pack_16_rows
from metronome.kernels.ops import CppOps, load_kernels
from metronome.model.loader import QuantTensor

# (format, N, K): SmolLM2's and Qwen2.5-0.5B's shapes, a slice of Gemma 3's head, Qwen2.5-1.5B's q and a
# slice of its gate/up
SHAPES = [("Q4_1", 1536, 576), ("Q5_0", 4864, 896), ("Q8_0", 896, 896), ("Q8_0", 4096, 640)]
SHAPES += [("Q4_K", 1536, 1536), ("Q4_K", 4480, 1536)]


def kernels(ops: CppOps, rows: list[int], rounds: int) -> None:
    rng = np.random.default_rng(0)
    for qtype, n, k in SHAPES:
        if qtype == "Q4_K":  # gguf has no Q4_K quantizer: valid blocks of random codes and small scales
            raw = random_blocks(qtype, n, k)
        else:
            w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            raw = quants.quantize(w, GGMLQuantizationType[qtype]).reshape(n, -1)
        packed, kind = pack_16_rows(QuantTensor(raw=raw, qtype=qtype, shape=(n, k)), ops)
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))

            def run(on: bool, x: torch.Tensor = x, packed: torch.Tensor = packed, kind: int = kind, n: int = n) -> None:
                ops.set_amx(on)
                ops.block_linear(x, packed, kind, n)

            calls = {"vector": lambda: run(False), "amx": lambda: run(True)}
            start = time.perf_counter()
            calls["vector"]()
            repeat = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))  # ~20 ms per timing
            times = alternating(calls, rounds, repeat)
            ratios = [v / a for v, a in zip(times["vector"], times["amx"])]
            print(
                f"{qtype} {n} x {k}, M={m:<3d} vector {statistics.median(times['vector']) * 1e6:8.1f} us  amx "
                f"{statistics.median(times['amx']) * 1e6:8.1f} us  vector/amx {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f})",
                flush=True,
            )
    ops.set_amx(True)


def prefill(ops: CppOps, model: str, tokens: int, rounds: int, threads: int) -> None:
    from metronome.config import EngineConfig, SamplingParams
    from metronome.engine import Engine
    from metronome.serve.usage import groq_timings

    engine = Engine.from_model(model, EngineConfig(threads=threads))
    vocab = engine.plan.cfg.vocab_size
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds + 1):  # the first round warms the pages of a longer scratch
        for on in (False, True) if r % 2 == 0 else (True, False):
            ops.set_amx(on)
            ids = [(1000 + 7 * i + 13 * r + 5 * on) % vocab for i in range(tokens)]  # new: no prefix cache hit
            c = engine.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True))
            if r > 0:
                times[on].append(groq_timings(c.timings)["prompt_time"])
    ops.set_amx(True)
    vector, amx = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{model}, {tokens}-token prompt, TTFT median of {rounds}: vector {vector:.3f} s, amx {amx:.3f} s, "
        f"vector/amx {vector / amx:.2f}x",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 256], help="rows of x (M)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--model", nargs="*", default=[], help="models whose prompt TTFT to compare (none: kernels only)")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--prompt-rounds", type=int, default=5)
    a = p.parse_args()
    ops = load_kernels()
    if not ops.set_amx(True):
        raise SystemExit("no AMX here: the CPU, the kernels' build (-march=native) or Linux lacks it")
    ops.set_threads(a.threads)
    kernels(ops, a.rows, a.rounds)
    for model in a.model:
        prefill(ops, model, a.prompt_tokens, a.prompt_rounds, a.threads)


if __name__ == "__main__":
    main()
