"""A/B of the block matmul kernels: an earlier commit's csrc/blocks.cpp beside the working tree's, in one process.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/ab_blocks.py --base 8d84ff4 \
        [--kinds Q8_0_X8,Q5_0,Q4_K] [--shape 512 2048] [--threads 1] [--rows 1 4] [--rounds 15] [--from-memory GB]

"The working tree" is the one `metronome` is imported from: the editable install's (this checkout), or the
tree that PYTHONPATH names (a worktree with a change, say). The base commit's blocks.cpp and pool.cpp (with
its headers) are built as a second extension module that exports only `block_linear` and `set_threads` (the
full module's pybind11 types cannot be registered twice), cached under ~/.cache/metronome/ab-<commit>. Calls
alternate between the two builds round by round, so a machine whose speed drifts from minute to minute slows
both alike; each row reports GB/s of weight bytes (median), the median and range of the per-round ratios
base/new, and the largest output difference relative to the output's largest value (0 where the integer sums
and the float steps are unchanged). Random codes and scales of valid layout (timing only;
tests/kernels/test_block_formats.py checks values). A matrix that fits the caches is read from them;
`--from-memory GB` times sweeps over copies of it totalling GB instead (pick more than the L3: the Intel Xeon
VM's is 480 MiB), as a decoder's step reads its weights.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

import torch
from bench_kernels import alternating, format_blocks  # tools/: timing, random matrices of valid block layout
from torch.utils import cpp_extension

import metronome
from metronome.kernels import build
from metronome.kernels.blocks import BLOCK_KINDS
from metronome.kernels.ops import load_kernels

BINDING = """#include <torch/extension.h>
#include "blocks.h"
#include "pool.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_threads", &metronome::set_threads);
  m.def("block_linear", &metronome::block_linear);
}
"""
SOURCES = ("blocks.cpp", "pool.cpp")  # and every header the commit has (simd.h includes avx2.h since 2026-12-02)


def _write_if_changed(path: Path, text: str) -> None:
    """Rewritten files are newer than the build, which ninja then compiles again (a minute each run)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def base_module(commit: str):
    """The base commit's block kernels as a module of their own (built once per commit)."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip())
    full = subprocess.run(["git", "rev-parse", commit], capture_output=True, text=True, cwd=root, check=True).stdout
    directory = Path.home() / ".cache" / "metronome" / f"ab-{full.strip()[:12]}"
    directory.mkdir(parents=True, exist_ok=True)
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, "metronome/kernels/csrc/"], capture_output=True, text=True, cwd=root
    ).stdout.split()
    headers = [Path(f).name for f in listing if f.endswith(".h")]
    for name in (*SOURCES, *headers):
        text = subprocess.run(
            ["git", "show", f"{commit}:metronome/kernels/csrc/{name}"], capture_output=True, text=True, cwd=root
        )
        if text.returncode != 0:
            raise SystemExit(f"--base {commit}: no metronome/kernels/csrc/{name} there ({text.stderr.strip()})")
        _write_if_changed(directory / name, text.stdout)
    _write_if_changed(directory / "ab_bindings.cpp", BINDING)
    return cpp_extension.load(
        name=f"metronome_blocks_{full.strip()[:12]}",
        sources=[str(directory / n) for n in ("blocks.cpp", "pool.cpp", "ab_bindings.cpp")],
        extra_cflags=build.compile_flags(),
        extra_ldflags=build.LDFLAGS,
        extra_include_paths=[str(directory)],
        build_directory=str(directory),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against (e.g. a tag, a hash, HEAD~3)")
    p.add_argument("--kinds", default="Q8_0_X8,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K", help=f"from {', '.join(BLOCK_KINDS)}")
    p.add_argument("--shape", type=int, nargs=2, default=[512, 2048], metavar=("N", "K"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="rows of x (M)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--from-memory", type=float, default=0.0, metavar="GB", help="sweep copies totalling GB")
    a = p.parse_args()
    unknown = [k for k in a.kinds.split(",") if k not in BLOCK_KINDS]
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; choose from {', '.join(BLOCK_KINDS)}")
    new = load_kernels()  # first: loaded after the base module, its static set-up crashed (2026-12-02)
    base = base_module(a.base)
    for mod in (base, new):
        mod.set_threads(a.threads)
    n, k = a.shape
    gen = torch.Generator().manual_seed(0)
    where = f"sweeps over copies of {a.from_memory:g} GB in all" if a.from_memory else "one matrix"
    tree = Path(metronome.__file__).resolve().parent.parent
    print(f"base {a.base} vs the tree at {tree}; {n} x {k} ({where}), {a.threads} thread(s), {a.rounds} rounds")
    for name in a.kinds.split(","):
        w, kind = format_blocks(name, n, k, gen)
        copies = [w] + [w.clone() for _ in range(int(a.from_memory * 1e9 / w.nbytes) - 1)]
        for m in a.rows:
            x = torch.randn(m, k, generator=gen)
            y_base, y_new = base.block_linear(x, w, kind, n, None), new.block_linear(x, w, kind, n)
            diff = ((y_base - y_new).abs().max() / y_base.abs().max()).item()
            calls = {
                tag: (lambda mod=mod, x=x, kind=kind, ws=copies: [mod.block_linear(x, c, kind, n, None) for c in ws])
                for tag, mod in (("base", base), ("new", new))
            }
            swept = w.nbytes * len(copies)
            times = alternating(calls, a.rounds, max(1, int(2e-3 * 20e9 / swept)))  # >= 2 ms a timing at 20 GB/s
            ratios = [b / c for b, c in zip(times["base"], times["new"])]
            gb = {t: swept / statistics.median(v) / 1e9 for t, v in times.items()}
            print(
                f"{name:8s} M={m:<3d} base {gb['base']:6.1f} GB/s  new {gb['new']:6.1f} GB/s  base/new "
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})  max diff {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
