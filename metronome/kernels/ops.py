"""Fused decode-step kernels: a pure-torch reference (`TorchOps`, the default) and a C++ build (`CppOps`).

Both expose the same methods with the same meaning. Every op is row-independent: each output row (or
(row, head) of attention, or output column of the Q8_0 head) is computed by one fixed code path with a
reduction order that depends only on that row's own shape, so a row's result is bitwise the same
whatever else shares the batch (the determinism contract). All math is float32; results are rounded
once to the output dtype.

`load_kernels()` builds and loads the C++ extension (build.py: compiled from csrc/ on first use, cached
per source, torch, Python and CPU) and wraps it in `CppOps`. Needs an x86-64 CPU with AVX-512, or AVX2
with FMA (csrc/avx2.h), and the `ninja` package; elsewhere it raises KernelBuildError and TorchOps is the
way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metronome.kernels.blocks import BLOCK_WEIGHTS, Q8_0_BYTES, Q8_0_KIND
from metronome.kernels.build import CFLAGS, KernelBuildError, build_directory, load_module
from metronome.kernels.decoder import BlockPart, LayerWeights

__all__ = [
    "CFLAGS",
    "CppOps",
    "GGUF_ROW_TYPES",
    "KernelBuildError",
    "LayerWeights",
    "Ops",
    "StaticOps",
    "TorchOps",
    "build_directory",
    "dequantize_kv_int8",
    "dequantize_q8_0",
    "kv_int8_row_bytes",
    "load_kernels",
    "quantize_kv_int8",
]

# The GGUF block types whose rows CppOps.gguf_rows dequantizes (an embedding lookup), by GGUF's type codes.
GGUF_ROW_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}

Q8_0_BLOCK = BLOCK_WEIGHTS["Q8_0"]  # weights per Q8_0 block (Q8_0_BYTES bytes: fp16 scale + 32 int8)


# Tokens drawn from rows of CPU logits in one call, CppOps.sample_rows's signature: (logits, rows, vocab,
# inv_temp, top_k, top_p, min_p, u) -> a token per row, -1 where the row has nothing to draw.
DrawRows = Callable[[Tensor, Tensor, int, Tensor, Tensor, Tensor, Tensor, Tensor], list[int]]


class Ops(Protocol):
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor: ...
    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]: ...
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor: ...
    def decode_attention(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor, window: int, scale: float
    ) -> Tensor: ...
    def silu_mul(self, gate_up: Tensor) -> Tensor: ...
    def gelu_tanh_mul(self, gate_up: Tensor) -> Tensor: ...
    def q8_0_linear(self, x: Tensor, blocks: Tensor) -> Tensor: ...


def dequantize_q8_0(blocks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K/32*34) uint8 GGUF Q8_0 rows -> (N, K) weights w = d * q (exact in float32 and float64)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % Q8_0_BYTES:
        raise ValueError(
            f"Q8_0 blocks must be a 2-D uint8 tensor with a multiple of {Q8_0_BYTES} bytes per row, "
            f"got {tuple(blocks.shape)} {blocks.dtype}"
        )
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

    def decode_attention(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor, window: int, scale: float
    ) -> Tensor:
        """q (B, H, Dh); caches (S, Hkv, C, Dh); row b attends over positions [first, ends[b]) of slot
        slots[b], first = max(0, ends[b] - window) if window > 0 else 0. Empty spans give zeros."""
        out = torch.zeros_like(q)
        for b, (slot, end) in enumerate(zip(slots.tolist(), ends.tolist())):
            first = max(0, end - window) if window > 0 else 0
            if end <= first:
                continue
            group = q.shape[1] // k_cache.shape[1]  # query heads per KV head
            keys = k_cache[slot, :, first:end].to(q.dtype).repeat_interleave(group, dim=0)  # (H, L, Dh)
            values = v_cache[slot, :, first:end].to(q.dtype).repeat_interleave(group, dim=0)
            # Written out, not scaled_dot_product_attention: its one-query kernel splits the keys among
            # threads, so its bits change with the thread count (tensor-parallel ranks run one thread each).
            weights = torch.softmax((q[b, :, None].float() @ keys.float().transpose(1, 2)) * scale, dim=-1)
            out[b] = (weights @ values.float())[:, 0].to(q.dtype)
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


KV_INT8_GROUP = 16  # an int8 KV cache row: head_dim int8 values, then a float32 scale for each 16 of them


def kv_int8_row_bytes(head_dim: int) -> int:
    """Bytes of one int8 KV cache row: the values, then one float32 scale for each KV_INT8_GROUP."""
    return head_dim + head_dim // KV_INT8_GROUP * 4


def quantize_kv_int8(x: Tensor) -> Tensor:
    """(..., Dh) float keys or values -> (..., Dh * 5/4) int8 rows, as the C++ kernels write an int8 KV cache
    (csrc/simd.h): per 16 values, q = round(x * (127 / max|x|)) to nearest even and d = max|x| / 127, the
    scales' float32 bytes after the values."""
    x = x.float()
    g = x.unflatten(-1, (-1, KV_INT8_GROUP))  # (..., Dh/16, 16)
    amax = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(g * inv).clamp(-128, 127).to(torch.int8).flatten(-2)
    d = (amax / 127.0).contiguous().view(torch.int8).flatten(-2)  # (..., Dh/16 * 4): the scales' bytes
    return torch.cat([q, d], dim=-1)


