"""The LPU compiler: partition a model over SRAM-only chips and emit the static schedule of one decode step.

Layout: a pipeline of stages over consecutive layers; inside a stage, `tp` chips of one fully connected node
split every matrix (tensor parallel). Every weight and KV-cache byte stays in SRAM. The timing of a step is
read off the schedule the builder lays out (schedule.py), never estimated separately.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import lru_cache

from metronome.fleet.catalog import Hardware, HardwareKind
from metronome.fleet.ops import Exchange, Offload, Op, Pattern, Step, embed_program, head_program, layer_program
from metronome.fleet.schedule import GPU_PID, ScheduleBuilder, to_chrome_trace
from metronome.fleet.shapes import ModelShape

TOKEN_ID_BYTES = 4


@dataclass(frozen=True)
class GpuAttention:
    """Hybrid fleet: the attention core (and the KV cache) lives on `gpus` GPUs reached over a PCIe link."""

    hardware: Hardware
    gpus: int
    bandwidth_efficiency: float
    link_bandwidth: float
    link_latency_s: float


@dataclass(frozen=True)
class LpuOptions:
    weight_bits: int = 8
    kv_bits: int = 16
    act_bytes: int = 2  # fp16 activations on the wire
    context: int = 4096  # cached positions per sequence (prompt + output)
    batch: int = 1  # sequences per micro-batch
    prompt: int = 0  # for TTFT (0: just one step)
    attention: GpuAttention | None = None


@dataclass(frozen=True)
class Partition:
    tp: int  # chips per stage (tensor parallel)
    layers: tuple[int, ...]  # layers held by each pipeline stage

    @property
    def stages(self) -> int:
        return len(self.layers)

    @property
    def chips(self) -> int:
        return self.tp * self.stages

    def stage_layers(self, s: int) -> range:
        start = sum(self.layers[:s])
        return range(start, start + self.layers[s])


@dataclass(frozen=True)
class _Pass:
    """What one pass through the pipeline carries."""

    rows: int  # token rows per micro-batch
    seqs: int  # distinct sequences (KV caches) among them
    positions: int  # cached positions attended to


@dataclass(frozen=True)
class StepTiming:
    stage_s: tuple[float, ...]  # each stage's own time (embedding / head included at the ends)
    hop_s: float  # stage -> next stage
    loopback_s: float  # sampled token back to stage 0

    @property
    def total_s(self) -> float:
        n = len(self.stage_s)
        return sum(self.stage_s) + self.hop_s * (n - 1) + (self.loopback_s if n > 1 else 0.0)

    @property
    def interval_s(self) -> float:
        """The pipeline's beat: its slowest stage plus its outgoing transfer."""
        return max(self.stage_s) + (self.hop_s if len(self.stage_s) > 1 else 0.0)


@dataclass(frozen=True)
class LpuPlan:
    hardware: Hardware
    shape: ModelShape
    options: LpuOptions
    partition: Partition
    decode: StepTiming
    max_users: int  # sequences whose KV fits alongside the weights
    micro_batches: int  # in flight in the pipeline
    ttft_s: float
    prefill_tokens_per_s: float
    shared_busy_s: float = 0.0  # hybrid: GPU-side time per micro-batch step, shared by every stage

    @property
    def chips(self) -> int:
        return self.partition.chips

    @property
    def period_s(self) -> float:
        """Time between two tokens of one sequence with the pipeline as full as planned: the step itself,
        or the pipeline beat times the micro-batches in flight, or the shared GPU side (hybrid), if longer."""
        m = self.micro_batches
        return max(self.decode.total_s, m * self.decode.interval_s, m * self.shared_busy_s)

    @property
    def per_user_tokens_per_s(self) -> float:
        return 1.0 / self.period_s

    @property
    def aggregate_tokens_per_s(self) -> float:
        return self.micro_batches * self.options.batch / self.period_s

    @property
    def power_w(self) -> float:
        return self.chips * self.hardware.power_w


