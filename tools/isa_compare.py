"""The kernels' two builds on one AVX-512 CPU: the native build and the AVX2 build (csrc/avx2.h, the same
sources on pairs of 256-bit registers) decode the same prompts, and their tokens and logprobs are compared
bit for bit. `tests/kernels/test_avx2.py` compares each emulated instruction with the native one; this
checks whole models.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/isa_compare.py [--models smollm2-135m gemma3-270m] \
        [--tokens 48] [--threads 2]

Each build runs in a process of its own (a process loads one build of the extension). The AVX2 build is
compiled with `-march=x86-64-v3 -mf16c` in place of `-march=native`, into its own build directory (the
flags are part of its key). Exits non-zero if any token or logprob differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# four prompts decoded together (4 live slots), greedy; texts of different lengths
PROMPTS = [
    "The river ran past the old mill, and the miller's daughter watched the water turn the wheel. " * 12,
    "def fibonacci(n):",
    "Static scheduling places every operation before the first token: ",
    "In 1905 the patent office in Bern received a letter that " * 4,
]


def decode(isa: str, model: str, tokens: int, threads: int, out: Path) -> None:
    """In this process: build (or reuse) the kernels for `isa`, decode PROMPTS, write tokens and logprobs."""
    from metronome.kernels import build

    if isa == "avx2":  # no AVX-512 for the compiler: simd.h takes the avx2.h definitions
        build.CFLAGS = [f if f != "-march=native" else "-march=x86-64-v3" for f in build.CFLAGS] + ["-mf16c"]
    from metronome.config import EngineConfig, SamplingParams
    from metronome.engine import Engine

    engine = Engine.from_model(model, EngineConfig(slots=len(PROMPTS), ctx=1024, threads=threads, spec_tokens=0))
    params = SamplingParams(max_tokens=tokens, temperature=0, logprobs=True, ignore_eos=True)
    done = engine.generate(PROMPTS, params, chat=False)
    out.write_text(json.dumps([[list(c.token_ids), [x.logprob for x in c.choices]] for c in done]))
    print(f"{isa}: {model} decoded with the kernels in {build.build_directory()}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", nargs=2, metavar=("ISA", "OUT"), help=argparse.SUPPRESS)  # the child's part
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.decode:
        decode(args.decode[0], args.model, args.tokens, args.threads, Path(args.decode[1]))
        return 0

    from metronome.kernels.build import instruction_set

    if instruction_set() != "avx512":
        print("this CPU has no AVX-512: only the AVX2 build runs here, there is nothing to compare it with")
        return 2
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            runs = {}
            for isa in ("avx512", "avx2"):
                out = Path(tmp) / f"{isa}.json"
                child = [sys.executable, __file__, "--decode", isa, str(out), "--model", model]
                child += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
                subprocess.run(child, check=True, timeout=1800)
                runs[isa] = json.loads(out.read_text())
            a, b = runs["avx512"], runs["avx2"]
            same_tokens = sum(x[0] == y[0] for x, y in zip(a, b))
            same_logprobs = sum(x[1] == y[1] for x, y in zip(a, b))
            worst = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x[1], y[1]))
            print(
                f"{model}: {len(a)} prompts x {args.tokens} tokens; tokens equal in {same_tokens}, "
                f"logprobs equal bit for bit in {same_logprobs}; largest logprob difference {worst:.3g}"
            )
            failed |= same_tokens != len(a) or same_logprobs != len(a)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