def dequantize_kv_int8(rows: Tensor) -> Tensor:
    """(..., Dh * 5/4) int8 KV rows -> (..., Dh) float32 values d * q (exact)."""
    dh = rows.shape[-1] * 4 // 5
    if rows.dtype != torch.int8 or dh % KV_INT8_GROUP or kv_int8_row_bytes(dh) != rows.shape[-1]:
        raise ValueError(
            f"int8 KV rows must be int8 with head_dim * 5/4 bytes a row (head_dim a multiple of {KV_INT8_GROUP}), "
            f"got {tuple(rows.shape)} {rows.dtype}"
        )
    q = rows[..., :dh].float().unflatten(-1, (-1, KV_INT8_GROUP))
    d = rows[..., dh:].contiguous().view(torch.float32)[..., None]  # (..., Dh/16, 1)
    return (q * d).flatten(-2)


@dataclass(frozen=True)
class StaticOps(TorchOps):
    """TorchOps with a decode attention that has no host round-trip and fixed shapes, so that a decode
    step can be captured as a CUDA graph: every row attends over its slot's whole cache with a mask
    (positions [first, end)), where TorchOps slices each row's span on the host."""

    name: str = "torch-static"

    def decode_attention(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor, window: int, scale: float
    ) -> Tensor:
        C = k_cache.shape[2]
        pos = torch.arange(C, device=q.device)[None, :]  # (1, C)
        mask = pos < ends[:, None]  # (B, C)
        if window > 0:
            mask &= pos >= (ends[:, None] - window)
        keys = k_cache.index_select(0, slots).to(q.dtype)  # (B, Hkv, C, Dh)
        values = v_cache.index_select(0, slots).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
        )[:, :, 0]  # (B, H, Dh)
        return torch.where((ends > 0)[:, None, None], out, torch.zeros_like(out))  # an empty span gives zeros


