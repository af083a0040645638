"""`metronome plan --calibrate`: metronome's own decode and prefill speed on this machine, predicted from
terms measured on this machine and the plan's matrices and ops, never from timing the engine itself.

Machine terms (`measure_terms`), all on synthetic data, through the same kernels the plan runs:
- seconds per call of the block matmul at M token rows for every matrix shape the plan holds (`Matmul`: its
  block kind, rows and bytes per row; timed on copies of one of the plan's matrices of that shape, cycled
  through a ring larger than the last-level cache, so every call reads memory as a step does). Small
  matrices split over the pool less evenly than large ones, so a shape's own timing is what a step gets;
  a per-format seconds-per-byte over one large synthetic matrix is kept for the report and as a fallback;
- seconds per (row x cached position x query element) of the attention kernel;
- the per-call overhead of Python (one small op called from Python), and the extra cost of one parallel
  region of the kernels' thread pool (waking the workers and joining them);
- for tensor parallelism, one exchange of a row's partial sums between two ranks of this host, through
  the transport a tensor-parallel plan uses here (shared memory, else loopback gloo: parallel/host.py;
  `measure_collective`), the operation a tensor-parallel step runs twice per layer.

Plan terms (`plan_cost`): the matrices of one step counted by shape, the other parallel regions of a step
(per layer: norm, rope + cache write, attention, residual, norm, activation, residual ...), and the Python
calls of one engine step (every Python function and builtin called, counted, not timed, under a profile
hook). A tensor-parallel rank's plan terms come from rank 0's cut of the model (`tp_plan_cost`).

step(M) = sum over shapes (count x matmul_s(shape, M)) + attention + other regions x region_s
          + calls x call_s + collectives x collective_s.
On a CUDA device the same formula runs with the GPU's terms (`measure_terms(device="cuda")`): a bf16 matmul
per weight byte at M rows, the same attention and per-op terms, no thread pool.
"""

from __future__ import annotations

import dataclasses
import numbers
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from metronome.kernels.blocks import PACKED_KINDS

ROWS = (1, 8, 256)  # token rows measured: single-stream decode, 8 live slots, a prefill chunk (PREFILL_CHUNK)
Q4_FORMATS = ("Q4_0", "Q4_1")  # packed as Q4_1X16 by the plan in int4 mode (compile/quant.py block_matrix)
# synthetic matrix for M <= 8: three times the EPYC's 32 MiB L3; calibrate_model streams at least the plan's
# weights (the Intel VM lists a 480 MiB L3, which 96 MiB would sit in)
STREAM_BYTES = 96 << 20
COMPUTE_BYTES = 8 << 20  # for M = 256: compute-bound, reuse makes cache size irrelevant
RING_COPIES = 1024  # copies of one matrix cycled through (the shipped models' smallest need ~260)


Part = tuple[int, int, int]  # (BLOCK_KINDS code, output rows, bytes per stored row: per group of rows if packed)


@dataclass(frozen=True)
class Matmul:
    """One matrix of a step as the fused decoder reads it, in one parallel region: its stacked parts (a
    fused q/k/v or gate/up, parts of one format merged). A matmul's time depends on these, not on the
    values (csrc/blocks.h)."""

    parts: tuple[Part, ...]

    @property
    def rows(self) -> int:
        return sum(rows for _kind, rows, _bytes in self.parts)

    @property
    def k(self) -> int:
        """Input width: blocks per stored row times weights per block."""
        from metronome.kernels.blocks import BLOCK_BYTES, BLOCK_KINDS, BLOCK_WEIGHTS

        kind, _rows, row_bytes = self.parts[0]
        name = next(n for n, code in BLOCK_KINDS.items() if code == kind)
        return row_bytes // BLOCK_BYTES[name] * BLOCK_WEIGHTS[name]


def _interpolate(table: dict[int, float], rows: int, beyond: str) -> float:
    """`table` (rows -> value) at `rows`: linear between measured row counts; past the last, "linear"
    scales with rows (work grows with rows once compute-bound), "flat" keeps the last value."""
    ms = sorted(table)
    if rows <= ms[0]:
        return table[ms[0]]
    for lo, hi in zip(ms, ms[1:]):
        if rows <= hi:
            f = (rows - lo) / (hi - lo)
            return table[lo] * (1 - f) + table[hi] * f
    return table[ms[-1]] * (rows / ms[-1] if beyond == "linear" else 1.0)


