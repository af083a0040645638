"""The LPU compiler: partition a model over SRAM-only chips and emit the static schedule of one decode step.

Layout: a pipeline of stages over consecutive layers; inside a stage, `tp` chips of one fully connected node
split every matrix (tensor parallel). Every weight and KV-cache byte stays in SRAM. The timing of a step is
read off the schedule the builder lays out (schedule.py), never estimated separately.
"""

from __future__ import annotations

import enum
import heapq
import math
from dataclasses import dataclass, replace
from functools import lru_cache

from metronome.fleet.catalog import Hardware, HardwareKind
from metronome.fleet.ops import Exchange, Offload, Op, Pattern, Step, embed_program, head_program, layer_program
from metronome.fleet.schedule import GPU_PID, PIPELINE_PID, Contention, Event, Timeline, to_chrome_trace
from metronome.fleet.shapes import ModelShape, experts_touched

TOKEN_ID_BYTES = 4


@dataclass(frozen=True)
class GpuAttention:
    """Hybrid fleet: the attention core (and the KV cache) lives on `gpus` GPUs reached over a PCIe link."""

    hardware: Hardware
    gpus: int
    bandwidth_efficiency: float  # of the KV cache's reads, as a GPU decode step's (GpuCalibration)
    link_bandwidth: float
    link_latency_s: float
    flops_efficiency: float  # of the attention's FLOPs, as a GPU prefill step's (GpuCalibration)


@dataclass(frozen=True)
class LpuOptions:
    weight_bits: int = 8
    kv_bits: int = 16
    act_bytes: int = 2  # fp16 activations on the wire
    context: int = 4096  # cached positions per sequence (prompt + output)
    batch: int = 1  # sequences per micro-batch
    prompt: int = 0  # for TTFT (0: just one step)
    attention: GpuAttention | None = None
    stream_chunks: int = 4  # chunks a streamed op is split into (1: every step waits for the whole previous one)


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
class Pass:
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
    pipeline: Pipeline

    @property
    def chips(self) -> int:
        return self.partition.chips

    @property
    def period_s(self) -> float:
        """Time between two tokens of one sequence with the pipeline as full as planned, read off the
        scheduled pipeline (micro-batches in flight through the stages, links and the shared GPU side)."""
        return self.pipeline.period_s

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
    for name in ("weight_bits", "kv_bits", "act_bytes", "context", "batch", "stream_chunks"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name}={getattr(opts, name)} must be at least 1")
    if hw.node_size - 1 + 2 > hw.links:
        raise ValueError(f"{hw.name}: {hw.links} links cannot connect a node of {hw.node_size} plus 2 pipeline links")


# ---- laying out steps on one tensor-parallel group -------------------------------------------------------


def _op_work(op: Op, hw: Hardware, opts: LpuOptions, tp: int, p: Pass) -> tuple[float, float]:
    """(unit time, SRAM-read time) of `op`'s share on one chip, without the fixed op latency: the larger of
    moving its bytes and computing its FLOPs."""
    shard = 1 if op.replicated else tp
    weights = op.weights
    if op.routed is not None:  # the experts this step's rows touch, as the GPU model counts them
        experts, per_token = op.routed
        weights = round(op.weights / per_token * experts_touched(experts, per_token, p.rows))
    read = (weights + op.gathered * p.rows) * opts.weight_bits / 8
    read += (op.kv_reads * p.positions + op.kv_written) * p.seqs * opts.kv_bits / 8
    flops = (op.flops + op.kv_flops * p.positions) * p.rows
    sram = read / shard / hw.memory_bandwidth
    return max(sram, flops / shard / hw.matmul_flops), sram


def _phases(ex: Exchange, hw: Hardware, opts: LpuOptions, tp: int, p: Pass) -> list[float]:
    """Bytes each chip sends each peer, per phase. An all-reduce is direct (everyone sends its whole partial
    to everyone, one phase) or reduce-scatter + all-gather (two phases of 1/tp); the faster one is used."""
    if tp == 1:
        return []
    full = ex.elems * p.rows * opts.act_bytes
    if ex.pattern is Pattern.ALLGATHER:
        return [full / tp]
    direct = hw.link_latency_s + full / hw.link_bandwidth
    split = hw.link_latency_s + full / tp / hw.link_bandwidth
    return [full] if direct <= 2 * split else [full / tp, full / tp]


