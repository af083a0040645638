"""Fused decode-step kernels: a pure-torch reference (`TorchOps`, the default) and a C++ build (`CppOps`).

Both expose the same methods with the same meaning. Every op is row-independent: each output row (or
(row, head) of attention, or output column of the Q8_0 head) is computed by one fixed code path with a
reduction order that depends only on that row's own shape, so a row's result is bitwise the same
whatever else shares the batch (the determinism contract). All math is float32; results are rounded
once to the output dtype.

`load_kernels()` compiles `csrc/kernels.cpp` on first use (gcc, `-O3 -march=native`, IEEE math: no
-ffast-math, no FMA contraction) into ~/.cache/metronome/kernels-<hash>/ (override the parent with
METRONOME_CACHE_DIR), keyed by the source, torch and Python versions and the CPU's flags, then loads it.
Needs an x86-64 CPU with AVX-512 and the `ninja` package.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CppOps", "KernelBuildError", "Ops", "StaticOps", "TorchOps", "dequantize_q8_0", "load_kernels"]

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
# No OpenMP: the kernels run their parallel loops on their own thread pool (see Pool in kernels.cpp).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-pthread"]
LDFLAGS = ["-pthread"]
REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"})  # as /proc/cpuinfo names them
Q8_0_BLOCK, Q8_0_BYTES = 32, 34  # weights per block, bytes per block (fp16 scale + 32 int8)


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded here (message says why: compiler output, missing tool, CPU)."""


class Ops(Protocol):
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor: ...
    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]: ...
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor: ...
    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor,
                         window: int, scale: float) -> Tensor: ...
    def silu_mul(self, gate_up: Tensor) -> Tensor: ...
    def gelu_tanh_mul(self, gate_up: Tensor) -> Tensor: ...
    def q8_0_linear(self, x: Tensor, blocks: Tensor) -> Tensor: ...


def dequantize_q8_0(blocks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K/32*34) uint8 GGUF Q8_0 rows -> (N, K) weights w = d * q (exact in float32 and float64)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % Q8_0_BYTES:
        raise ValueError(f"Q8_0 blocks must be a 2-D uint8 tensor with a multiple of {Q8_0_BYTES} bytes per row, "
                         f"got {tuple(blocks.shape)} {blocks.dtype}")
    n, nb = blocks.shape[0], blocks.shape[1] // Q8_0_BYTES
    b = blocks.reshape(n, nb, Q8_0_BYTES)
    d = b[..., :2].contiguous().view(torch.float16).to(dtype)  # (N, nb, 1)
    q = b[..., 2:].contiguous().view(torch.int8).to(dtype)  # (N, nb, 32)
    return (q * d).reshape(n, nb * Q8_0_BLOCK)


@dataclass(frozen=True)
class TorchOps:
    """The reference: plain torch ops, float32 math, one rounding to the output dtype."""

    name: str = "torch"

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """(..., D) bf16/f32 x, (D,) weight -> x * rsqrt(mean(x^2) + eps) * weight, in x's dtype."""
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """Returns (rms_norm(x + residual), x + residual), the sum rounded to x's dtype before the norm."""
        new_residual = x + residual
        return self.rms_norm(new_residual, weight, eps), new_residual

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, H, Dh), cos/sin (B, T, Dh) in the [c, c] layout -> x*cos + rotate_half(x)*sin."""
        xf = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos.float()[:, :, None] + rotated * sin.float()[:, :, None]).to(x.dtype)

    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor,
                         window: int, scale: float) -> Tensor:
        """q (B, H, Dh); caches (S, Hkv, C, Dh); row b attends over positions [first, ends[b]) of slot
        slots[b], first = max(0, ends[b] - window) if window > 0 else 0. Empty spans give zeros."""
        out = torch.zeros_like(q)
        for b, (slot, end) in enumerate(zip(slots.tolist(), ends.tolist())):
            first = max(0, end - window) if window > 0 else 0
            if end <= first:
                continue
            keys = k_cache[slot: slot + 1, :, first:end].to(q.dtype)  # (1, Hkv, L, Dh)
            values = v_cache[slot: slot + 1, :, first:end].to(q.dtype)
            out[b] = F.scaled_dot_product_attention(q[b: b + 1, :, None], keys, values, scale=scale,
                                                    enable_gqa=True)[0, :, 0]
        return out

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """(..., 2F) [gate, up] -> silu(gate) * up, (..., F)."""
        g = gate_up.float()
        f = g.shape[-1] // 2
        return (F.silu(g[..., :f]) * g[..., f:]).to(gate_up.dtype)

    def gelu_tanh_mul(self, gate_up: Tensor) -> Tensor:
        """(..., 2F) [gate, up] -> gelu(gate, approximate="tanh") * up, (..., F)."""
        g = gate_up.float()
        f = g.shape[-1] // 2
        return (F.gelu(g[..., :f], approximate="tanh") * g[..., f:]).to(gate_up.dtype)

    def q8_0_linear(self, x: Tensor, blocks: Tensor) -> Tensor:
        """x (M, K) bf16/f32, blocks (N, K/32*34) uint8 Q8_0 -> x @ dequant(blocks).T, (M, N) float32.
        Dequantizes on every call: a reference, not a fast path."""
        return x.float() @ dequantize_q8_0(blocks).T


@dataclass(frozen=True)
class StaticOps(TorchOps):
    """TorchOps with a decode attention that has no host round-trip and fixed shapes, so that a decode
    step can be captured as a CUDA graph: every row attends over its slot's whole cache with a mask
    (positions [first, end)), where TorchOps slices each row's span on the host."""

    name: str = "torch-static"

    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor,
                         window: int, scale: float) -> Tensor:
        C = k_cache.shape[2]
        pos = torch.arange(C, device=q.device)[None, :]  # (1, C)
        mask = pos < ends[:, None]  # (B, C)
        if window > 0:
            mask &= pos >= (ends[:, None] - window)
        keys = k_cache.index_select(0, slots).to(q.dtype)  # (B, Hkv, C, Dh)
        values = v_cache.index_select(0, slots).to(q.dtype)
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None, :], scale=scale,
                                             enable_gqa=True)[:, :, 0]  # (B, H, Dh)
        return torch.where((ends > 0)[:, None, None], out, torch.zeros_like(out))  # an empty span gives zeros


