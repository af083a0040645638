"""The plan cache: a calibrated plan saved on disk and read back by the next compile of the same file with
the same settings on the same machine and code (packed weights, decode shape, latencies)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import platform
import shutil
from pathlib import Path
from typing import Callable

import torch

from metronome.config import EngineConfig, cache_root, remove_stale_partials
from metronome.kernels.ops import CppOps, Ops, build_directory
from metronome.model.loader import LoadedModel

# 2: the compile package (runner/fused/stages) replaced plan.py; 3: matrices as segments; 4: prompt_row_ms;
# 5: calibration in interleaved rounds (probe.calibrate; the earlier figures' ratios could be a slow minute's),
# with a far prompt-row figure, and a prompt row alone counted beyond the one-row step; 6: Q5_0 packed 16 rows
# side by side (quant.pack_q5_0); 7: Q4_K and Q6_K packed the same way (quant.pack_16_rows); 8: Q8_0 too;
# 9: Q4_0/Q4_1 as Q4_1X16, which took the kind code of the four-row Q4X4 (removed); 10: Q5_0X16's fifth bits
# as bit planes
PLAN_CACHE_VERSION = 10
# The plans kept, by bytes: a plan holds the model's packed weights (100 MB to 1.2 GB for the named models), and
# every change of a setting, of the code or of the version makes a new one. Nothing was ever removed: a
# developer's cache held 53 plans, 8.4 GB. After a write, the least recently used plans beyond this go.
PLAN_CACHE_BYTES = 4 << 30


def plan_cache_path(loaded: LoadedModel, config: EngineConfig, weights: str, ops: Ops, threads: int) -> Path:
    """Where a plan is cached: <plan_cache_root()>/<key>.pt.
    The key covers the model file (LoadedModel.fingerprint: every byte), every setting, the resolved weight
    format and thread count, the code that reads, packs and runs weights (_code_files) and the kernel build
    (its sources, torch, Python and this CPU; calibrated latencies belong to a machine, so its name too)."""
    key = hashlib.sha256()
    kernel_build = build_directory().name if isinstance(ops, CppOps) else "torch-ops"
    code = b"".join(p.read_bytes() for p in _code_files())
    for part in (
        PLAN_CACHE_VERSION,
        loaded.fingerprint(),
        repr(dataclasses.replace(config, prefix_cache_tokens=0)),  # the pool is allocated, not calibrated
        weights,
        kernel_build,
        threads,
        torch.__version__,
        platform.node(),
        hashlib.sha256(code).hexdigest(),
    ):
        key.update(str(part).encode())
        key.update(b"\0")
    return plan_cache_root() / f"{key.hexdigest()[:24]}.pt"


def plan_cache_root() -> Path:
    """$METRONOME_PLAN_CACHE, default plans/ under the cache root ($METRONOME_CACHE_DIR, ~/.cache/metronome)."""
    return Path(os.environ.get("METRONOME_PLAN_CACHE") or cache_root() / "plans")


def _code_files() -> list[Path]:
    """The modules whose change can change a plan's packed weights or what they compute: this package, the
    model's readers (GGUF blocks, the un-permuted Q/K rows) and the kernels' Python face (kind codes). A
    loader fix outside compile/ used to leave plans packed by the old code in use."""
    package = Path(__file__).parent.parent
    return sorted(p for folder in ("compile", "model", "kernels") for p in (package / folder).glob("*.py"))


_SAVED_KEYS = frozenset({"version", "decode_mode", "invariance", "step_ms", "prompt_row_ms", "step_ms_far", "matrices"})


def read_plan_cache(path: Path, say: Callable[[str], None]) -> dict | None:
    """The saved plan at `path`, or None (absent, damaged or of another version: compile afresh)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, mmap=True)  # pages come in as the decoder first reads them
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        say(f"ignoring an unreadable cached plan {path}: {exc}")
        return None
    if not isinstance(saved, dict) or saved.get("version") != PLAN_CACHE_VERSION:
        return None
    if not _SAVED_KEYS <= saved.keys():  # a file of this version missing a part (written by hand, or damaged)
        say(f"ignoring an incomplete cached plan {path}: it lacks {', '.join(sorted(_SAVED_KEYS - saved.keys()))}")
        return None
    with contextlib.suppress(OSError):  # used now: the last to go (a read-only cache keeps its times)
        os.utime(path)
    return saved


def write_plan_cache(
    say: Callable[[str], None],
    path: Path,
    decode_mode: str,
    invariance: str,
    step_ms: dict[int, float],
    prompt_row_ms: tuple[float, float, float],  # beside decode rows, alone, beside deep into the prompt
    step_ms_far: dict[int, float],
    matrices: list[list] | None,
) -> str | None:
    """Atomically (write, then rename): a concurrent reader sees the old file or the new one. A cache that
    cannot be written (read-only, full) is skipped, and the sentence returned is the plan's warning (the
    plan is ready; it was a traceback after the whole compile, then a line only a spinner showed)."""
    saved = {
        "version": PLAN_CACHE_VERSION,
        "decode_mode": decode_mode,
        "invariance": invariance,
        "step_ms": step_ms,
        "prompt_row_ms": prompt_row_ms,
        "step_ms_far": step_ms_far,
        "matrices": matrices,
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):  # a folder that is a file, or a read-only one, holds no tmp
            tmp.unlink(missing_ok=True)
        return f"could not save the plan in the plan cache {path.parent} ({exc}{_free_space(path.parent)}); the next start compiles it again"
    try:
        removed = prune_plan_cache(path.parent, keep=path, budget=PLAN_CACHE_BYTES)
    except OSError as exc:
        return f"could not remove old plans from the plan cache {path.parent} ({exc})"
    if removed:
        say(
            f"removed {len(removed)} least recently used plan(s) from the plan cache (over {PLAN_CACHE_BYTES >> 30} GiB)"
        )
    return None


def _free_space(folder: Path) -> str:
    """'; N MB free there' when the disk is the likely cause: torch.save says a full disk as 'unexpected
    pos 31344768 vs 31344656'."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; {free / 1e6:.0f} MB free there, the plan needs more" if free < 2 << 30 else ""


def prune_plan_cache(root: Path, keep: Path, budget: int = PLAN_CACHE_BYTES) -> list[Path]:
    """Remove the least recently used plans in `root` (by modification time: a read touches it) past `budget`
    bytes in all, never `keep` (the plan just written); return what was removed. A plan another process
    removes first is skipped. Temporary files that killed writes left (as large as a plan, never read) go too."""
    remove_stale_partials(root.glob("*.tmp"))
    plans = []
    for p in root.glob("*.pt"):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            plans.append((st.st_mtime, st.st_size, p))
    plans.sort(key=lambda t: (t[2] != keep, -t[0]))  # the kept plan first, then the most recent
    removed, total = [], 0
    for _mtime, size, p in plans:
        total += size
        if total > budget and p != keep:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
