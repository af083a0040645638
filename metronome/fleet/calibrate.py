"""`metronome plan --calibrate`: metronome's own decode and prefill speed on this machine, predicted from
terms measured on this machine and the plan's bytes and ops, never from timing the engine itself.

Machine terms (`measure_terms`), all on synthetic data, through the same kernels the plan runs:
- seconds per weight byte of a block matmul at M token rows, per block format, over a matrix larger than
  the last-level cache (bandwidth at M = 1, matmul throughput as M grows);
- seconds per (row x cached position x query element) of the attention kernel;
- the per-op overhead of one small op called from Python, and the extra cost of one parallel region of the
  kernels' thread pool (waking the workers and joining them).

Plan terms (`plan_cost`): weight bytes per block format (the file's tensors as the plan holds them), the
parallel regions of one step (per layer: norm, qkv, rope + cache write, attention, o, residual, norm, gate/up,
activation, down, residual; then the head), and the Python-side ops of one engine step, counted (not timed)
by running one step under a torch function mode.

step(M) = sum over formats (bytes x s_format(M)) + attention + regions x region_s + ops x call_s.
On a CUDA device the same formula runs with the GPU's terms (`measure_terms(device="cuda")`): a bf16 matmul
per weight byte at M rows, the same attention and per-op terms, no thread pool.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

ROWS = (1, 8, 256)  # token rows measured: single-stream decode, 8 live slots, a prefill chunk (PREFILL_CHUNK)
Q4_FORMATS = ("Q4_0", "Q4_1")  # packed as Q4X4 by the plan; every other quantized format is costed as Q8_0
STREAM_BYTES = 96 << 20  # synthetic matrix for M <= 8: three times this machine's 32 MiB L3, never cached
COMPUTE_BYTES = 8 << 20  # for M = 256: compute-bound, reuse makes cache size irrelevant


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

    def mean(self, other: Terms) -> Terms:
        """Field-wise mean of two measurements of the same machine (taken before and after the engine ran)."""
        per = {
            f: {m: (v + other.seconds_per_byte[f][m]) / 2 for m, v in table.items()}
            for f, table in self.seconds_per_byte.items()
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
        )

    def per_byte(self, fmt: str, rows: int) -> float:
        """Seconds per weight byte at `rows` rows, linear between the measured row counts."""
        table = self.seconds_per_byte[fmt]
        ms = sorted(table)
        if rows <= ms[0]:
            return table[ms[0]]
        for lo, hi in zip(ms, ms[1:]):
            if rows <= hi:
                f = (rows - lo) / (hi - lo)
                return table[lo] * (1 - f) + table[hi] * f
        return table[ms[-1]] * rows / ms[-1]


def _mean_s(fn, repeats: int, warm: int = 2) -> float:
    """Mean seconds per call over `repeats` calls after `warm` (the mean, as a throughput is: a call
    that waits for a descheduled pool thread counts, as it does in the engine)."""
    for _ in range(warm):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _synthetic_q4(nbytes: int, k: int):
    """Packed Q4X4 groups (kernels.blocks) of about `nbytes`: random codes, fp16 scales of 0.01."""
    import torch

    from metronome.kernels.blocks import Q4X4_BYTES

    nb = k // 32
    groups = max(1, nbytes // (nb * Q4X4_BYTES))
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(groups, nb, Q4X4_BYTES), dtype=np.uint8)
    blocks[:, :, :16] = np.full(8, 0.01, dtype=np.float16).view(np.uint8)
    return torch.from_numpy(blocks.reshape(groups, nb * Q4X4_BYTES)), groups * 4


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
) -> Terms:
    """The machine terms (a few seconds). CPU: through metronome's C++ kernels with `threads` pool threads.
    `stream_bytes`: the synthetic matrix for few rows (keep it well above the last-level cache).
    `samples`: {format: QuantTensor} for formats the kernels read as the file stores them (Q5_0, Q4_K,
    Q6_K, Q8_0 rows ...): one tensor's blocks, tiled to `stream_bytes`, stand for the format (timing does
    not depend on the values)."""
    import torch

    if threads < 1 or repeats < 1:
        raise ValueError(f"threads={threads} and repeats={repeats} must be at least 1")
    if device == "cuda":
        return _measure_cuda(repeats)
    from metronome.kernels.blocks import FILE_KINDS, Q4X4_KIND, Q8_0_KIND
    from metronome.kernels.ops import load_kernels

    ops = load_kernels()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ops.set_threads(threads)
    try:
        k = 1024
        per_byte: dict[str, dict[int, float]] = {"Q4X4": {}, "Q8_0": {}}
        for fmt, make, kind in (("Q4X4", _synthetic_q4, Q4X4_KIND), ("Q8_0", _synthetic_q8, Q8_0_KIND)):
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
    finally:
        torch.set_num_threads(previous)
    return Terms("cpu", threads, per_byte, attention_s, call_s, region_s, wake_s)


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
    return Terms("cuda", 1, per_byte, att, call_s, 0.0, ("torch bf16 matmul over a 512 MiB matrix",))


@dataclass(frozen=True)
class PlanCost:
    """What one step of a compiled plan moves and calls (no timing)."""

    model: str
    weight_bytes: dict[str, int]  # format -> bytes of the layers' matrices, read once per step
    layers: int
    q_size: int
    regions: int  # parallel regions of the kernels' pool per step
    engine_ops: dict[int, int]  # live slots -> Python-side ops of one engine step (counted)
    head: tuple[str, int] = ("Q8_0", 0)  # the output projection's format and bytes (a prompt runs it on 1 row)


def plan_formats(loaded, mode: str) -> tuple[dict[str, int], dict, tuple[str, int]]:
    """Bytes one step reads per block format in the layers, one tensor per format the kernels read in place
    (to measure), and the head's (format, bytes). As quant.block_matrix decides: file formats stay as stored ("Q6_K (file)"), Q4_0/Q4_1 are
    packed ("Q4X4") in int4 mode, the rest is quantized to "Q8_0". The embedding table counts only when it
    is also the head (tied): a step reads one row of it otherwise."""
    from metronome.kernels.blocks import FILE_KINDS
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
            fmt = f"{w.qtype} (file)"
            samples.setdefault(fmt, w)
            nbytes = int(np.asarray(w.raw).nbytes)
        elif mode == "int4" and isinstance(w, QuantTensor) and w.qtype in Q4_FORMATS:
            fmt, nbytes = "Q4X4", int(np.asarray(w.raw).nbytes)  # packing moves the blocks, same size
        else:
            fmt, nbytes = "Q8_0", rows * k // 32 * 34
        if name == head:
            head_part = (fmt, nbytes)
        else:
            out[fmt] = out.get(fmt, 0) + nbytes
    return out, samples, head_part


def plan_cost(engine, loaded, live: tuple[int, ...] = (1, 8)) -> PlanCost:
    """The plan's bytes per format and its op counts; runs (and does not time) one engine step per entry
    of `live` to count its Python-side ops. `loaded`: the model the engine was compiled from."""
    plan = engine.plan
    cfg = plan.cfg
    if plan.device.type == "cuda":
        by_format, head = {"bf16": plan.report.weight_bytes}, ("bf16", 0)
    else:
        by_format, _, head = plan_formats(loaded, plan.report.weights)
    per_layer = 11 + 2 * bool(cfg.sandwich_norms)
    return PlanCost(
        engine.model_name,
        by_format,
        cfg.num_layers,
        cfg.q_size,
        per_layer * cfg.num_layers + 2,
        {n: count_step_ops(engine, n) for n in live},
        head,
    )


def count_step_ops(engine, live: int) -> int:
    """Torch calls of one engine decode step with `live` requests running (counted, not timed)."""
    from torch.overrides import TorchFunctionMode

    from metronome.config import SamplingParams

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    prompt = engine.encode_prompt("Count the ops of one step.", chat=False)
    reqs = [engine.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True), lambda d: None) for _ in range(live)]
    engine.step()  # admission and prefill
    with Count():
        engine.step()
    for r in reqs:
        engine.cancel(r)
    engine.step()  # the cancelled requests leave
    return Count.n


def predict_step_s(
    cost: PlanCost, terms: Terms, rows: int, positions: int, python_ops: int, head_rows: int | None = None
) -> float:
    """One plan call over `rows` token rows attending to `positions` cached positions on average, plus
    `python_ops` small ops around it; the head over `head_rows` rows (default all; a prompt needs one)."""

    def per_byte(fmt: str, m: int) -> float:
        return terms.per_byte(fmt if fmt in terms.seconds_per_byte else "Q8_0", m)

    matrices = sum(nbytes * per_byte(fmt, rows) for fmt, nbytes in cost.weight_bytes.items())
    matrices += cost.head[1] * per_byte(cost.head[0], rows if head_rows is None else head_rows)
    attention = rows * positions * cost.q_size * cost.layers * terms.attention_s
    return matrices + attention + cost.regions * terms.region_s + terms.wake_s + python_ops * terms.call_s


@dataclass(frozen=True)
class CalibrationRow:
    model: str
    what: str  # "decode, 1 live slot" | "decode, 8 live slots" | "prefill, 256-token prompt"
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
) -> tuple[Terms, list[CalibrationRow]]:
    """Predict `model`'s decode speed at each number of `live` slots and its prefill speed from `terms`
    and the compiled plan; with `measure`, also run the engine as `metronome bench --decode-only` does
    (median of 3 runs of 128 tokens per live request, after a warm-up) and a 256-token prompt."""
    from metronome.config import EngineConfig
    from metronome.engine import Engine
    from metronome.model.loader import load

    loaded = load(model)
    config = EngineConfig(slots=max(live), ctx=1024, threads=threads, spec_tokens=0, device=device)
    engine = Engine.from_model(model, config, loaded=loaded)
    _, samples, _ = plan_formats(loaded, engine.plan.report.weights)
    terms = measure_terms(threads, device=device, samples=samples)
    cost = plan_cost(engine, loaded, live)
    measured = {n: _measure_decode(engine, n) for n in live} if measure else {}
    prefill = _measure_prefill(engine) if measure else None
    if measure:
        terms = terms.mean(measure_terms(threads, device=device, samples=samples))
    rows = []
    for n in live:
        step = predict_step_s(cost, terms, n, DECODE_POSITION, cost.engine_ops[n])
        rows.append(
            CalibrationRow(cost.model, f"decode, {n} live slot{'s' if n > 1 else ''}", 1 / step, measured.get(n))
        )
    step = predict_step_s(cost, terms, PREFILL_TOKENS, PREFILL_TOKENS // 2, cost.engine_ops[min(live)], head_rows=1)
    rows.append(CalibrationRow(cost.model, f"prefill, {PREFILL_TOKENS}-token prompt", PREFILL_TOKENS / step, prefill))
    return terms, rows


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
        f"{terms.call_s * 1e6:.1f} us; pool region {terms.region_s * 1e6:.1f} us; pool wake-up {terms.wake_s * 1e6:.0f} us\n\n"
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
    bits = {"Q4X4": 5.0, "Q8_0": 8.5, "bf16": 16.0, "Q8_0 (file)": 8.5, "Q5_0 (file)": 5.5, "Q5_1 (file)": 6.0}
    bits |= {"Q4_K (file)": 4.5, "Q5_K (file)": 5.5, "Q6_K (file)": 6.5625}
    return 8 / bits.get(fmt, 8.0)