def _check(hw: Hardware, opts: LpuOptions) -> None:
    if hw.kind is not HardwareKind.LPU:
        raise ValueError(f"target {hw.name!r} is a {hw.kind.value}, not an LPU; pick an LPU target (e.g. tsp-v1)")
    for name in ("weight_bits", "kv_bits", "act_bytes", "context", "batch"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name}={getattr(opts, name)} must be at least 1")
    if hw.node_size - 1 + 2 > hw.links:
        raise ValueError(f"{hw.name}: {hw.links} links cannot connect a node of {hw.node_size} plus 2 pipeline links")


# ---- timing of steps on one tensor-parallel group -------------------------------------------------------


def _op_time(op: Op, hw: Hardware, opts: LpuOptions, tp: int, p: _Pass) -> tuple[float, float]:
    """(duration, SRAM-read time) of `op` on one chip: fixed latency + the larger of moving and computing."""
    shard = 1 if op.replicated else tp
    read = (op.weights + op.gathered * p.rows) * opts.weight_bits / 8
    read += op.kv_reads * p.positions * p.seqs * opts.kv_bits / 8
    flops = (op.flops + op.kv_flops * p.positions) * p.rows
    sram = read / shard / hw.memory_bandwidth
    return hw.op_latency_s + max(sram, flops / shard / hw.matmul_flops), sram


def _exchange_phases(ex: Exchange, hw: Hardware, opts: LpuOptions, tp: int, p: _Pass) -> list[tuple[float, int]]:
    """[(duration, elems-divisor)] per phase. An all-reduce is direct (everyone sends its whole partial to
    everyone, one phase) or reduce-scatter + all-gather (two phases of 1/tp); the cheaper one is used."""
    if tp == 1:
        return []
    full = ex.elems * p.rows * opts.act_bytes
    if ex.pattern is Pattern.ALLGATHER:
        return [(hw.link_latency_s + full / tp / hw.link_bandwidth, tp)]
    direct = hw.link_latency_s + full / hw.link_bandwidth
    split = hw.link_latency_s + full / tp / hw.link_bandwidth
    return [(direct, 1)] if direct <= 2 * split else [(split, tp), (split, tp)]


def _offload_times(off: Offload, opts: LpuOptions, p: _Pass, lanes: int) -> tuple[float, float, float]:
    """(send, GPU, receive) seconds of one attention offload. Every LPU chip and every GPU has its own PCIe
    port, so a transfer spreads over `lanes` links in parallel."""
    ga = opts.attention
    if ga is None:
        raise ValueError("an attention offload step needs LpuOptions.attention (the GPU side)")
    bw = ga.link_bandwidth * lanes
    send = ga.link_latency_s + off.send_elems * p.rows * opts.act_bytes / bw
    recv = ga.link_latency_s + off.recv_elems * p.rows * opts.act_bytes / bw
    kv = off.kv_reads * p.positions * p.seqs * opts.kv_bits / 8
    g = ga.hardware
    gpu = max(
        kv / (ga.gpus * g.memory_bandwidth * ga.bandwidth_efficiency),
        off.kv_flops * p.positions * p.rows / (ga.gpus * g.matmul_flops * ga.bandwidth_efficiency),
    )
    return send, gpu, recv


def run_steps(
    b: ScheduleBuilder, steps: tuple[Step, ...], chips: range, hw: Hardware, opts: LpuOptions, p: _Pass
) -> None:
    """Lay `steps` out on the group `chips` (consecutive chips of one node)."""
    tp = len(chips)
    for step in steps:
        if isinstance(step, Op):
            dur, sram = _op_time(step, hw, opts, tp, p)
            b.op(chips, step.name, step.unit.value, dur, sram)
        elif isinstance(step, Exchange):
            pairs = [(a, c) for a in chips for c in chips if a != c]
            for dur, _ in _exchange_phases(step, hw, opts, tp, p):
                b.transfers(step.name, pairs, dur)
        else:
            lanes = min(tp, opts.attention.gpus) if opts.attention else 1
            b.offload(step.name, chips, *_offload_times(step, opts, p, lanes))


