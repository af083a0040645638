"""The plan cache keeps the plans last used within its byte budget (nothing was ever removed: 53 plans, 8.4 GB)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from metronome.compile.cache import prune_plan_cache, read_plan_cache, write_plan_cache


def _plan(root: Path, name: str, size: int, mtime: float) -> Path:
    p = root / f"{name}.pt"
    p.write_bytes(b"x" * size)
    os.utime(p, (mtime, mtime))
    return p


def test_the_least_recently_used_plans_past_the_budget_go(tmp_path):
    old, mid, new = (_plan(tmp_path, n, 400, t) for n, t in (("old", 1_000), ("mid", 2_000), ("new", 3_000)))
    other = tmp_path / "notes.txt"
    other.write_text("not a plan")
    assert prune_plan_cache(tmp_path, keep=new, budget=1_000) == [old]  # new + mid fit, old does not
    assert new.exists() and mid.exists() and not old.exists() and other.exists()
    # the plan just written is kept even when it alone is over the budget, and the rest go
    assert sorted(prune_plan_cache(tmp_path, keep=mid, budget=100)) == [new]
    assert mid.exists()


def test_a_read_plan_is_used_now_and_a_written_one_prunes_the_rest(tmp_path, monkeypatch):
    said: list[str] = []
    steps = {1: 5.0}
    write_plan_cache(said.append, tmp_path / "a.pt", "compact", "ok", steps, (1.0, 1.0, 1.0), steps, None)
    first = tmp_path / "a.pt"
    os.utime(first, (1_000, 1_000))
    assert read_plan_cache(first, said.append) is not None
    assert first.stat().st_mtime > 1_000  # touched: the last to go
    stale = _plan(tmp_path, "stale", 10, 500)
    monkeypatch.setattr("metronome.compile.cache.PLAN_CACHE_BYTES", first.stat().st_size * 2 + 5)
    write_plan_cache(said.append, tmp_path / "b.pt", "compact", "ok", steps, (1.0, 1.0, 1.0), steps, None)
    assert not stale.exists() and first.exists() and (tmp_path / "b.pt").exists()
    assert any("removed 1 least recently used plan" in s for s in said), said


def test_one_variable_moves_every_cache(tmp_path, monkeypatch):
    """METRONOME_CACHE_DIR moved the kernels and digests only: plans (GBs) and assembled models stayed in
    ~/.cache/metronome, so a user moving the cache off a small home disk still filled it."""
    from metronome.audio import transcribe
    from metronome.compile.cache import plan_cache_root
    from metronome.model import registry

    monkeypatch.delenv("METRONOME_PLAN_CACHE", raising=False)
    monkeypatch.delenv("METRONOME_MODEL_CACHE", raising=False)
    monkeypatch.setenv("METRONOME_CACHE_DIR", str(tmp_path))
    assert plan_cache_root() == tmp_path / "plans"
    assert registry.cache_dir() == tmp_path / "models"
    seen: list[Path] = []
    monkeypatch.setattr(transcribe, "_base_model_dir", lambda cache: seen.append(cache) or cache)
    transcribe.resolve_model_dir("base")
    assert seen == [tmp_path]
    # the specific variables still win
    monkeypatch.setenv("METRONOME_PLAN_CACHE", str(tmp_path / "p"))
    monkeypatch.setenv("METRONOME_MODEL_CACHE", str(tmp_path / "m"))
    assert (plan_cache_root(), registry.cache_dir()) == (tmp_path / "p", tmp_path / "m")


def test_a_killed_writes_temporary_file_goes_once_stale(tmp_path):
    """A write killed midway left <key>.<pid>.tmp, as large as a plan, which nothing read or removed (and
    the 4 GiB budget did not count). One an hour old goes; a fresh one may be another process's write."""
    import time

    from metronome.config import STALE_PARTIAL_S

    keep = _plan(tmp_path, "new", 10, time.time())
    stale, fresh = tmp_path / "a.123.tmp", tmp_path / "b.456.tmp"
    for p, age in ((stale, STALE_PARTIAL_S + 60), (fresh, 5)):
        p.write_bytes(b"partial")
        os.utime(p, (time.time() - age, time.time() - age))
    prune_plan_cache(tmp_path, keep=keep, budget=1 << 20)
    assert not stale.exists() and fresh.exists() and keep.exists()


def test_the_key_covers_what_changes_a_plan_and_not_the_prefix_pool(tmp_path, monkeypatch):
    """Each part of the key, dropped, would read back a plan packed or timed for something else: another
    weight format or thread count, another machine's calibration, the packing code before a fix. The
    prefix cache's pool is allocated, not calibrated: its size must not cost a recompile."""
    import dataclasses
    from types import SimpleNamespace

    from metronome.compile import cache
    from metronome.config import EngineConfig
    from metronome.kernels.ops import TorchOps

    loaded = SimpleNamespace(fingerprint=lambda: "file-digest")
    config = EngineConfig(slots=2, ctx=128)

    def key(**change) -> Path:
        args = {"config": config, "weights": "int8", "threads": 2} | change
        return cache.plan_cache_path(loaded, args["config"], args["weights"], TorchOps(), args["threads"])

    base = key()
    assert key() == base
    assert key(config=dataclasses.replace(config, prefix_cache_tokens=1024)) == base
    assert key(threads=3) != base and key(weights="int4") != base
    assert key(config=dataclasses.replace(config, slots=4)) != base
    monkeypatch.setattr(cache.platform, "node", lambda: "another-machine")
    assert key() != base
    monkeypatch.undo()
    code = tmp_path / "packing.py"
    code.write_text("# v1")
    monkeypatch.setattr(cache, "_code_files", lambda: [code])
    before = key()
    code.write_text("# v2: a packing fix")
    assert key() != before


