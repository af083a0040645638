"""Compile and load the C++ kernels (csrc/).

`load_module()` compiles every csrc/*.cpp on first use (gcc, `-O3 -march=native`, IEEE math: no
-ffast-math, no FMA contraction) into ~/.cache/metronome/kernels-<hash>/ (override the parent with
METRONOME_CACHE_DIR), keyed by every file in csrc/ (sources and headers), the torch and Python versions
and the CPU's flags, then loads it. Needs an x86-64 CPU with AVX-512, or AVX2 with FMA (csrc/avx2.h),
and the `ninja` package.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from metronome.config import cache_root
from metronome.kernels import blocks

__all__ = [
    "CFLAGS",
    "compile_flags",
    "KernelBuildError",
    "LDFLAGS",
    "SOURCE_DIR",
    "build_directory",
    "instruction_set",
    "load_module",
    "source_files",
]

SOURCE_DIR = Path(__file__).parent / "csrc"
# No OpenMP: the kernels run their parallel loops on their own thread pool (csrc/pool.h).
# -Wno-psabi: GCC notes that 512-bit values change the calling convention; they never cross this module.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-Wno-psabi"]
LDFLAGS = ["-pthread"]
# as /proc/cpuinfo names them: the kernels' native instruction set, and the AVX2 one they also build for
AVX512_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"})
AVX2_CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
EXTENSION_NAME = "metronome_kernels"
BUILD_WAIT_S = 1800.0  # how long a process waits for another's build (one takes a few minutes)
BUILD_POLL_S = 0.5
BUILD_SAID_S = 2.0  # a wait longer than a load of the built module takes is said (ranks start together)


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded here (message says why: compiler output, missing tool, CPU)."""


def source_files() -> list[Path]:
    """Every file of csrc/ (sources and headers), sorted by name: what the build is keyed on."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.is_file() and p.suffix in (".cpp", ".h"))


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in /proc/cpuinfo, or None where there is none to read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    flags = _cpuinfo("flags")
    return flags if flags is not None else platform.processor()


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("AuthenticAMD", "GenuineIntel"), or "" where there is none to read."""
    return _cpuinfo("vendor_id") or ""


def compile_flags() -> list[str]:
    """CFLAGS, and what the sources are told about this machine beyond its instruction set: METRONOME_AMD,
    1 on an AMD CPU, where the kernels ask for their streams' bytes nearer ahead and in smaller bursts
    (csrc/simd.h). A constant, not a value read at run time: the same distance read from a variable ran the
    32-weight tiles 0.78-0.86x as fast (docs/performance.md, 2026-12-05)."""
    return [*CFLAGS, f"-DMETRONOME_AMD={int(_cpu_vendor() == 'AuthenticAMD')}"]