class CppOps:
    """The compiled kernels (csrc/, built by build.py); same methods and meaning as TorchOps."""

    name = "cpp"

    def __init__(self, module: ModuleType) -> None:
        self._m = module
        # Where the build has AMX, ask Linux for the tile state and try one multiply now, on this thread,
        # rather than inside the first prompt's matmul on a pool thread (csrc/blocks.cpp, request_amx).
        module.amx_in_use()

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self._m.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return self._m.add_rms_norm(x, residual, weight, eps)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return self._m.rope(x, cos, sin)

    def decode_attention(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ends: Tensor, window: int, scale: float
    ) -> Tensor:
        return self._m.decode_attention(q, k_cache, v_cache, slots, ends, window, scale)

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return self._m.silu_mul(gate_up)

    def gelu_tanh_mul(self, gate_up: Tensor) -> Tensor:
        return self._m.gelu_tanh_mul(gate_up)

    def q8_0_linear(self, x: Tensor, blocks: Tensor) -> Tensor:
        return self._m.block_linear(x, blocks, Q8_0_KIND, blocks.shape[0], None)

    def set_threads(self, n: int) -> None:
        """Threads of the kernels' own pool (shared by every plan in this process)."""
        self._m.set_threads(n)

    def place_threads(self, cpus: Sequence[int]) -> None:
        """One thread of the kernels' own pool per CPU in `cpus` (distinct ones this thread may run on), each
        worker pinned to its own: worker i to cpus[i]. cpus[0] is for the thread that submits the work, which
        the pool does not pin (the engine pins its own thread there: `PlanReport.cpus`)."""
        self._m.place_threads(list(cpus))

    def thread_cpus(self) -> tuple[int, ...]:
        """The CPUs the pool's threads were placed on (`place_threads`), the submitter's first; () if unpinned."""
        return tuple(self._m.thread_cpus())

    def threads(self) -> int:
        """The size of the kernels' own pool (shared by every plan in this process)."""
        return self._m.get_threads()

    def set_amx(self, enabled: bool) -> bool:
        """Whether packed Q4_1/Q5_0/Q8_0/Q4_K matmuls run on AMX (Intel's tile unit), 16 rows of x at a time, for
        every plan in this process; returns whether AMX is in use (False where the CPU, the build or Linux lacks
        it). Both paths give the same bits: this is for tests and benchmarks, on by default."""
        return bool(self._m.set_amx(enabled))

    def amx(self) -> bool:
        """Whether packed Q4_1/Q5_0/Q8_0/Q4_K matmuls run on AMX, 16 rows of x at a time (see `set_amx`)."""
        return bool(self._m.amx_in_use())

    def hold_first_chunk(self, items: int, grain: int, timeout_ms: int) -> tuple[int, int, bool]:
        """The pool's test of taking over a held thread's work (csrc/pool.h): (items in the held chunk,
        items the other chunks did, whether the held chunk's wait timed out)."""
        held, others, timed_out = self._m.hold_first_chunk(items, grain, timeout_ms)
        return held, others, bool(timed_out)

    def throw_in_chunk(self, items: int, grain: int, at: int) -> tuple[bool, int, int]:
        """The pool's test of a chunk that throws (csrc/pool.h): (whether the job rethrew it to its caller,
        items in the chunk that threw, items the other chunks did)."""
        rethrown, thrower, others = self._m.throw_in_chunk(items, grain, at)
        return bool(rethrown), thrower, others

    def sample_rows(
        self,
        logits: Tensor,
        rows: Tensor,
        vocab: int,
        inv_temp: Tensor,
        top_k: Tensor,
        top_p: Tensor,
        min_p: Tensor,
        u: Tensor,
    ) -> list[int]:
        """The token drawn from each row `rows[i]` of logits (R, W) float32 (its first `vocab` entries): weights
        e^((x - max) * inv_temp[i]), top_k[i]'s cut (0: none), top_p[i]'s nucleus, then min_p[i]'s cut,
        inverted at u[i] in [0, 1) (csrc/sample.cpp has the arithmetic); -1 for a row with nothing to draw
        (all -inf, a NaN, a +inf). rows/top_k (n,) int64, inv_temp/top_p/min_p (n,) float32, u (n,) float64;
        rows run in parallel."""
        return self._m.sample_rows(logits, rows, vocab, inv_temp, top_k, top_p, min_p, u).tolist()

    # The fused decoder's pieces (C++ only; see plan.FusedModel).

    def block_linear(self, x: Tensor, blocks: Tensor, kind: int, rows: int, bias: Tensor | None = None) -> Tensor:
        """x (M, K) -> (M, rows) float32, W as blocks of one of kernels.blocks.BLOCK_KINDS (Q8_0 rows,
        16-row groups from quant.pack_16_rows, or a GGUF format's rows as stored)."""
        return self._m.block_linear(x, blocks, kind, rows, bias)

    def pack_x16(self, raw: Tensor, kind: int, rows: int, k: int) -> Tensor:
        """A GGUF Q5_0/Q4_K/Q6_K/Q8_0/Q4_0/Q4_1 matrix's rows (rows, bytes per row) uint8 -> packed kind `kind`
        (BLOCK_KINDS[PACKED_KINDS[qtype]]): (ceil(rows/16), K/weights*BLOCK_BYTES) uint8 (csrc/pack.cpp)."""
        return self._m.pack_x16(raw, kind, rows, k)

    def gguf_rows(self, table: Tensor, ids: Tensor, qtype: str) -> Tensor:
        """Rows `ids` (M,) int64 of a GGUF table (V, bytes per row) uint8 in `qtype` (one of GGUF_ROW_TYPES)
        -> (M, K) float32, bitwise the gguf package's dequantization."""
        if qtype not in GGUF_ROW_TYPES:
            raise ValueError(f"gguf_rows reads {sorted(GGUF_ROW_TYPES)} rows, got qtype={qtype!r}")
        return self._m.gguf_rows(table, ids, GGUF_ROW_TYPES[qtype])

    def host_exchange(self) -> Any:
        """A shared-memory exchange between the ranks of one host, not yet attached (csrc/exchange.h)."""
        return self._m.HostExchange()

    def decoder(
        self,
        *,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        eps: float,
        scale: float,
        gelu: bool,
        k_cache: Tensor,
        v_cache: Tensor,
    ):
        """A C++ Decoder over these caches: add_layer(...) once per layer (keyword arguments, as
        LayerWeights.kwargs() gives them), then forward(...) per step."""
        return self._m.Decoder(
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            eps=eps,
            scale=scale,
            gelu=gelu,
            k_cache=k_cache,
            v_cache=v_cache,
        )

    def moe_layer(
        self,
        *,
        router: Tensor,
        gate_up: list[list[BlockPart]],
        down: list[list[BlockPart]],
        width: int,
        top_k: int,
        normalize: bool,
        shared_gate_up: list[BlockPart],
        shared_down: list[BlockPart],
        shared_width: int,
        shared_gate: Tensor | None,
    ):
        """A C++ MoeLayer (csrc/moe.h) for `Decoder.add_layer(moe=...)`: router (E, D) float32, each expert's
        matrices as block parts, the optional shared expert (shared_width 0, [] and None without one)."""
        return self._m.MoeLayer(
            router=router,
            gate_up=gate_up,
            down=down,
            width=width,
            top_k=top_k,
            normalize=normalize,
            shared_gate_up=shared_gate_up,
            shared_down=shared_down,
            shared_width=shared_width,
            shared_gate=shared_gate,
        )


_lock = threading.Lock()
_loaded: CppOps | None = None


def load_kernels(verbose: bool = False) -> CppOps:
    """Build (once per machine and source version) and load the C++ kernels (build.load_module).

    Raises KernelBuildError when this machine cannot build or run them: not x86-64 with AVX-512 or AVX2, no
    `ninja` (pip install ninja), or a compiler error (its output is in the message)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = CppOps(load_module(verbose))
        return _loaded