def _offload_work(off: Offload, opts: LpuOptions, p: Pass) -> tuple[float, float, float]:
    """(bytes sent, GPU seconds, bytes received) of one attention offload, for the whole group."""
    ga = opts.attention
    if ga is None:
        raise ValueError("an attention offload step needs LpuOptions.attention (the GPU side)")
    kv = off.kv_reads * p.positions * p.seqs * opts.kv_bits / 8
    g = ga.hardware
    gpu = max(
        kv / (ga.gpus * g.memory_bandwidth * ga.bandwidth_efficiency),
        off.kv_flops * p.positions * p.rows / (ga.gpus * g.matmul_flops * ga.flops_efficiency),
    )
    return off.send_elems * p.rows * opts.act_bytes, gpu, off.recv_elems * p.rows * opts.act_bytes


@dataclass
class _Chain:
    """Per chip: when each chunk of the last on-path step finished, and the axis it streamed along."""

    done: dict[int, list[float]]
    axis: str | None = None
    side_end: float = 0.0  # latest end of an off-path step

    def ready(self, chip: int, axis: str | None, j: int, n: int) -> float:
        prev = self.done[chip]
        if axis is not None and axis == self.axis and len(prev) == n:
            return prev[j]
        return max(prev)

    def end(self) -> float:
        return max(max(max(v) for v in self.done.values()), self.side_end)


def _chunks(axis: str | None, opts: LpuOptions) -> int:
    return opts.stream_chunks if axis is not None else 1


def run_steps(
    tl: Timeline,
    steps: tuple[Step, ...],
    chips: range,
    hw: Hardware,
    opts: LpuOptions,
    p: Pass,
    start: float,
    mirror: int = 0,
) -> float:
    """Lay `steps` out on the group `chips` (consecutive chips of one node) from `start`; returns when the
    group's last chip is done. Every op holds its unit, every transfer its directed link.

    `mirror` = tp > 1 lays out only the group's first chip (`chips` has one) and mirrors its peers: every
    chip of a group runs the same program at the same times, so what chip 0 receives from a peer lands when
    chip 0's own send to that peer does. The full schedule (every chip) must give the same times."""
    tp = mirror or len(chips)
    group = range(chips.start, chips.start + tp)
    chain = _Chain({c: [start] for c in chips})
    for step in steps:
        if isinstance(step, Op):
            n = _chunks(step.axis, opts)
            work, sram = _op_work(step, hw, opts, tp, p)
            done: dict[int, list[float]] = {}
            for c in chips:
                ends = []
                for j in range(n):
                    occupy = work / n + (hw.op_latency_s if j == 0 else 0.0)
                    t = tl.place(step.name, (("unit", c, step.unit.value),), chain.ready(c, step.axis, j, n), occupy)
                    tl.event(c, step.unit.value, step.name if n == 1 else f"{step.name}[{j}]", t, occupy, "compute")
                    if sram > 0 and j == 0:
                        tl.event(c, "sram", step.name, t, sram, "sram")
                    ends.append(t + occupy)
                done[c] = ends
            if step.off_path:
                chain.side_end = max(chain.side_end, max(max(v) for v in done.values()))
            else:
                chain.done, chain.axis = done, step.axis
        elif isinstance(step, Exchange):
            n = _chunks(step.axis, opts)
            phases = _phases(step, hw, opts, tp, p)
            if not phases:
                continue
            done = {c: [chain.ready(c, step.axis, j, n) for j in range(n)] for c in chips}
            for k, nbytes in enumerate(phases):
                occupy = nbytes / n / hw.link_bandwidth
                label = step.name if len(phases) == 1 else f"{step.name}.phase{k + 1}"
                nxt = {c: list(done[c]) for c in chips}
                for j in range(n):
                    for a in chips:
                        for b in group:
                            if a == b:
                                continue
                            t = tl.place(label, (("link", a, b),), done[a][j], occupy)
                            tl.event(a, f"link->{b}", label if n == 1 else f"{label}[{j}]", t, occupy, "transfer")
                            dest = a if mirror else b
                            nxt[dest][j] = max(nxt[dest][j], t + occupy + hw.link_latency_s)
                done = nxt
            chain.done, chain.axis = done, step.axis
        else:
            chain.done = _offload(tl, step, chips, tp, opts, p, chain)
            chain.axis = None
    return chain.end()