class Piece(enum.Enum):
    EMBED = "embed"
    LAYER = "layer"
    HEAD = "head"


def program(shape: ModelShape, piece: Piece, opts: LpuOptions) -> tuple[Step, ...]:
    if piece is Piece.EMBED:
        return embed_program(shape)
    if piece is Piece.HEAD:
        return head_program(shape)
    return layer_program(shape, offload_attention=opts.attention is not None)


@lru_cache(maxsize=8192)
def _group_time(shape: ModelShape, piece: Piece, hw: Hardware, opts: LpuOptions, tp: int, p: _Pass) -> float:
    """Makespan of one piece laid out on a fresh group of `tp` chips (what the full schedule repeats)."""
    b = ScheduleBuilder(tp)
    run_steps(b, program(shape, piece, opts), range(tp), hw, opts, p)
    return b.makespan()


def _hop_time(hw: Hardware, nbytes: float) -> float:
    return hw.link_latency_s + nbytes / hw.link_bandwidth


def step_timing(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions, p: _Pass) -> StepTiming:
    """Per-stage times of one pass, composed from the schedules of one layer / embedding / head (the full
    schedule repeats exactly these pieces; tests check the two agree)."""
    layer_s: dict[int, float] = {}
    for i in range(shape.config.num_layers):
        pos = shape.kv_positions(i, p.positions)
        if pos not in layer_s:
            layer_s[pos] = _group_time(shape, Piece.LAYER, hw, opts, part.tp, _Pass(p.rows, p.seqs, pos))
    per_layer = [layer_s[shape.kv_positions(i, p.positions)] for i in range(shape.config.num_layers)]
    embed = _group_time(shape, Piece.EMBED, hw, opts, part.tp, p)
    head = _group_time(shape, Piece.HEAD, hw, opts, part.tp, p)
    stages, start = [], 0
    for s, n in enumerate(part.layers):
        t = sum(per_layer[start : start + n]) + (embed if s == 0 else 0.0) + (head if s == part.stages - 1 else 0.0)
        stages.append(t)
        start += n
    hop = _hop_time(hw, shape.config.hidden_size * p.rows * opts.act_bytes)
    return StepTiming(tuple(stages), hop, _hop_time(hw, TOKEN_ID_BYTES * p.rows))


# ---- memory and partitioning -----------------------------------------------------------------------------


def _stage_fixed_bytes(shape: ModelShape, part: Partition, s: int, opts: LpuOptions) -> float:
    params = part.layers[s] * shape.layer_params_total()
    if s == 0:
        params += shape.embedding_params()
    if s == part.stages - 1 and not (s == 0 and shape.config.tie_embeddings):
        params += shape.head_params()
    return params * opts.weight_bits / 8 / part.tp