class CppOps:
    """The compiled kernels (see csrc/kernels.cpp); same methods and meaning as TorchOps."""

    name = "cpp"

    def __init__(self, module: ModuleType) -> None:
        self._m = module

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self._m.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return self._m.add_rms_norm(x, residual, weight, eps)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return self._m.rope(x, cos, sin)

    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor,
                         window: int, scale: float) -> Tensor:
        return self._m.decode_attention(q, k_cache, v_cache, slots, ends, window, scale)

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return self._m.silu_mul(gate_up)

    def gelu_tanh_mul(self, gate_up: Tensor) -> Tensor:
        return self._m.gelu_tanh_mul(gate_up)

    def q8_0_linear(self, x: Tensor, blocks: Tensor) -> Tensor:
        return self._m.block_linear(x, blocks, 0, blocks.shape[0], None)  # kind 0: Q8_0 rows

    def set_threads(self, n: int) -> None:
        """Threads of the kernels' own pool (shared by every plan in this process)."""
        self._m.set_threads(n)

    # The fused decoder's pieces (C++ only; see plan.FusedModel).

    def block_linear(self, x: Tensor, blocks: Tensor, kind: int, rows: int, bias: Tensor | None = None) -> Tensor:
        """x (M, K) -> (M, rows) float32, W as Q8_0 rows (kind 0) or packed Q4 groups (kind 1, quant.pack_q4)."""
        return self._m.block_linear(x, blocks, kind, rows, bias)

    def decoder(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
                scale: float, gelu: bool, k_cache: Tensor, v_cache: Tensor):
        """A C++ Decoder over these caches: add_layer(...) once per layer, then forward(...) per step."""
        return self._m.Decoder(hidden, heads, kv_heads, head_dim, intermediate, eps, scale, gelu, k_cache, v_cache)


_lock = threading.Lock()
_loaded: CppOps | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_directory() -> Path:
    """Where this source, torch, Python and CPU combination is built (created by load_kernels). The torch
    install path is part of the key: two environments sharing one cache would otherwise rebuild each
    other's build (the compile command names the include paths)."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), str(Path(torch.__file__).parent).encode(),
                 sys.version.encode(), platform.machine().encode(),
                 _cpu_flags().encode(), " ".join(CFLAGS + LDFLAGS).encode(), os.environ.get("CXX", "c++").encode()):
        key.update(part)
        key.update(b"\0")
    root = Path(os.environ.get("METRONOME_CACHE_DIR") or Path.home() / ".cache" / "metronome")
    return root / f"kernels-{key.hexdigest()[:16]}"


def load_kernels(verbose: bool = False) -> CppOps:
    """Build (once per machine and source version) and load the C++ kernels.

    Raises KernelBuildError when this machine cannot build or run them: not x86-64 with AVX-512, no
    `ninja` (pip install ninja), or a compiler error (its output is in the message)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        flags = set(_cpu_flags().split())
        capability = torch.backends.cpu.get_cpu_capability()
        if "sse2" in flags:  # x86 flags from /proc/cpuinfo
            missing = sorted(REQUIRED_CPU_FLAGS - flags)
        else:  # no flags to read: trust torch's own dispatch level
            missing = [] if capability.startswith(("AVX512", "AMX")) else ["avx512"]
        if platform.machine().lower() not in ("x86_64", "amd64") or missing:
            raise KernelBuildError(f"metronome's C++ kernels need an x86-64 CPU with AVX-512 (F, BW, VL, VNNI) and F16C; "
                                   f"this one is {platform.machine()} (torch capability {capability}, missing "
                                   f"{', '.join(missing) or 'nothing'}); use TorchOps")
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            raise KernelBuildError("building metronome's C++ kernels needs ninja: pip install ninja")
        if not SOURCE.is_file():
            raise KernelBuildError(f"{SOURCE} is missing: this metronome install lacks its C++ source (package data)")
        directory = build_directory()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(name="metronome_kernels", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                                        extra_ldflags=LDFLAGS, build_directory=str(directory), verbose=verbose)
        except (RuntimeError, OSError, ImportError) as e:
            raise KernelBuildError(f"could not build/load {SOURCE} in {directory}: {e}") from e
        _loaded = CppOps(module)
        return _loaded