def _offload(tl: Timeline, off: Offload, chips: range, tp: int, opts: LpuOptions, p: Pass, chain: _Chain) -> dict:
    """Every chip sends its share of q/k/v over its own PCIe port to a GPU port (chip j of a group to port
    j mod g: a group wider than the GPU count shares ports), the GPUs compute once, results come back.
    Mirrored (one chip standing for `tp`): that chip holds its port for every chip sharing it."""
    ga = opts.attention
    sent, gpu_s, received = _offload_work(off, opts, p)
    share = math.ceil(tp / ga.gpus) if len(chips) < tp else 1
    arrive = 0.0
    for c in chips:
        port = (c - chips.start) % ga.gpus
        occupy = share * sent / tp / ga.link_bandwidth
        t = tl.place(f"{off.name}.send", (("pcie", "lpu-out", c), ("pcie", "gpu-in", port)), max(chain.done[c]), occupy)
        tl.event(c, "pcie", f"{off.name}.send", t, occupy, "transfer")
        arrive = max(arrive, t + occupy + ga.link_latency_s)
    t = tl.place(off.name, (("gpu",),), arrive, gpu_s)
    tl.event(GPU_PID, "gpu", off.name, t, gpu_s, "compute")
    back = t + gpu_s
    done = {}
    for c in chips:
        port = (c - chips.start) % ga.gpus
        occupy = share * received / tp / ga.link_bandwidth
        r = tl.place(f"{off.name}.recv", (("pcie", "gpu-out", port), ("pcie", "lpu-in", c)), back, occupy)
        tl.event(GPU_PID, f"pcie->{c}", f"{off.name}.recv", r, occupy, "transfer")
        done[c] = [r + occupy + ga.link_latency_s]
    return done


class Piece(enum.Enum):
    EMBED = "embed"
    LAYER = "layer"
    HEAD = "head"
    LAYER_BEFORE_GPU = "layer-before-gpu"  # hybrid: the layer up to its attention offload
    LAYER_AFTER_GPU = "layer-after-gpu"  # hybrid: the layer after the offload


def program(shape: ModelShape, piece: Piece, opts: LpuOptions) -> tuple[Step, ...]:
    if piece is Piece.EMBED:
        return embed_program(shape)
    if piece is Piece.HEAD:
        return head_program(shape)
    steps = layer_program(shape, offload_attention=opts.attention is not None)
    if piece is Piece.LAYER:
        return steps
    k = next(i for i, s in enumerate(steps) if isinstance(s, Offload))
    return steps[:k] if piece is Piece.LAYER_BEFORE_GPU else steps[k + 1 :]


@lru_cache(maxsize=8192)
def _group_time(shape: ModelShape, piece: Piece, hw: Hardware, opts: LpuOptions, tp: int, p: Pass) -> float:
    """Makespan of one piece laid out on a fresh group of `tp` chips (what the full schedule repeats)."""
    return run_steps(Timeline(record=False), program(shape, piece, opts), range(1), hw, opts, p, 0.0, mirror=tp)


def _hop_time(hw: Hardware, nbytes: float) -> float:
    return hw.link_latency_s + nbytes / hw.link_bandwidth


def step_timing(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions, p: Pass) -> StepTiming:
    """Per-stage times of one pass of one micro-batch through an otherwise idle pipeline, composed from the
    schedules of one layer / embedding / head (the full schedule repeats exactly these pieces, each starting
    after the previous one's last step; tests check the two agree)."""
    layer_s: dict[int, float] = {}
    for i in range(shape.config.num_layers):
        pos = shape.kv_positions(i, p.positions)
        if pos not in layer_s:
            layer_s[pos] = _group_time(shape, Piece.LAYER, hw, opts, part.tp, Pass(p.rows, p.seqs, pos))
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