def build_directory() -> Path:
    """Where this source, torch, Python and CPU combination is built (created by load_module). Every csrc/
    file is part of the key (by name and content), and so is the torch install path: two environments
    sharing one cache would otherwise rebuild each other's build (the compile command names the include
    paths)."""
    key = hashlib.sha256()
    for path in source_files():
        key.update(path.name.encode())
        key.update(b"\0")
        key.update(path.read_bytes())
        key.update(b"\0")
    for part in (
        torch.__version__.encode(),
        str(Path(torch.__file__).parent).encode(),
        sys.version.encode(),
        platform.machine().encode(),
        _cpu_flags().encode(),
        " ".join(compile_flags() + LDFLAGS).encode(),
        os.environ.get("CXX", "c++").encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return cache_root() / f"kernels-{key.hexdigest()[:16]}"


_lock = threading.Lock()
_module: ModuleType | None = None


def instruction_set() -> str:
    """ "avx512" where the CPU has AVX-512 F/BW/VL/VNNI (the kernels' own instructions), "avx2" where it has
    AVX2, FMA and F16C (the same kernels on pairs of 256-bit registers, csrc/avx2.h). Raises
    KernelBuildError on any other CPU."""
    flags = set(_cpu_flags().split())
    capability = torch.backends.cpu.get_cpu_capability()
    if "sse2" not in flags:  # no x86 flags to read: trust torch's own dispatch level
        flags = set()
        if capability.startswith(("AVX512", "AMX")):
            flags |= AVX512_CPU_FLAGS
        if capability.startswith(("AVX2", "AVX512", "AMX")):
            flags |= AVX2_CPU_FLAGS
    if platform.machine().lower() in ("x86_64", "amd64"):
        if AVX512_CPU_FLAGS <= flags:
            return "avx512"
        if AVX2_CPU_FLAGS <= flags:
            return "avx2"
    raise KernelBuildError(
        f"metronome's C++ kernels need an x86-64 CPU with AVX-512 (F, BW, VL, VNNI) or AVX2 with FMA, and "
        f"F16C; this one is {platform.machine()} (torch capability {capability}, missing "
        f"{', '.join(sorted(AVX2_CPU_FLAGS - flags)) or 'nothing'}); use TorchOps"
    )


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold `directory`'s build to this process. torch's own lock is a file the building process removes
    when it ends, so a build killed midway (out of memory, `docker stop`) left it and every later process
    waited on it for ever, silently. Ours is an flock, which the kernel drops with the process that held
    it: whoever holds it knows a torch lock file in the directory is such a leftover and removes it. A
    live build is said once and waited for, up to BUILD_WAIT_S."""
    with open(directory / "build.flock", "a") as fh:
        started = time.monotonic()
        deadline, said = started + BUILD_WAIT_S, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KernelBuildError(
                        f"another process has been building the C++ kernels in {directory} for over "
                        f"{BUILD_WAIT_S / 60:.0f} min; stop it, or remove that directory"
                    ) from None
                if not said and time.monotonic() - started > BUILD_SAID_S:  # not a mere load beside ours
                    print(
                        f"metronome: waiting for another process's build of the C++ kernels ({directory})",
                        file=sys.stderr,
                    )
                    said = True
                time.sleep(BUILD_POLL_S)
        try:
            left = directory / "lock"
            if left.exists():
                print(f"metronome: removing {left}, left by a kernel build that was killed", file=sys.stderr)
                left.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _writable(directory: Path) -> bool:
    """Whether this process may write in `directory` (tried: root passes os.access on a read-only mount)."""
    try:
        with open(directory / "build.flock", "a"):
            return True
    except OSError:
        return False


def _stable_sources(directory: Path) -> list[Path]:
    """csrc/ copied into the build directory (once: a file is rewritten only when its bytes differ), the
    paths the build names. ninja rebuilds when a command or a source's time changes, and the directory is
    keyed by the sources' bytes, not their place: two checkouts of the same code (a helper's clone, a
    reinstalled wheel, whose files are new) rebuilt the same directory in turn, a minute or more each time,
    and one process's build could run under another's load."""
    copies = directory / "src"
    copies.mkdir(exist_ok=True)
    out = []
    for path in source_files():
        copy, data = copies / path.name, path.read_bytes()
        if not copy.is_file() or copy.read_bytes() != data:
            tmp = copy.with_suffix(copy.suffix + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, copy)
        out.append(copy)
    return out


def _load_built(path: Path) -> ModuleType:
    """The extension module already built at `path`, imported without building."""
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_module(verbose: bool = False) -> ModuleType:
    """Build (once per machine and source version) and load the C++ extension module.

    Raises KernelBuildError when this machine cannot build or run it: not x86-64 with AVX-512 or AVX2, no
    `ninja` (pip install ninja), or a compiler error (its output is in the message)."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        instruction_set()  # raises on a CPU the kernels cannot run on
        from torch.utils import cpp_extension

        sources = [p for p in source_files() if p.suffix == ".cpp"]
        if not sources:
            raise KernelBuildError(f"{SOURCE_DIR} has no C++ sources: this metronome install lacks its package data")
        directory = build_directory()
        built = directory / f"{EXTENSION_NAME}.so"
        try:
            if built.is_file() and not _writable(directory):
                # a prebuilt cache on a read-only file system (a container image's): its directory's key names
                # these sources, so the module is loaded as it is (torch's loader rewrites build.ninja first,
                # and the lock needs a file: both failed, and the plan fell back to torch's ops)
                module = _load_built(built)
            else:
                if not cpp_extension.is_ninja_available():
                    raise KernelBuildError("building metronome's C++ kernels needs ninja: pip install ninja")
                directory.mkdir(parents=True, exist_ok=True)
                with _build_lock(directory):
                    module = cpp_extension.load(
                        name=EXTENSION_NAME,
                        sources=[str(p) for p in _stable_sources(directory) if p.suffix == ".cpp"],
                        # a copy: torch appends its own flags to the list in place, which changed
                        # build_directory()'s key in the process that built (and the plan cache's keys with it)
                        extra_cflags=compile_flags(),
                        extra_ldflags=list(LDFLAGS),
                        build_directory=str(directory),
                        verbose=verbose,
                    )
        except (RuntimeError, OSError, ImportError) as e:
            raise KernelBuildError(f"could not build/load {SOURCE_DIR} in {directory}: {e}") from e
        try:
            blocks.check_exports(module)
        except (AttributeError, ValueError) as e:
            raise KernelBuildError(f"{directory}: {e}") from e
        _module = module
        return _module