@dataclass(frozen=True)
class Terms:
    """This machine, measured through the plan's kernels on synthetic data."""

    device: str
    threads: int
    seconds_per_byte: dict[str, dict[int, float]]  # format -> rows -> seconds per weight byte
    attention_s: float  # per (row x cached position x query element)
    call_s: float  # one small op called from Python
    region_s: float  # one parallel region of the kernels' pool, beyond the call
    wake_s: float = 0.0  # waking the pool's sleeping workers: the first region after the engine's Python work
    notes: tuple[str, ...] = field(default=())
    matmul_s: dict[Matmul, dict[int, float]] = field(default_factory=dict)  # shape -> rows -> seconds per call
    collective_s: float = 0.0  # one exchange of a row's partial sums between two ranks (tensor parallel)
    logits_s: dict[int, float] = field(default_factory=dict)  # rows -> the work on a step's logits (`_logits_seconds`)

    def __post_init__(self) -> None:
        # Terms grow a field now and then; a positional call written before one was added would shift its
        # values into the wrong fields (CUDA's notes once landed in wake_s and failed only at `mean`).
        for name in ("attention_s", "call_s", "region_s", "wake_s", "collective_s"):
            if not isinstance(getattr(self, name), numbers.Real):
                raise TypeError(f"Terms.{name} must be seconds (a float), got {getattr(self, name)!r}")
        if not all(isinstance(n, str) for n in self.notes):
            raise TypeError(f"Terms.notes must be a tuple of strings, got {self.notes!r}")

    def mean(self, other: Terms) -> Terms:
        """Field-wise mean of two measurements of the same machine (taken before and after the engine ran)."""
        per = {
            f: {m: (v + other.seconds_per_byte[f][m]) / 2 for m, v in table.items()}
            for f, table in self.seconds_per_byte.items()
        }
        shapes = {
            m: {r: (v + other.matmul_s[m][r]) / 2 for r, v in table.items()}
            for m, table in self.matmul_s.items()
            if m in other.matmul_s
        }
        return Terms(
            self.device,
            self.threads,
            per,
            (self.attention_s + other.attention_s) / 2,
            (self.call_s + other.call_s) / 2,
            (self.region_s + other.region_s) / 2,
            (self.wake_s + other.wake_s) / 2,
            ("mean of a measurement before and one after the engine's",),
            shapes,
            (self.collective_s + other.collective_s) / 2,
            {r: (v + other.logits_s.get(r, v)) / 2 for r, v in self.logits_s.items()},
        )

    def per_byte(self, fmt: str, rows: int) -> float:
        """Seconds per weight byte at `rows` rows, linear between the measured row counts."""
        return _interpolate(self.seconds_per_byte[fmt], rows, "linear")

    def logits(self, rows: int) -> float:
        """Seconds of the work on `rows` rows of logits (0 when not measured)."""
        return _interpolate(self.logits_s, rows, "linear") if self.logits_s else 0.0

    def matmul(self, shape: Matmul, rows: int) -> float:
        """Seconds of one matmul of `shape` over `rows` rows, linear between the measured row counts."""
        return _interpolate(self.matmul_s[shape], rows, "linear")


def _mean_s(fn, repeats: int, warm: int = 2, batches: int = 3) -> float:
    """Seconds per call: the mean over `repeats` calls after `warm` (the mean, as a throughput is: a call
    that waits for a descheduled pool thread counts, as it does in the engine), taken `batches` times and
    the median batch kept (one batch that another process interrupted does not set the term)."""
    for _ in range(warm):
        fn()
    means = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        means.append((time.perf_counter() - t0) / repeats)
    return statistics.median(means)


def _synthetic_q4(nbytes: int, k: int):
    """Packed Q4_1X16 groups (kernels.blocks) of about `nbytes`: random codes, fp16 d and m of 0.01."""
    import torch

    from metronome.kernels.blocks import BLOCK_BYTES, Q4_PACKED_KIND

    size = BLOCK_BYTES[Q4_PACKED_KIND]
    nb = k // 32
    groups = max(1, nbytes // (nb * size))
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(groups, nb, size), dtype=np.uint8)
    blocks[:, :, :64] = np.full(32, 0.01, dtype=np.float16).view(np.uint8)  # 16 d, 16 m
    return torch.from_numpy(blocks.reshape(groups, nb * size)), groups * 16


def _synthetic_q8(nbytes: int, k: int):
    """Q8_0 rows of about `nbytes`: random int8 weights, fp16 scales of 0.01."""
    import torch

    from metronome.kernels.blocks import Q8_0_BYTES

    nb = k // 32
    rows = max(1, nbytes // (nb * Q8_0_BYTES))
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(rows, nb, Q8_0_BYTES), dtype=np.uint8)
    blocks[:, :, :2] = np.full(1, 0.01, dtype=np.float16).view(np.uint8)
    return torch.from_numpy(blocks.reshape(rows, nb * Q8_0_BYTES)), rows


def measure_terms(
    threads: int,
    device: str = "cpu",
    repeats: int = 5,
    stream_bytes: int = STREAM_BYTES,
    samples: dict | None = None,
    shapes: dict | None = None,
    file_pages: np.ndarray | None = None,
) -> Terms:
    """The machine terms (a few seconds). CPU: through metronome's C++ kernels with `threads` pool threads.
    `stream_bytes`: the synthetic matrix for few rows (keep it well above the last-level cache).
    `samples`: {format: QuantTensor} for formats the kernels read as the file stores them (Q5_0, Q4_K,
    Q6_K, Q8_0 rows ...): one tensor's blocks, tiled to `stream_bytes`, stand for the format (timing does
    not depend on the values). `shapes`: {Matmul: (blocks per part, row counts)}, one of the plan's
    matrices per shape and the row counts to time it at (`plan_matmuls`), for `Terms.matmul_s`.
    `file_pages`: the model file mapped read-only (uint8); a shape whose blocks the plan reads in place
    from the file is timed on slices of it (see `_matmul_seconds`)."""
    import torch

    if threads < 1 or repeats < 1:
        raise ValueError(f"threads={threads} and repeats={repeats} must be at least 1")
    if device == "cuda":
        return _measure_cuda(repeats)
    from metronome.compile.quant import pack_16_rows
    from metronome.kernels.blocks import BLOCK_KINDS, FILE_KINDS, Q4_PACKED_KIND, Q8_0_KIND
    from metronome.kernels.ops import load_kernels
    from metronome.model.loader import QuantTensor

    ops = load_kernels()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ops.set_threads(threads)
    try:
        k = 1024
        per_byte: dict[str, dict[int, float]] = {Q4_PACKED_KIND: {}, "Q8_0": {}}
        q4 = (Q4_PACKED_KIND, _synthetic_q4, BLOCK_KINDS[Q4_PACKED_KIND])
        for fmt, make, kind in (q4, ("Q8_0", _synthetic_q8, Q8_0_KIND)):
            for rows in ROWS:
                blocks, n = make(stream_bytes if rows <= 8 else min(stream_bytes, COMPUTE_BYTES), k)
                x = torch.randn(rows, k)
                s = _mean_s(lambda x=x, b=blocks, kind=kind, n=n: ops.block_linear(x, b, kind, n), repeats)
                per_byte[fmt][rows] = s / blocks.nbytes
        for fmt, tensor in (samples or {}).items():
            per_byte[fmt] = {}
            for rows in ROWS:
                blocks, n, k_in = _tiled(tensor, stream_bytes if rows <= 8 else min(stream_bytes, COMPUTE_BYTES))
                x = torch.randn(rows, k_in)
                kind = FILE_KINDS[tensor.qtype]
                if fmt == PACKED_KINDS.get(tensor.qtype):  # as the plan holds it
                    blocks, kind = pack_16_rows(QuantTensor(blocks.numpy(), tensor.qtype, (n, k_in)), ops)
                s = _mean_s(lambda x=x, b=blocks, kind=kind, n=n: ops.block_linear(x, b, kind, n), repeats)
                per_byte[fmt][rows] = s / blocks.nbytes
        attention_s = _attention_seconds(ops, repeats)
        small = torch.ones(8)
        call_s = _mean_s(lambda: torch.add(small, small), 200 * repeats, warm=20)
        tiny, tn = _synthetic_q8(64 * 1024, 256)  # 64 KiB: split over the pool, work of a few microseconds
        tx = torch.randn(1, 256)
        tiny_s = _mean_s(lambda: ops.block_linear(tx, tiny, Q8_0_KIND, tn), 200 * repeats, warm=20)
        work_s = tiny.nbytes * per_byte["Q8_0"][1]
        region_s = max(0.0, tiny_s - call_s - work_s)
        wake_s = max(0.0, _after_idle_s(lambda: ops.block_linear(tx, tiny, Q8_0_KIND, tn), 10 * repeats) - tiny_s)
        matmul_s = {
            m: _matmul_seconds(ops, m, blocks, counts, stream_bytes, call_s, repeats, file_pages)
            for m, (blocks, counts) in (shapes or {}).items()
        }
    finally:
        torch.set_num_threads(previous)
    return Terms("cpu", threads, per_byte, attention_s, call_s, region_s, wake_s, matmul_s=matmul_s)