def tp_degrees(hw: Hardware, shape: ModelShape) -> list[int]:
    """Tensor-parallel group sizes: powers of two up to, and including, the node size, that cut the model's
    KV heads (and so its query heads) evenly: the layer program has no exchange inside attention, so each
    chip must hold whole KV heads. (A KV head split over chips had each chip count a fraction of a cache it
    needs whole: Gemma 3 270M's one KV head at tp4 was counted 206 MB a chip where it needs 803 MB.)"""
    out = [1]
    while out[-1] * 2 <= hw.node_size:
        out.append(out[-1] * 2)
    return [t for t in sorted(set(out + [hw.node_size])) if cuts_heads(shape, t)]


def cuts_heads(shape: ModelShape, tp: int) -> bool:
    """`tp` chips each take whole KV heads and their query heads."""
    c = shape.config
    return c.num_kv_heads % tp == 0 and c.num_heads % tp == 0


def _check_heads(shape: ModelShape, tp: int) -> None:
    if not cuts_heads(shape, tp):
        raise ValueError(
            f"tp={tp} does not cut {shape.name}'s {shape.config.num_kv_heads} KV heads and "
            f"{shape.config.num_heads} query heads evenly; use a tp that divides both"
        )


def partitions(
    shape: ModelShape, hw: Hardware, opts: LpuOptions, max_chips: int | None = None, tp: int | None = None
) -> list[Partition]:
    """Every (tp, stages) layout within `max_chips` that holds the weights plus one micro-batch's KV."""
    cap = min(max_chips or hw.max_chips, hw.max_chips)
    out = []
    n = shape.config.num_layers
    for t in [tp] if tp else tp_degrees(hw, shape):
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


# ---- the pipeline: micro-batches in flight, scheduled ----------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One piece of a stage pass: hold `resources` for `occupy` seconds, the result lands `latency` later."""

    name: str
    resources: tuple[tuple, ...]
    occupy: float
    latency: float = 0.0


@dataclass(frozen=True)
class Pipeline:
    """The scheduled steady state of `micro_batches` micro-batches cycling through the pipeline."""

    period_s: float  # between two tokens of one sequence
    contention: tuple[Contention, ...]  # transfers that found their link (or port) busy
    micro_batches: int


GPU_VISITS = 8  # hybrid: GPU visits per pass through the whole pipeline in the pipeline schedule (at least
# one per stage): runs of consecutive layers of a stage go to the GPU together there, to keep the sweep fast


def _stage_segments(
    shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions, p: Pass, visits: int | None
) -> list[list[Segment]]:
    """Per stage, the segments of one pass of one micro-batch. Plain LPU: the stage's group (its own
    schedule, `step_timing`), then the hop to the next stage (or the token loopback). Hybrid: per layer (or
    per run of layers, at most `visits` per stage) the LPU part, the PCIe send, the shared GPU, the PCIe
    return and the rest of the layer; every stage's sends land on the same GPU ports."""
    timing = step_timing(shape, hw, part, opts, p)
    hop_bytes = shape.config.hidden_size * p.rows * opts.act_bytes
    out: list[list[Segment]] = []
    for s in range(part.stages):
        stage = ("stage", s)
        if opts.attention is None:
            segs = [Segment(f"stage {s}", (stage,), timing.stage_s[s])]
        else:
            segs = _hybrid_segments(shape, hw, part, opts, p, s, visits)
        if part.stages > 1:
            last = s == part.stages - 1
            nbytes = TOKEN_ID_BYTES * p.rows if last else hop_bytes
            link = ("link", f"stage {s}", f"stage {0 if last else s + 1}")
            name = "token loopback" if last else f"hop {s}->{s + 1}"
            segs.append(Segment(name, (link,), nbytes / hw.link_bandwidth, hw.link_latency_s))
        out.append(segs)
    return out