def test_a_plan_of_another_version_is_not_read_back(tmp_path):
    import torch

    from metronome.compile.cache import _SAVED_KEYS, PLAN_CACHE_VERSION

    path = tmp_path / "old.pt"
    torch.save({k: None for k in _SAVED_KEYS} | {"version": PLAN_CACHE_VERSION - 1}, path)
    assert read_plan_cache(path, lambda _m: None) is None
    torch.save({k: None for k in _SAVED_KEYS} | {"version": PLAN_CACHE_VERSION}, path)
    assert read_plan_cache(path, lambda _m: None) is not None


def test_plans_exactly_at_the_budget_stay(tmp_path):
    a, b = _plan(tmp_path, "a", 400, 1_000), _plan(tmp_path, "b", 400, 2_000)
    assert prune_plan_cache(tmp_path, keep=b, budget=800) == [] and a.exists()


def test_the_key_covers_the_model_file_torch_and_the_kernel_build(monkeypatch):
    """Another model file (its fingerprint), another torch or another kernel build reads back another plan."""
    from types import SimpleNamespace

    from metronome.compile import cache
    from metronome.config import EngineConfig
    from metronome.kernels.ops import CppOps, TorchOps

    config = EngineConfig(slots=2, ctx=128)

    def key(fingerprint: str = "file-digest", ops=None) -> Path:
        loaded = SimpleNamespace(fingerprint=lambda: fingerprint)
        return cache.plan_cache_path(loaded, config, "int8", ops or TorchOps(), 2)

    base = key()
    assert key("another-file") != base
    monkeypatch.setattr(cache.torch, "__version__", "0.0.1-other")
    assert key() != base
    monkeypatch.undo()
    cpp = object.__new__(CppOps)  # no kernels loaded: only its type matters to the key
    monkeypatch.setattr(cache, "build_directory", lambda: Path("/kernels/kernels-aaaa"))
    built_a = key(ops=cpp)
    monkeypatch.setattr(cache, "build_directory", lambda: Path("/kernels/kernels-bbbb"))
    assert built_a != key(ops=cpp) and built_a != base


def test_a_write_that_fails_leaves_no_temporary_file_and_says_the_free_space(tmp_path, monkeypatch):
    """A full disk (torch.save's RuntimeError after part of the file) leaves neither a plan nor its
    temporary file, and the warning says how much space is free; a write that succeeds leaves the plan only."""
    from metronome.compile import cache

    steps = {1: 5.0}
    assert (
        cache.write_plan_cache(lambda _m: None, tmp_path / "a.pt", "compact", "ok", steps, (1.0,) * 3, steps, None)
        is None
    )
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]

    def full_disk(obj, f):
        Path(f).write_bytes(b"part of a plan")
        raise RuntimeError("unexpected pos 31344768 vs 31344656")

    monkeypatch.setattr(cache.torch, "save", full_disk)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: SimpleNamespace(free=5_000_000))
    said = cache.write_plan_cache(lambda _m: None, tmp_path / "b.pt", "compact", "ok", steps, (1.0,) * 3, steps, None)
    assert "could not save the plan" in said and "5 MB free there" in said
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_each_process_writes_its_own_temporary_file(tmp_path, monkeypatch):
    """Two processes writing the same plan at once must not write into one temporary file."""
    from metronome.compile import cache

    written: list[str] = []
    monkeypatch.setattr(cache.torch, "save", lambda obj, f: written.append(Path(f).name) or Path(f).write_bytes(b"x"))
    steps = {1: 5.0}
    for pid in (111, 222):
        monkeypatch.setattr(cache.os, "getpid", lambda pid=pid: pid)
        cache.write_plan_cache(lambda _m: None, tmp_path / "a.pt", "compact", "ok", steps, (1.0,) * 3, steps, None)
    assert len(set(written)) == 2


def test_a_prune_that_fails_is_a_warning(tmp_path, monkeypatch):
    from metronome.compile import cache

    def denied(*_a, **_k):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(cache, "prune_plan_cache", denied)
    steps = {1: 5.0}
    said = cache.write_plan_cache(lambda _m: None, tmp_path / "a.pt", "compact", "ok", steps, (1.0,) * 3, steps, None)
    assert said.startswith("could not remove old plans") and (tmp_path / "a.pt").exists()


def test_the_kept_plan_counts_first_against_the_budget(tmp_path):
    """The plan just written is counted first even when others are more recent: what fits after it stays,
    the rest goes, and the total left is within the budget."""
    old, mid, new = (_plan(tmp_path, n, 400, t) for n, t in (("old", 1_000), ("mid", 2_000), ("new", 3_000)))
    assert prune_plan_cache(tmp_path, keep=old, budget=1_000) == [mid]
    assert old.exists() and new.exists()


def test_a_plan_removed_by_another_process_meanwhile_is_skipped(tmp_path, monkeypatch):
    keep = _plan(tmp_path, "keep", 10, 2_000)
    _plan(tmp_path, "gone", 10, 1_000)
    stat = Path.stat

    def vanishing(self, *a, **k):
        if self.name == "gone.pt":
            raise FileNotFoundError(self)
        return stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", vanishing)
    assert prune_plan_cache(tmp_path, keep=keep, budget=1) == []