def _matmul_seconds(
    ops,
    m: Matmul,
    blocks: tuple,
    counts: tuple[int, ...],
    stream_bytes: int,
    call_s: float,
    repeats: int,
    file_pages: np.ndarray | None = None,
):
    """{rows: seconds of one matmul of shape `m`} (`blocks`: one tensor per part), minus the Python calls
    around it (the decoder calls its matmuls from C++). Copies of the blocks are cycled through a ring of
    about `stream_bytes` (few rows: every call reads memory) or COMPUTE_BYTES (many rows: compute-bound),
    at least two copies. A shape the plan reads in place from the model file (`file_pages` given) is timed
    on slices of the file at offsets cycling through it, not on copies: the file's page-cache pages stream
    slower than anonymous memory here (Gemma 3's 178 MB head: 5.1 ms a step in the plan, 4.1 ms timed on
    copies), and timing does not depend on the values the slices hold."""
    import torch

    from metronome.compile.quant import file_view
    from metronome.kernels.blocks import FILE_KINDS

    nbytes = sum(b.nbytes for b in blocks)
    in_file = file_pages is not None and all(kind in FILE_KINDS.values() for kind, _, _ in m.parts)
    if in_file and len(file_pages) <= nbytes:
        raise ValueError(f"file_pages: {len(file_pages)} bytes cannot hold a {nbytes}-byte matrix of the plan")

    def copy(i: int) -> tuple:
        if not in_file:
            return tuple(b.clone() for b in blocks)
        offset, parts = i * nbytes % (len(file_pages) - nbytes), []
        for b in blocks:
            parts.append(file_view(file_pages[offset : offset + b.nbytes], b.shape[0]))
            offset += b.nbytes
        return tuple(parts)

    out = {}
    for rows in counts:
        ring_bytes = stream_bytes if rows <= 8 else min(stream_bytes, COMPUTE_BYTES)
        # at most RING_COPIES: a tiny matrix's timing is its calls' overhead, wherever its bytes come from
        ring = [copy(i) for i in range(min(RING_COPIES, max(2, -(-ring_bytes // nbytes))))]
        x = torch.randn(rows, m.k)

        def cycle(ring=ring, x=x) -> None:
            for copy in ring:
                for b, (kind, n, _) in zip(copy, m.parts):
                    ops.block_linear(x, b, kind, n)

        out[rows] = max(0.0, _mean_s(cycle, repeats, warm=1) / len(ring) - call_s * len(m.parts))
    return out


def logits_seconds(
    vocab: int, softcap: float | None, rows: tuple[int, ...] = (1, 8), repeats: int = 20
) -> dict[int, float]:
    """{rows: seconds of what a step does to its logits beyond the head}: the final softcap where the model
    has one (fused runner's `logits`), then the engine's plain-greedy pick (`sampler.argmax_rows`, the
    function the step calls), on synthetic float32 rows of the model's vocabulary. They scale with the
    vocabulary, not with the calls (Gemma's 262,144 logits a row), so the call count misses them. (Timed
    with torch's argmax, which the engine had stopped using, they were 0.34 ms a step at one row and 1.38
    at eight for Gemma 3, against 0.013 and 0.32 ms for the engine's pick: the planner's decode predictions
    were 4-9 % slow from that alone.)"""
    import torch

    from metronome.engine.sampler import argmax_rows

    out = {}
    for m in rows:
        x = torch.randn(m, vocab)

        def work(x=x) -> None:
            y = torch.tanh(x / softcap) * softcap if softcap else x
            argmax_rows(y[:, :vocab])

        out[m] = _mean_s(work, repeats)
    return out


def _gather_latency(group, width: int, calls: int, gap_s: float) -> tuple[float, bool]:
    """(mean seconds of one all_gather of a (1, width) float32 row between the group's ranks (run_ranks),
    each rank busy for `gap_s` before each (as a rank computes its share of a layer between two); the
    whether the group exchanges through shared memory)."""
    import torch

    t = torch.randn(1, width)
    total = 0.0
    for i in range(calls + 20):  # 20 to warm up
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:  # stands for the rank's compute: the core stays busy
            pass
        t0 = time.perf_counter()
        group.all_gather(t)
        if i >= 20:
            total += time.perf_counter() - t0
    return total / calls, group.exchange is not None


def measure_collective(width: int, gap_s: float, world: int = 2, calls: int = 1000) -> tuple[float, bool]:
    """(mean seconds of one exchange of a (1, width) row's partial sums among `world` fresh ranks of this
    host, `gap_s` of compute apart; whether it went through shared memory, which is used where it can be
    made, as tensor parallelism does, else loopback gloo). The mean, not the median, as a step pays for the slow
    exchanges too. The gap matters for gloo: on the 2-core machine a gloo exchange right after another took
    ~770 us, one after 175 us of compute ~1,100 us (docs/planner.md)."""
    from metronome.parallel.group import run_ranks

    host_bytes = -(-4 * width // 64) * 64
    results = run_ranks(world, _gather_latency, (width, calls, gap_s), host_bytes=host_bytes)
    return max(s for s, _ in results), results[0][1]


def _stream_like_a_rank(nbytes: int, threads: int, ready, stop) -> None:
    """Another rank's memory traffic (in its own process): one-row Q8_0 matmuls over `nbytes` of weights,
    with `threads` pool threads, until `stop` is set."""
    import torch

    from metronome.kernels.blocks import Q8_0_KIND
    from metronome.kernels.ops import load_kernels

    ops = load_kernels()
    ops.set_threads(threads)
    torch.set_num_threads(threads)
    blocks, n = _synthetic_q8(nbytes, 1024)
    x = torch.randn(1, 1024)
    ready.set()
    while not stop.is_set():
        ops.block_linear(x, blocks, Q8_0_KIND, n)


@contextmanager
def other_rank_streaming(nbytes: int, threads: int) -> Iterator[None]:
    """While the body runs, a second process reads `nbytes` of weights over and over as the other rank of
    a tp=2 step does: a rank's terms measured alone would give it the whole memory bandwidth, which the two
    ranks share (Gemma 3 at tp=2 was predicted 1.28x too fast that way once the exchanges stopped hiding it)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_stream_like_a_rank, args=(nbytes, threads, ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("the process standing for the other rank did not start within 120 s")
        yield
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def _after_idle_s(fn, repeats: int, idle_s: float = 0.003) -> float:
    """Mean seconds of one call made after `idle_s` of sleep (long enough for the pool's workers to stop
    spinning and sleep, as they do while the engine samples and emits between steps)."""
    total = 0.0
    for _ in range(repeats):
        time.sleep(idle_s)
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / repeats


def _tiled(tensor, nbytes: int):
    """(blocks, rows, K): `tensor`'s stored rows repeated to about `nbytes`, as the kernels read them."""
    import torch

    rows, k = tensor.shape
    raw = torch.from_numpy(np.ascontiguousarray(np.asarray(tensor.raw)).reshape(rows, -1))
    times = max(1, nbytes // raw.nbytes)
    return raw.repeat(times, 1).contiguous(), rows * times, k


def _attention_seconds(ops, repeats: int) -> float:
    """Seconds per (row x position x query element) of the attention kernel over a 1024-position cache."""
    import torch

    heads, kv_heads, dh, rows, ctx = 8, 2, 64, 8, 1024
    k = torch.randn(rows, kv_heads, ctx, dh).to(torch.bfloat16)
    v = torch.randn(rows, kv_heads, ctx, dh).to(torch.bfloat16)
    q = torch.randn(rows, heads, dh)
    slots = torch.arange(rows)
    ends = torch.full((rows,), ctx)
    s = _mean_s(lambda: ops.decode_attention(q, k, v, slots, ends, 0, dh**-0.5), repeats)
    return s / (rows * ctx * heads * dh)


def _measure_cuda(repeats: int) -> Terms:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; calibrate on the CPU instead")

    def timed(fn) -> float:
        def run():
            fn()
            torch.cuda.synchronize()

        return _mean_s(run, repeats)

    per_byte: dict[str, dict[int, float]] = {"bf16": {}}
    w = torch.randn(16384, 16384, device="cuda", dtype=torch.bfloat16)  # 512 MiB: never cached
    for rows in ROWS:
        x = torch.randn(rows, 16384, device="cuda", dtype=torch.bfloat16)
        per_byte["bf16"][rows] = timed(lambda x=x: x @ w.T) / (w.numel() * 2)
    small = torch.ones(8, device="cuda")
    call_s = timed(lambda: [torch.add(small, small) for _ in range(100)]) / 100
    q = torch.randn(8, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(8, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    att = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv)) / (8 * 4096 * 8 * 64)
    return Terms("cuda", 1, per_byte, att, call_s, region_s=0.0, notes=("torch bf16 matmul over a 512 MiB matrix",))


@dataclass(frozen=True)
class PlanCost:
    """What one step of a compiled plan moves and calls (no timing)."""

    model: str
    weight_bytes: dict[str, int]  # format -> bytes of the layers' matrices, read once per step
    layers: int
    q_size: int  # query elements per row this process computes (a rank's heads under tensor parallelism)
    regions: int  # parallel regions of the kernels' pool per step
    engine_ops: dict[int, int]  # live slots -> Python calls of one engine step (counted)
    head: tuple[str, int] = ("Q8_0", 0)  # the output projection's format and bytes (a prompt runs it on 1 row)
    matmuls: dict[Matmul, int] = field(default_factory=dict)  # the layers' matrices by shape -> count per step
    head_matmul: Matmul | None = None
    collectives: int = 0  # exchanges between ranks per step (tensor parallel)

    @property
    def matmul_regions(self) -> int:
        """The regions that are matmuls (timed with their shape, so not priced again as regions): one per
        matrix of each layer, and the head."""
        return sum(self.matmuls.values()) + (self.head_matmul is not None)


def plan_formats(loaded, mode: str) -> tuple[dict[str, int], dict, tuple[str, int]]:
    """Bytes one step reads per block format in the layers, one tensor per format the kernels read from the
    file's blocks (to measure), and the head's (format, bytes). As quant.block_matrix decides: Q5_0, Q4_K,
    Q6_K and Q8_0 are packed 16 rows side by side ("Q5_0X16", PACKED_KINDS), the other file formats stay as stored
    ("Q5_1 (file)"), Q4_0/Q4_1 are
    packed 16 rows side by side too ("Q4_1X16") in int4 mode, the rest is quantized to "Q8_0". The embedding table counts only when it
    is also the head (tied): a step reads one row of it otherwise."""
    from metronome.kernels.blocks import BLOCK_BYTES, BLOCK_GROUPS, BLOCK_WEIGHTS, FILE_KINDS, Q4_PACKED_KIND
    from metronome.model.loader import QuantTensor

    head = "head.weight" if "head.weight" in loaded.weights else "embed.weight"
    out: dict[str, int] = {}
    samples: dict = {}
    head_part = ("Q8_0", 0)
    for name, w in loaded.weights.items():
        if len(w.shape) != 2 or not (name.startswith("layers.") or name == head):
            continue
        rows, k = w.shape
        if isinstance(w, QuantTensor) and w.qtype in FILE_KINDS:
            fmt = PACKED_KINDS.get(w.qtype, f"{w.qtype} (file)")
            samples.setdefault(fmt, w)
            nbytes = int(np.asarray(w.raw).nbytes)
            if fmt in BLOCK_GROUPS:  # whole groups of 16 rows, and Q4_K's unpacked scales (2368 vs 16 x 144)
                blocks = k // BLOCK_WEIGHTS[fmt]
                nbytes = -(-rows // BLOCK_GROUPS[fmt]) * blocks * BLOCK_BYTES[fmt]
        elif mode == "int4" and isinstance(w, QuantTensor) and w.qtype in Q4_FORMATS:
            fmt = Q4_PACKED_KIND  # Q4_1's 20 bytes a block as they are; Q4_0's 18 gain m (20)
            nbytes = -(-rows // BLOCK_GROUPS[fmt]) * (k // BLOCK_WEIGHTS[fmt]) * BLOCK_BYTES[fmt]
        else:
            fmt, nbytes = "Q8_0", rows * k // 32 * 34
        if name == head:
            head_part = (fmt, nbytes)
        else:
            out[fmt] = out.get(fmt, 0) + nbytes
    return out, samples, head_part


def plan_matmuls(runner) -> tuple[dict[Matmul, int], Matmul, dict[Matmul, tuple]]:
    """The layers' matrices of a fused runner counted by shape, the head's shape, and one matrix of each
    shape (a tensor per part) to time. The head is the runner's last matrix (compile/fused.py builds it
    last)."""
    counts: dict[Matmul, int] = {}
    samples: dict[Matmul, tuple] = {}
    *layers, head = runner.segments
    for matrix in layers:
        m, blocks = _merged(matrix)
        counts[m] = counts.get(m, 0) + 1
        samples.setdefault(m, blocks)
    head_m, blocks = _merged(head)
    samples.setdefault(head_m, blocks)
    return counts, head_m, samples


def _merged(matrix: list) -> tuple[Matmul, tuple]:
    """A matrix's segments with neighbours of one format stacked into one part (as one call times them);
    packed groups (Q4 of 4 rows, Q5_0/Q4_K/Q6_K of 16) only where the rows fill whole groups."""
    import torch

    from metronome.kernels.blocks import BLOCK_GROUPS, BLOCK_KINDS

    group = {BLOCK_KINDS[name]: g for name, g in BLOCK_GROUPS.items()}
    parts: list[list] = []  # [kind, rows, row_bytes, [blocks]]
    for blocks, kind, rows in matrix:
        last = parts[-1] if parts else None
        g = group.get(kind, 1)
        whole = g == 1 or (rows % g == 0 and last is not None and last[1] % g == 0)
        if last is not None and last[0] == kind and last[2] == blocks.shape[1] and whole:
            last[1] += rows
            last[3].append(blocks)
        else:
            parts.append([kind, rows, blocks.shape[1], [blocks]])
    m = Matmul(tuple((kind, rows, row_bytes) for kind, rows, row_bytes, _ in parts))
    return m, tuple(torch.cat(b) if len(b) > 1 else b[0] for *_, b in parts)


def _fused_runner(runner):
    from metronome.compile.fused import FusedRunner

    if not isinstance(runner, FusedRunner):
        return None
    if runner.cfg.is_moe:
        raise ValueError(
            "model: calibration does not cover mixture-of-experts plans yet (which experts a step reads depends "
            "on the routing); `python -m metronome.bench.moe` measures their decode"
        )
    return runner


def plan_cost(engine, loaded, live: tuple[int, ...] = (1, 8)) -> PlanCost:
    """The plan's bytes per format, matrices by shape and op counts; runs (and does not time) one engine
    step per entry of `live` to count its Python calls. `loaded`: the model the engine was compiled from."""
    plan = engine.plan
    cfg = plan.cfg
    if plan.device.type == "cuda":
        by_format, head = {"bf16": plan.report.weight_bytes}, ("bf16", 0)
    else:
        by_format, _, head = plan_formats(loaded, plan.report.weights)
    fused = _fused_runner(plan.runner)
    matmuls, head_m = (plan_matmuls(fused)[:2]) if fused is not None else ({}, None)
    per_layer = 11 + 2 * bool(cfg.sandwich_norms)
    return PlanCost(
        engine.model_name,
        by_format,
        cfg.num_layers,
        cfg.q_size,
        per_layer * cfg.num_layers + 2,
        {n: count_step_ops(engine, n) for n in live},
        head,
        matmuls,
        head_m,
    )


def tp_plan_cost(loaded, config, tp: int, base: PlanCost, shared_memory: bool = True):
    """(rank 0's PlanCost at tensor-parallel degree `tp`, its matrices by shape with their blocks, its
    threads); None when the model does not cut into `tp` ranks. Rank 0's cut of the model is built here
    (not run) to read its matrices; the ranks are symmetric. The Python calls are the single process's
    (`base`: rank 0 runs the scheduler and sampler); the collectives per step: the row-parallel o and
    down sums of every layer, the logits of every rank's vocabulary, and rank 0's broadcast of the step
    (parallel/runner.py: one exchange through `shared_memory`, else two gloo collectives, its size and
    then its contents)."""
    from metronome.compile.stages import PlanError
    from metronome.parallel.plan import rank_runner, tp_settings
    from metronome.parallel.tp import Solo, TPLayout

    try:
        resolved, layout, _ = tp_settings(loaded, dataclasses.replace(config, tp=tp))
    except PlanError:
        return None
    if resolved.kernels != "cpp":
        return None
    import torch

    from metronome.kernels.ops import load_kernels

    ops = load_kernels()
    threads = (torch.get_num_threads(), ops.threads())
    try:
        runner = rank_runner(loaded, resolved, TPLayout(tp, 0, layout.shards), Solo())
    finally:  # a rank's runner sets this process's threads as a rank's; this process is not one
        torch.set_num_threads(threads[0])
        ops.set_threads(threads[1])
    matmuls, head_m, samples = plan_matmuls(runner)
    cost = dataclasses.replace(
        base,
        q_size=runner.cfg.q_size,
        matmuls=matmuls,
        head_matmul=head_m,
        collectives=2 * runner.cfg.num_layers + 1 + (1 if shared_memory else 2),
    )
    return cost, samples, resolved.threads or 1


def count_step_ops(engine, live: int) -> int:
    """Python calls of one engine decode step with `live` requests running: every Python function and
    builtin (torch and numpy ops among them) called, counted under a profile hook (not timed). The plan's
    own kernels are one call here; their work is priced by the matmul, attention and region terms."""
    import sys

    from metronome.config import SamplingParams

    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    prompt = engine.encode_prompt("Count the ops of one step.", chat=False)
    reqs = [engine.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True), lambda d: None) for _ in range(live)]
    engine.step()  # admission and prefill
    engine.step()  # the first decode step (its first-token bookkeeping differs)
    sys.setprofile(count)
    try:
        engine.step()
    finally:
        sys.setprofile(None)
    for r in reqs:
        engine.cancel(r)
    engine.step()  # the cancelled requests leave
    return calls


def predict_step_s(
    cost: PlanCost, terms: Terms, rows: int, positions: int, python_ops: int, head_rows: int | None = None
) -> float:
    """One plan call over `rows` token rows attending to `positions` cached positions on average, plus
    `python_ops` Python calls around it; the head over `head_rows` rows (default all; a prompt needs one).
    The matrices are priced by their shapes' timings when the terms have them all, else by bytes."""
    head_m = rows if head_rows is None else head_rows
    shapes = [*cost.matmuls, *([cost.head_matmul] if cost.head_matmul else [])]
    if shapes and all(m in terms.matmul_s for m in shapes):
        matrices = sum(n * terms.matmul(m, rows) for m, n in cost.matmuls.items())
        matrices += terms.matmul(cost.head_matmul, head_m) if cost.head_matmul else 0.0
        regions = cost.regions - cost.matmul_regions
    else:

        def per_byte(fmt: str, m: int) -> float:
            return terms.per_byte(fmt if fmt in terms.seconds_per_byte else "Q8_0", m)

        matrices = sum(nbytes * per_byte(fmt, rows) for fmt, nbytes in cost.weight_bytes.items())
        matrices += cost.head[1] * per_byte(cost.head[0], head_m)
        regions = cost.regions
    attention = rows * positions * cost.q_size * cost.layers * terms.attention_s
    return (
        matrices
        + terms.logits(head_m)
        + attention
        + regions * terms.region_s
        + terms.wake_s
        + python_ops * terms.call_s
        + cost.collectives * terms.collective_s
    )


@dataclass(frozen=True)
class CalibrationRow:
    model: str
    what: str  # "decode, 1 live slot" | "decode, 8 live slots (per slot)" | "prefill, 256-token prompt"
    predicted: float  # tokens/s (per slot for decode)
    measured: float | None  # tokens/s from the engine, when asked for

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None else self.predicted / self.measured


DECODE_POSITION = 64  # mean cached positions during a measured decode (prompt ~12 + up to 128 new tokens)
PREFILL_TOKENS = 256


def calibrate_model(
    model: str | None,
    threads: int,
    live: tuple[int, ...] = (1, 8),
    measure: bool = False,
    device: str = "cpu",
    layouts: bool = True,
    rounds: int = 1,
) -> tuple[Terms, list[CalibrationRow]]:
    """Predict `model`'s decode speed at each number of `live` slots and its prefill speed from the machine
    terms and the compiled plan; with `layouts` (CPU, 2+ threads), also its single-stream decode on the
    disaggregated layout (the decode engine gets half the threads, parallel/disagg.py) and at tp=2 (two
    ranks sharing the threads) where the model cuts in two. With `measure`, also run the engine as
    `metronome bench --decode-only` does (median of 3 runs of 128 tokens per live request, after a
    warm-up), a 256-token prompt, and each layout the same way. `rounds`: the terms and the engine are
    measured that many times, alternating, and each row reports the median prediction and the median
    measurement (this machine's bandwidth drifts by 10-20 % from one minute to the next)."""
    from metronome.config import EngineConfig
    from metronome.engine import Engine
    from metronome.model.loader import load

    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    loaded = load(model)
    ctx = min(1024, loaded.config.max_position)  # a prompt of PREFILL_TOKENS and 128 new tokens fit in either
    # no prefix cache: every round sends the same prompts, and a hit would skip the prefill being measured
    config = EngineConfig(
        slots=max(live), ctx=ctx, threads=threads, spec_tokens=0, device=device, prefix_cache_tokens=0
    )
    engine = Engine.from_model(model, config, loaded=loaded)
    _, samples, _ = plan_formats(loaded, engine.plan.report.weights)
    cost = plan_cost(engine, loaded, live)
    fused = _fused_runner(engine.plan.runner)
    shapes = _timed_shapes(*plan_matmuls(fused)) if fused is not None else None
    cfg = engine.plan.cfg
    pages = np.memmap(loaded.path, dtype=np.uint8, mode="r") if loaded.path.is_file() else None

    # Copies timed for few rows stream at least what a step reads: a ring smaller than the plan's weights
    # can sit in a large last-level cache (this Intel VM lists 300 MiB) and time faster than the plan runs
    # (the 0.5B's packed Q5_0 at one slot: predicted 1.21x of measured on a 96 MiB ring).
    stream = max(STREAM_BYTES, sum(cost.weight_bytes.values()) + cost.head[1])

    def machine() -> Terms:  # torch's threads as the engine left them: the logits' work runs with those
        t = measure_terms(threads, device=device, stream_bytes=stream, samples=samples, shapes=shapes, file_pages=pages)
        return dataclasses.replace(t, logits_s=logits_seconds(cfg.vocab_size, cfg.final_logit_softcap, live))

    # per slot: what each user of a full step gets (a total would read as 8 times faster)
    whats = [f"decode, {n} live slot" + ("s (per slot)" if n > 1 else "") for n in live] + [
        f"prefill, {PREFILL_TOKENS}-token prompt"
    ]
    predicted: list[list[float]] = [[] for _ in whats]
    measured: list[list[float]] = [[] for _ in whats]
    for _ in range(rounds):
        terms = machine()
        if measure:
            for i, n in enumerate(live):
                measured[i].append(_measure_decode(engine, n))
            measured[-1].append(_measure_prefill(engine))
            terms = terms.mean(machine())
        for i, n in enumerate(live):
            predicted[i].append(1 / predict_step_s(cost, terms, n, DECODE_POSITION, cost.engine_ops[n]))
        prompt_s = predict_step_s(cost, terms, PREFILL_TOKENS, PREFILL_TOKENS // 2, cost.engine_ops[min(live)], 1)
        predicted[-1].append(PREFILL_TOKENS / prompt_s)
    rows = [_median_row(cost.model, w, p, m) for w, p, m in zip(whats, predicted, measured)]
    if layouts and fused is not None and threads >= 2:
        del engine  # its KV cache and scratch, before the layouts' engines allocate theirs
        rows += _layout_rows(model, loaded, config, cost, shapes, terms.logits_s, pages, stream, measure, rounds)
    return terms, rows


def _median_row(model: str, what: str, predicted: list[float], measured: list[float]) -> CalibrationRow:
    return CalibrationRow(model, what, statistics.median(predicted), statistics.median(measured) if measured else None)


def _timed_shapes(counts: dict, head: Matmul, samples: dict, rows: tuple[int, ...] = ROWS) -> dict:
    """{Matmul: (blocks per part, row counts to time)}: every shape at `rows`; the head at the decode row counts
    only (a prompt runs it on its last row)."""
    decode_rows = tuple(r for r in rows if r <= 8)
    return {m: (samples[m], rows if m in counts else decode_rows) for m in samples}


def _layout_rows(
    model,
    loaded,
    config,
    cost: PlanCost,
    shapes: dict,
    logits_s: dict[int, float],
    pages: np.ndarray | None,
    stream: int,
    measure: bool,
    rounds: int,
) -> list[CalibrationRow]:
    """Single-stream decode on the disaggregated layout and at tp=2, predicted (and measured), each the
    median of `rounds` alternations of terms and engine (each layout's engine built once). `stream`: the
    ring the plan's own terms were timed on; a layout's few-row matrices cycle through at least what its
    step reads, as the plan's do. They were timed on the 96 MiB default, which a 300 MiB last-level cache can
    hold, and a 16-core Xeon's disaggregated decode engine was predicted 1.39-1.53x too fast (docs/parallel.md;
    not re-measured there since)."""
    from metronome.config import Layout
    from metronome.engine import Engine

    threads = config.threads
    one_slot = dataclasses.replace(config, slots=1)
    out = []
    decode_threads = threads - threads // 2  # as Engine.from_model splits the cores
    decode_shapes = {m: (b, (1,)) for m, (b, _) in shapes.items()}
    engine = None
    if measure:
        engine = Engine.from_model(model, dataclasses.replace(one_slot, layout=Layout.DISAGGREGATED), loaded=loaded)
    predicted, measured = [], []
    try:
        for _ in range(rounds):
            terms = measure_terms(decode_threads, stream_bytes=stream, shapes=decode_shapes, file_pages=pages)
            terms = dataclasses.replace(terms, logits_s=logits_s)
            predicted.append(1 / predict_step_s(cost, terms, 1, DECODE_POSITION, cost.engine_ops[1]))
            if engine is not None:
                measured.append(_measure_decode(engine, 1))
    finally:
        if engine is not None:
            engine.prefiller.close()
    what = f"decode, 1 live slot, disaggregated (decode engine: {decode_threads} thread{'s' * (decode_threads > 1)})"
    out.append(_median_row(cost.model, what, predicted, measured))

    found = tp_plan_cost(loaded, one_slot, 2, cost)
    if found is None:
        return out  # the model does not cut into two ranks (heads, KV heads or MLP width)
    tp_cost, tp_samples, rank_threads = found
    tp_shapes = _timed_shapes(tp_cost.matmuls, tp_cost.head_matmul, tp_samples, (1,))

    def nbytes(m: Matmul) -> int:
        return sum(b.nbytes for b in tp_shapes[m][0])

    rank_bytes = sum(nbytes(m) * count for m, count in tp_cost.matmuls.items()) + nbytes(tp_cost.head_matmul)
    engine = Engine.from_model(model, dataclasses.replace(one_slot, tp=2), loaded=loaded) if measure else None
    predicted, measured, exchanges, shared = [], [], [], True
    try:
        for _ in range(rounds):
            rank_stream = max(STREAM_BYTES, rank_bytes)
            with other_rank_streaming(rank_stream, rank_threads):
                tp_terms = measure_terms(rank_threads, stream_bytes=rank_stream, shapes=tp_shapes, file_pages=pages)
            tp_terms = dataclasses.replace(tp_terms, logits_s=logits_s)
            compute_s = predict_step_s(tp_cost, tp_terms, 1, DECODE_POSITION, cost.engine_ops[1])  # no exchange yet
            gap_s = compute_s / tp_cost.collectives  # a rank's compute between two exchanges
            seconds, shared = measure_collective(loaded.config.hidden_size, gap_s)
            exchanges.append(seconds)
            if not shared and len(exchanges) == 1:  # the step's broadcast
                tp_cost = tp_plan_cost(loaded, one_slot, 2, cost, shared_memory=False)[0]  # is two gloo calls
            tp_terms = dataclasses.replace(tp_terms, collective_s=exchanges[-1])
            predicted.append(1 / predict_step_s(tp_cost, tp_terms, 1, DECODE_POSITION, cost.engine_ops[1]))
            if engine is not None:
                measured.append(_measure_decode(engine, 1))
    finally:
        if engine is not None:
            engine.plan.runner.close()
    what = (
        f"decode, 1 live slot, tp=2 ({rank_threads} thread{'s' * (rank_threads > 1)} per rank; "
        f"{tp_cost.collectives} exchanges a step through {'shared memory' if shared else 'gloo'}, "
        f"{statistics.median(exchanges) * 1e6:,.0f} us each)"
    )
    out.append(_median_row(cost.model, what, predicted, measured))
    return out


def _measure_decode(engine, live: int, tokens: int = 128, runs: int = 3) -> float:
    from metronome.config import SamplingParams
    from metronome.serve.usage import groq_timings

    prompt = engine.encode_prompt("Write a long story about a lighthouse keeper and the sea.", chat=False)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    engine.generate([prompt] * live, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    rates = []
    for _ in range(runs):
        for c in engine.generate([prompt] * live, params):
            rates.append((len(c.token_ids) - 1) / groq_timings(c.timings)["completion_time"])
    return statistics.median(rates)


def _measure_prefill(engine, runs: int = 3) -> float:
    from metronome.config import SamplingParams
    from metronome.serve.usage import groq_timings

    vocab = engine.plan.cfg.vocab_size
    times = []
    for r in range(runs + 1):  # the first run warms the pages of a longer scratch
        ids = [(1000 + 7 * i + r) % vocab for i in range(PREFILL_TOKENS)]  # a new prompt each run
        c = engine.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(groq_timings(c.timings)["prompt_time"])
    return PREFILL_TOKENS / statistics.median(times[1:])


def calibration_table(terms: Terms, rows: list[CalibrationRow]) -> str:
    head = (
        f"this machine ({terms.device}, {terms.threads} thread{'s' if terms.threads > 1 else ''}): "
        + ", ".join(
            f"{fmt} {1 / table[1] / 1e9:.1f} GB/s at 1 row, "
            f"{2 * max(table) * _weights_per_byte(fmt) / table[max(table)] / 1e9:.0f} GFLOP/s at {max(table)} rows"
            for fmt, table in terms.seconds_per_byte.items()
        )
        + f"; attention {1 / terms.attention_s / 1e9:.1f} G row-position-elements/s; per-op "
        f"{terms.call_s * 1e6:.1f} us; pool region {terms.region_s * 1e6:.1f} us; pool wake-up {terms.wake_s * 1e6:.0f} us; "
        f"{len(terms.matmul_s)} matrix shapes timed\n\n"
    )
    lines = [
        "| model | step | predicted tok/s | measured tok/s | predicted / measured |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        m = "-" if r.measured is None else f"{r.measured:,.1f}"
        q = "-" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.model} | {r.what} | {r.predicted:,.1f} | {m} | {q} |")
    return head + "\n".join(lines) + "\n"


def _weights_per_byte(fmt: str) -> float:
    bits = {"Q4_1X16": 5.0, "Q8_0": 8.5, "bf16": 16.0, "Q8_0 (file)": 8.5, "Q5_0X16": 5.5, "Q5_1 (file)": 6.0}
    bits |= {"Q4_KX16": 2368 * 8 / 4096, "Q6_KX16": 6.5625, "Q8_0X16": 8.5}
    bits |= {"Q4_K (file)": 4.5, "Q5_K (file)": 5.5, "Q6_K (file)": 6.5625}
    return 8 / bits.get(fmt, 8.0)