def _hybrid_segments(
    shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions, p: Pass, s: int, visits: int | None
) -> list[Segment]:
    ga = opts.attention
    off = next(x for x in layer_program(shape, offload_attention=True) if isinstance(x, Offload))
    layers = list(part.stage_layers(s))
    per = 1 if visits is None else max(1, math.ceil(len(layers) / max(1, visits // part.stages)))
    share = math.ceil(part.tp / ga.gpus)  # chips of one group per GPU port
    ports_in = tuple(("pcie", "gpu-in", k) for k in range(min(part.tp, ga.gpus)))
    ports_out = tuple(("pcie", "gpu-out", k) for k in range(min(part.tp, ga.gpus)))
    stage = ("stage", s)
    segs: list[Segment] = []
    if s == 0:
        segs.append(Segment("embed", (stage,), _group_time(shape, Piece.EMBED, hw, opts, part.tp, p)))
    for g in range(0, len(layers), per):
        run = layers[g : g + per]
        before = after = gpu = sent = received = 0.0
        for i in run:
            pi = Pass(p.rows, p.seqs, shape.kv_positions(i, p.positions))
            before += _group_time(shape, Piece.LAYER_BEFORE_GPU, hw, opts, part.tp, pi)
            after += _group_time(shape, Piece.LAYER_AFTER_GPU, hw, opts, part.tp, pi)
            snd, gpu_s, rcv = _offload_work(off, opts, pi)
            gpu, sent, received = gpu + gpu_s, sent + snd, received + rcv
        label = f"layers {run[0]}-{run[-1]}" if len(run) > 1 else f"layer {run[0]}"
        lat = len(run) * ga.link_latency_s  # a run of layers pays each layer's PCIe latency (same cycle time)
        up = share * sent / part.tp / ga.link_bandwidth
        down = share * received / part.tp / ga.link_bandwidth
        segs += [
            Segment(f"{label} before attention", (stage,), before),
            Segment(f"{label} q/k/v -> gpu", (("pcie", "lpu-out", s), *ports_in), up, lat),
            Segment(f"{label} attention@gpu", (("gpu",),), gpu),
            Segment(f"{label} attn -> lpu", (*ports_out, ("pcie", "lpu-in", s)), down, lat),
            Segment(f"{label} after attention", (stage,), after),
        ]
    if s == part.stages - 1:
        segs.append(Segment("head", (stage,), _group_time(shape, Piece.HEAD, hw, opts, part.tp, p)))
    return segs


def simulate_pipeline(
    stages: list[list[Segment]], micro_batches: int, rounds: int = 2, timeline: Timeline | None = None
) -> Pipeline:
    """Discrete-event list schedule of `micro_batches` micro-batches, all entering stage 0 at time 0 and
    cycling `rounds` times through `stages` (each a list of segments; a stage's last segment carries the
    result to the next stage, the last stage's back to the first). Segments run first come, first served
    on their resources, in the order their inputs become ready. The period is the mean time between a
    micro-batch's last two rounds (the first round fills the pipeline). `timeline`: also record every
    segment there (for the trace)."""
    if micro_batches < 1 or rounds < 1:
        raise ValueError(f"micro_batches={micro_batches} and rounds={rounds} must be at least 1")
    rounds = rounds if micro_batches > 1 else 1
    flat = [seg for segs in stages for seg in segs]
    keys: dict[tuple, int] = {}
    res = [tuple(keys.setdefault(r, len(keys)) for r in seg.resources) for seg in flat]
    links = [any(r[0] in ("link", "pcie") for r in seg.resources) for seg in flat]
    names = list(keys)
    free = [0.0] * len(keys)
    contention: list[Contention] = []
    done: list[list[float]] = [[] for _ in range(micro_batches)]
    heap = [(0.0, k, k, 0) for k in range(micro_batches)]  # (ready, tie-break, micro-batch, segment index)
    order, n = micro_batches, len(flat)
    while heap:
        ready, _, k, i = heapq.heappop(heap)
        at = i % n
        seg, rs = flat[at], res[at]
        start = ready
        for r in rs:
            if free[r] > start:
                start = free[r]
        if links[at] and start > ready + 1e-15:
            busy = next(names[r] for r in rs if names[r][0] in ("link", "pcie") and free[r] > ready + 1e-15)
            contention.append(Contention(busy, f"{seg.name} (micro-batch {k})", ready, start))
        end = start + seg.occupy
        for r in rs:
            free[r] = end
        if timeline is not None and seg.occupy > 0:
            for r in seg.resources:
                timeline.event(PIPELINE_PID, _pipeline_track(r), f"mb{k} {seg.name}", start, seg.occupy, "pipeline")
        end += seg.latency
        if at == n - 1:
            done[k].append(end)
            if len(done[k]) == rounds:
                continue
        order += 1
        heapq.heappush(heap, (end, order, k, i + 1))
    period = done[0][0] if rounds == 1 else sum(d[-1] - d[-2] for d in done) / micro_batches
    return Pipeline(period, tuple(contention), micro_batches)


def _pipeline_track(resource: tuple) -> str:
    if resource[0] == "stage":
        return f"stage {resource[1]}"
    if resource[0] == "link":
        return f"link {resource[1]}->{resource[2]}"
    return " ".join(str(x) for x in resource)


def schedule_pipeline(
    shape: ModelShape,
    hw: Hardware,
    part: Partition,
    opts: LpuOptions,
    micro_batches: int,
    timeline: Timeline | None = None,
    visits: int | None = GPU_VISITS,
) -> Pipeline:
    """The decode pipeline of `part` with `micro_batches` micro-batches of `opts.batch` in flight."""
    p = Pass(opts.batch, opts.batch, opts.context)
    return simulate_pipeline(_stage_segments(shape, hw, part, opts, p, visits), micro_batches, timeline=timeline)


# ---- plans -------------------------------------------------------------------------------------------------


def _prefill(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions) -> tuple[float, float]:
    """(TTFT, prefill tokens/s): the prompt streams through the pipeline in chunks; the chunk size that
    gives the first token soonest is chosen (steady-state tokens/s uses the best chunk too)."""
    n = opts.prompt
    if n <= 0:
        t = step_timing(shape, hw, part, opts, Pass(1, 1, 1))
        return t.total_s, 1.0 / t.interval_s
    best_ttft, best_rate, c = math.inf, 0.0, n
    while True:
        t = step_timing(shape, hw, part, opts, Pass(c, 1, max(1, n // 2)))
        best_ttft = min(best_ttft, t.total_s + (math.ceil(n / c) - 1) * t.interval_s)
        best_rate = max(best_rate, c / t.interval_s)
        if c == 1:
            return best_ttft, best_rate
        c = max(1, c // 2)


def plan_partition(shape: ModelShape, hw: Hardware, part: Partition, opts: LpuOptions) -> LpuPlan:
    """Time `part` for `opts`: decode step, pipelining (as many micro-batches as stages and SRAM allow), TTFT."""
    _check(hw, opts)
    _check_heads(shape, part.tp)
    users = max_users(shape, hw, part, opts)
    if users < opts.batch:
        raise ValueError(
            f"{shape.name} with {part.stages} stages x {part.tp} chips does not fit a batch of "
            f"{opts.batch} at {opts.context} tokens in {hw.name} SRAM; use more chips or a smaller "
            f"--context / batch"
        )
    p = Pass(opts.batch, opts.batch, opts.context)
    decode = step_timing(shape, hw, part, opts, p)
    micro = max(1, min(part.stages, users // opts.batch))
    ttft, prefill_rate = _prefill(shape, hw, part, opts)
    pipeline = schedule_pipeline(shape, hw, part, opts, micro)
    return LpuPlan(hw, shape, opts, part, decode, users, micro, ttft, prefill_rate, pipeline)


def compile_lpu(
    shape: ModelShape, hw: Hardware, opts: LpuOptions, chips: int | None = None, tp: int | None = None
) -> LpuPlan:
    """The layout within `chips` (default: any) with the fastest decode step; ties go to fewer chips."""
    _check(hw, opts)
    if tp is not None:
        _check_heads(shape, tp)
    fits = partitions(shape, hw, opts, chips, tp)
    if not fits:
        need = min_chips(shape, hw, opts)
        raise ValueError(
            f"{shape.name} needs at least {need} {hw.name} chips at {opts.weight_bits}-bit weights "
            f"and {opts.context} tokens of context; pass --chips {need} or more"
        )
    timed = [
        (step_timing(shape, hw, p, opts, Pass(opts.batch, opts.batch, opts.context)).total_s, p.chips, p) for p in fits
    ]
    return plan_partition(shape, hw, min(timed, key=lambda x: (x[0], x[1]))[2], opts)


# ---- the full static schedule (for traces and for checking the composed timing) ------------------------


def build_schedule(plan: LpuPlan) -> Timeline:
    """Every chip's timeline for one decode step of one micro-batch through an idle pipeline: units, SRAM
    reads, link and PCIe transfers (and the GPU side of a hybrid). Re-checked by `Timeline.verify`."""
    shape, hw, part, opts = plan.shape, plan.hardware, plan.partition, plan.options
    tl = Timeline()
    layer = program(shape, Piece.LAYER, opts)
    p = Pass(opts.batch, opts.batch, opts.context)
    hop = shape.config.hidden_size * p.rows * opts.act_bytes
    t = 0.0
    for s in range(part.stages):
        group = range(s * part.tp, (s + 1) * part.tp)
        if s == 0:
            t = run_steps(tl, embed_program(shape), group, hw, opts, p, t)
        for i in part.stage_layers(s):
            t = run_steps(tl, layer, group, hw, opts, Pass(p.rows, p.seqs, shape.kv_positions(i, p.positions)), t)
        if s == part.stages - 1:
            t = run_steps(tl, head_program(shape), group, hw, opts, p, t)
        if part.stages > 1:
            last = s == part.stages - 1
            nbytes = TOKEN_ID_BYTES * p.rows if last else hop
            name = "token loopback" if last else f"hop {s}->{s + 1}"
            dest = 0 if last else (s + 1) * part.tp
            arrive = t
            for c in group:
                d = dest + (c - group.start)
                occupy = nbytes / hw.link_bandwidth
                start = tl.place(name, (("link", c, d),), t, occupy)
                tl.event(c, f"link->{d}", name, start, occupy, "transfer")
                arrive = max(arrive, start + occupy + hw.link_latency_s)
            t = arrive
    tl.verify()
    worst = max(tl.links_used(c) for c in range(part.chips))
    if worst > hw.links:
        raise RuntimeError(f"schedule uses {worst} links on one chip; {hw.name} has {hw.links}")
    tl.makespan_s = t
    return tl


def chrome_trace(plan: LpuPlan, handoff: tuple[Event, ...] = ()) -> dict:
    """One decode step of one micro-batch, per chip and unit (pid per chip, tid per unit / outbound link),
    plus the pipeline with every micro-batch in flight (pid "pipeline": a track per stage, link and port).
    `handoff`: a prefill-gpu+decode-lpu candidate's KV hand-off events (GPU process; they precede decode)."""
    tl = build_schedule(plan)
    if handoff:
        shift = max(e.start_s + e.dur_s for e in handoff)
        tl.events = [replace(e, start_s=e.start_s + shift) for e in tl.events] + list(handoff)
    schedule_pipeline(plan.shape, plan.hardware, plan.partition, plan.options, plan.micro_batches, timeline=tl)
    labels = {c: f"{plan.hardware.name} chip {c} (stage {c // plan.partition.tp})" for c in range(plan.chips)}
    labels[PIPELINE_PID] = f"pipeline: {plan.micro_batches} micro-batches of {plan.options.batch} in flight"
    if plan.options.attention is not None:
        labels[GPU_PID] = f"{plan.options.attention.hardware.name} x{plan.options.attention.gpus} (attention)"
    elif handoff:
        labels[GPU_PID] = "prefill GPUs (KV hand-off)"
    return to_chrome_trace(tl.events, labels)