def max_users(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions) -> int:
    """Sequences of `opts.context` tokens whose KV cache fits in SRAM next to the weights (0: weights alone
    do not fit). KV-less hybrid plans (attention on a GPU) are limited by the GPU side instead."""
    users = 10**9
    for s in range(part.stages):
        free = hw.memory_bytes - _stage_fixed_bytes(shape, part, s, opts)
        if free < 0:
            return 0
        if opts.attention is None:
            per_user = shape.kv_bytes(opts.context, opts.kv_bits, part.stage_layers(s)) / part.tp
            users = min(users, int(free // per_user) if per_user > 0 else users)
    if opts.attention is not None:
        ga = opts.attention
        users = int(ga.gpus * ga.hardware.memory_bytes * 0.9 // shape.kv_bytes(opts.context, opts.kv_bits))
    return users


def distribute_layers(
    shape: ModelShape, stages: int, tp: int, embed_alone: bool = False, head_alone: bool = False
) -> Partition:
    """`stages` stages; the layer stages get floor or ceil(L / layer stages) layers, the longer ones in the
    middle so the ends keep room for the embedding and head tables. `embed_alone` / `head_alone` give those
    tables a stage of their own (for models whose first layer plus table overflows a group's SRAM)."""
    n = shape.config.num_layers
    k = stages - int(embed_alone) - int(head_alone)
    if not 1 <= k <= n:
        raise ValueError(f"stages={stages} leaves {k} stages for layers; need between 1 and the model's {n}")
    base, extra = divmod(n, k)
    order = sorted(range(k), key=lambda s: (s in (0, k - 1), s))
    layers = [base] * k
    for s in order[:extra]:
        layers[s] += 1
    return Partition(tp, tuple([0] * embed_alone + layers + [0] * head_alone))


def tp_degrees(hw: Hardware) -> list[int]:
    """Tensor-parallel group sizes: powers of two up to, and including, the node size."""
    out = [1]
    while out[-1] * 2 <= hw.node_size:
        out.append(out[-1] * 2)
    return sorted(set(out + [hw.node_size]))


def partitions(
    shape: ModelShape, hw: Hardware, opts: LpuOptions, max_chips: int | None = None, tp: int | None = None
) -> list[Partition]:
    """Every (tp, stages) layout within `max_chips` that holds the weights plus one micro-batch's KV."""
    cap = min(max_chips or hw.max_chips, hw.max_chips)
    out = []
    n = shape.config.num_layers
    for t in [tp] if tp else tp_degrees(hw):
        for stages in range(1, n + 3):
            if t * stages > cap:
                break
            for ends in ((False, False), (True, False), (False, True), (True, True)):
                if not 1 <= stages - sum(ends) <= n:
                    continue
                part = distribute_layers(shape, stages, t, *ends)
                if max_users(shape, hw, part, opts) >= opts.batch:
                    out.append(part)
                    break  # the first variant that fits (fewest dedicated stages) is enough
    return out


def min_chips(shape: ModelShape, hw: Hardware, opts: LpuOptions) -> int:
    """Fewest chips whose SRAM holds the weights and one micro-batch's KV cache."""
    _check(hw, opts)
    fits = partitions(shape, hw, opts)
    if not fits:
        raise ValueError(
            f"{shape.name} does not fit in {hw.max_chips} {hw.name} chips at {opts.weight_bits}-bit "
            f"weights and {opts.context} tokens of context; lower --weight-bits or --context"
        )
    return min(p.chips for p in fits)


# ---- plans -------------------------------------------------------------------------------------------------


def _prefill(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions) -> tuple[float, float]:
    """(TTFT, prefill tokens/s): the prompt streams through the pipeline in chunks; the chunk size that
    gives the first token soonest is chosen (steady-state tokens/s uses the best chunk too)."""
    n = opts.prompt
    if n <= 0:
        t = step_timing(shape, hw, part, opts, _Pass(1, 1, 1))
        return t.total_s, 1.0 / t.interval_s
    best_ttft, best_rate, c = math.inf, 0.0, n
    while True:
        t = step_timing(shape, hw, part, opts, _Pass(c, 1, max(1, n // 2)))
        best_ttft = min(best_ttft, t.total_s + (math.ceil(n / c) - 1) * t.interval_s)
        best_rate = max(best_rate, c / t.interval_s)
        if c == 1:
            return best_ttft, best_rate
        c = max(1, c // 2)


def plan_partition(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions) -> LpuPlan:
    """Time `part` for `opts`: decode step, pipelining (as many micro-batches as stages and SRAM allow), TTFT."""
    _check(hw, opts)
    users = max_users(shape, hw, part, opts)
    if users < opts.batch:
        raise ValueError(
            f"{shape.name} with {part.stages} stages x {part.tp} chips does not fit a batch of "
            f"{opts.batch} at {opts.context} tokens in {hw.name} SRAM; use more chips or a smaller "
            f"--context / batch"
        )
    p = _Pass(opts.batch, opts.batch, opts.context)
    decode = step_timing(shape, hw, part, opts, p)
    micro = max(1, min(part.stages, users // opts.batch))
    ttft, prefill_rate = _prefill(shape, hw, part, opts)
    return LpuPlan(hw, shape, opts, part, decode, users, micro, ttft, prefill_rate, _shared_busy(shape, opts, p))


def _shared_busy(shape: ModelShape, opts: LpuOptions, p: _Pass) -> float:
    """Hybrid only: one GPU group serves every layer of every stage; per micro-batch step its GPUs are busy
    with the attention, and their PCIe ports with the bytes (latencies overlap across micro-batches)."""
    ga = opts.attention
    if ga is None:
        return 0.0
    off = next(s for s in layer_program(shape, offload_attention=True) if isinstance(s, Offload))
    total = 0.0
    for i in range(shape.config.num_layers):
        pi = _Pass(p.rows, p.seqs, shape.kv_positions(i, p.positions))
        send, gpu, recv = _offload_times(off, opts, pi, ga.gpus)
        total += gpu + send + recv - 2 * ga.link_latency_s
    return total


def compile_lpu(
    shape: ModelShape, hw: Hardware, opts: LpuOptions, chips: int | None = None, tp: int | None = None
) -> LpuPlan:
    """The layout within `chips` (default: any) with the fastest decode step; ties go to fewer chips."""
    _check(hw, opts)
    fits = partitions(shape, hw, opts, chips, tp)
    if not fits:
        need = min_chips(shape, hw, opts)
        raise ValueError(
            f"{shape.name} needs at least {need} {hw.name} chips at {opts.weight_bits}-bit weights "
            f"and {opts.context} tokens of context; pass --chips {need} or more"
        )
    timed = [
        (step_timing(shape, hw, p, opts, _Pass(opts.batch, opts.batch, opts.context)).total_s, p.chips, p) for p in fits
    ]
    return plan_partition(shape, hw, min(timed, key=lambda x: (x[0], x[1]))[2], opts)


# ---- the full static schedule (for traces and for checking the composed timing) ------------------------


def build_schedule(plan: LpuPlan) -> ScheduleBuilder:
    """Every chip's timeline for one decode step of one micro-batch: compute, SRAM reads, link transfers."""
    shape, hw, part, opts = plan.shape, plan.hardware, plan.partition, plan.options
    b = ScheduleBuilder(part.chips)
    layer = program(shape, Piece.LAYER, opts)
    p = _Pass(opts.batch, opts.batch, opts.context)
    hop = _hop_time(hw, shape.config.hidden_size * p.rows * opts.act_bytes)
    for s in range(part.stages):
        group = range(s * part.tp, (s + 1) * part.tp)
        if s == 0:
            run_steps(b, embed_program(shape), group, hw, opts, p)
        for i in part.stage_layers(s):
            run_steps(b, layer, group, hw, opts, _Pass(p.rows, p.seqs, shape.kv_positions(i, p.positions)))
        if s == part.stages - 1:
            run_steps(b, head_program(shape), group, hw, opts, p)
        if s + 1 < part.stages:
            b.transfers(f"hop {s}->{s + 1}", [(c, c + part.tp) for c in group], hop)
    if part.stages > 1:
        last = range((part.stages - 1) * part.tp, part.chips)
        b.transfers("token loopback", [(c, c - last.start) for c in last], _hop_time(hw, TOKEN_ID_BYTES * p.rows))
    b.assert_no_contention()
    worst = max(b.links_used(c) for c in range(part.chips))
    if worst > hw.links:
        raise RuntimeError(f"schedule uses {worst} links on one chip; {hw.name} has {hw.links}")
    return b


def chrome_trace(plan: LpuPlan) -> dict:
    """The decode-step schedule as Chrome-trace JSON (pid per chip, tid per unit / outbound link)."""
    b = build_schedule(plan)
    labels = {c: f"{plan.hardware.name} chip {c} (stage {c // plan.partition.tp})" for c in range(plan.chips)}
    if plan.options.attention is not None:
        labels[GPU_PID] = f"{plan.options.attention.hardware.name} x{plan.options.attention.gpus} (attention)"
    return to_chrome_trace(b.events, labels)
