"""Compile a loaded model into a static plan: weights in their run-time format, the KV cache of every
slot allocated once, the decode step's shape fixed, and its latency measured before serving.

Two ways to run a plan:
- fused (CPU, int4/int8 weights, the C++ kernels): `FusedModel`, every layer of a step in one C++ call
  over token rows, weights in block formats (packed Q4 / Q8_0). Every row is independent of the others
  by construction, so a step runs exactly the live rows, and prompts and drafted tokens are rows too.
- torch (any device and weight format): the `Transformer` of model.py with weight-only quantized
  linears (quant.py) and optional C++ glue ops.

The torch path's decode shape. A fixed M = slots rows every step makes each row's result independent of
the others by construction (the same kernels, same shapes, every step). Where every matmul kernel is
also invariant to the number of rows (bitwise: checked here, at compile time, on the real weights),
the plan may instead run only the live rows ("compact"), which is much faster for a lone user on CPU.
The same probe checks the fused decoder.

A calibrated plan is cached on disk (`plan_cache_path`): the next compile of the same file with the same
settings reads the packed weights, decode shape and latencies back instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch

from metronome.config import EngineConfig, ModelConfig
from metronome.kernels import CppOps, KernelBuildError, Ops, StaticOps, TorchOps, build_directory, dequantize_q8_0, load_kernels
from metronome.loader import LoadedModel, QuantTensor, Weight
from metronome.model import FUSED, KVCache, Rope, Rows, Transformer, build_model, use_ops
from metronome import quant
from metronome.quant import Int4Linear, Int8Linear, Q8Linear, block_matrix, dense, quantize

# Run-time weight formats -> activation and KV-cache dtype. int4/int8 are weight-only (quant.py) with bf16
# activations on the torch path; the fused decoder keeps activations in float32 and the cache in this dtype.
_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}


class PlanError(ValueError):
    """A plan setting that cannot work (a named parameter and what to do)."""


@dataclass(frozen=True)
class PlanReport:
    weights: str  # resolved weight format
    device: str
    slots: int
    ctx: int
    decode_mode: str  # "fixed" or "compact"
    weight_bytes: int  # bytes of weights read by one decode step (every matrix once, plus one embedding row)
    kv_cache_bytes: int
    step_ms: dict[int, float] = field(default_factory=dict)  # measured median step latency by live rows
    invariance: str = ""
    kernels: str = ""  # which ops run the glue (and why, when the C++ kernels were not used)
    cached: bool = False  # read from the plan cache (no packing, probe or calibration this time)

    def tokens_per_s(self, live: int) -> float:
        return 1000.0 / self.step_ms[live] if live in self.step_ms else float("nan")


PREFILL_CHUNK = 256  # token rows per call of the fused decoder


class FusedModel:
    """The model compiled for the CPU: every layer of a step in one call to the C++ `Decoder`
    (csrc/kernels.cpp), weights in block formats (quant.block_matrix), activations in float32.

    Works on token rows: row r is one token of slot slots[r] at position positions[r]. A decode step is
    one row per live slot, a prompt is its tokens as rows of one slot, a drafted continuation being
    verified is several rows of one slot; every row's result is independent of the others (the kernels
    are row-independent), so all three give bitwise the same values for the same token."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Weight], cache: KVCache, mode: str, ops: CppOps,
                 packed: list[tuple[torch.Tensor, int]] | None = None) -> None:
        """`packed`: the block matrices of an earlier build of the same model and mode (the plan cache)."""
        self.cfg, self.ops = cfg, ops
        self.matrices: list[tuple[torch.Tensor, int]] = []  # every block matrix, in build order
        attn_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.decoder = ops.decoder(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                   cfg.rms_norm_eps, attn_scale, cfg.activation == "gelu_tanh", cache.k, cache.v)
        self.weight_bytes = 0

        def matrix(*names: str) -> tuple[torch.Tensor, int]:
            if packed is not None:
                blocks, kind = packed[len(self.matrices)]
            else:
                blocks, kind, _rows = block_matrix([weights[n] for n in names], mode)
            self.weight_bytes += blocks.nbytes
            self.matrices.append((blocks, kind))
            return blocks, kind

        def vector(name: str) -> torch.Tensor | None:
            if name not in weights:
                return None
            return dense(weights[name]).contiguous()  # the decoder holds a reference to what it is given

        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            qkv = matrix(*(p + f"{n}.weight" for n in FUSED["wqkv"]))
            bias = torch.cat([dense(weights[p + f"{n}.bias"]) for n in FUSED["wqkv"]]) if cfg.qkv_bias else None
            if bias is not None:
                self.weight_bytes += bias.nbytes
            window = cfg.sliding_window if cfg.is_sliding(i) else None
            self.decoder.add_layer(
                *qkv, bias, *matrix(p + "wo.weight"), *matrix(*(p + f"{n}.weight" for n in FUSED["w_gate_up"])),
                *matrix(p + "w_down.weight"), vector(p + "attn_norm.weight"), vector(p + "mlp_norm.weight"),
                vector(p + "post_attn_norm.weight"), vector(p + "post_mlp_norm.weight"), vector(p + "q_norm.weight"),
                vector(p + "k_norm.weight"), window or 0, window is not None and cfg.rope_local_theta is not None)
        self.norm = vector("norm.weight")
        head = "head.weight" if "head.weight" in weights else "embed.weight"  # tied
        self.head, self.head_kind = matrix(head)
        self.embed = weights["embed.weight"]
        if isinstance(self.embed, QuantTensor) and self.embed.qtype == "Q8_0":
            self._embed_q8 = torch.from_numpy(np.array(self.embed.raw)).reshape(cfg.vocab_size, -1)
        elif isinstance(self.embed, QuantTensor):
            self._embed_q8 = None
        else:
            self._embed_q8, self.embed = None, self.embed.float()
        self.weight_bytes += self._embed_row_bytes()
        self.rope = Rope(cfg, cfg.rope_theta, cache.ctx)
        self.rope_local = Rope(cfg, cfg.rope_local_theta, cache.ctx, apply_scaling=False) if cfg.rope_local_theta else self.rope

    def _embed_row_bytes(self) -> int:
        e = self.embed
        if isinstance(e, QuantTensor):
            return int(np.asarray(e.raw).nbytes // self.cfg.vocab_size)
        return e[0].nbytes

    def _embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(M,) token ids -> (M, D) float32 embeddings, dequantized exactly from the file's rows."""
        if self._embed_q8 is not None:
            x = dequantize_q8_0(self._embed_q8[tokens])
        elif isinstance(self.embed, QuantTensor):
            rows = np.asarray(self.embed.raw)[tokens.numpy()]
            x = QuantTensor(rows, self.embed.qtype, (len(tokens), self.cfg.hidden_size)).dequantize()
        else:
            x = self.embed[tokens]
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        return x.contiguous()

    def hidden(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, slots, positions (M,) int64 -> the last layer's output (M, D) float32; writes the cache.
        Many rows (a prompt) run in chunks of PREFILL_CHUNK: bounded scratch, and the same bits (rows are
        independent; a later chunk attends to the earlier ones through the cache)."""
        x = self._embed_rows(tokens)  # (M, D)
        for lo in range(0, len(tokens), PREFILL_CHUNK):
            rows = slice(lo, lo + PREFILL_CHUNK)
            pos = positions[rows]
            cos, sin = self.rope.cos[pos], self.rope.sin[pos]  # (m, Dh) each
            cos_l, sin_l = (self.rope_local.cos[pos], self.rope_local.sin[pos]) if self.rope_local is not self.rope else (cos, sin)
            self.decoder.forward(x[rows], slots[rows], pos, cos, sin, cos_l, sin_l)  # row slices: contiguous views
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, D) hidden rows -> (M, V) float32 logits."""
        h = self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        logits = self.ops.block_linear(h, self.head, self.head_kind, self.cfg.vocab_size)
        if self.cfg.final_logit_softcap:
            logits = torch.tanh(logits / self.cfg.final_logit_softcap) * self.cfg.final_logit_softcap
        return logits


class Plan:
    """The compiled model: `prefill` one request into its slot, `decode` one token for the live slots."""

    def __init__(self, model: Transformer | None, cfg: ModelConfig, config: EngineConfig, weights: str, dtype: torch.dtype,
                 cache: KVCache | None = None, fused: FusedModel | None = None) -> None:
        self.model, self.cfg, self.config = model, cfg, config
        self.fused = fused
        self.device = torch.device(config.device)
        self.weights = weights
        self.dtype = dtype
        self.cache = cache or KVCache.allocate(cfg, config.slots, config.ctx, dtype, self.device)
        S = config.slots
        # Static step inputs: filled in place each step.
        self._tokens = torch.zeros(S, 1, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(S, 1, dtype=torch.long, device=self.device)
        self._slot_ids = torch.arange(S, dtype=torch.long, device=self.device)  # constant: row b is slot b
        self._row_slots = torch.zeros(S, dtype=torch.long, device=self.device)  # compact: slot of each row
        self.decode_mode = "fixed"
        self.graphs: dict[int, CudaGraph] = {}  # captured decode steps by row count (CUDA)
        self.report: PlanReport | None = None

    # -- the two operations the engine runs ----------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into `slot` from position 0; logits of its last position (V,) float32."""
        T = len(ids)
        if self.fused is not None:
            x = self.fused.hidden(torch.tensor(ids), torch.full((T,), slot), torch.arange(T))
            return self.fused.logits(x) if all_logits else self.fused.logits(x[-1:])[0]
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(T, device=self.device)[None]
        rows = Rows((0,), (slot,), (0,))
        logits = self.model(tokens, positions, self.cache, rows, self._slot_ids[slot : slot + 1], all_logits=all_logits)
        return logits[0]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each live slot (slots ascending): logits (len(slots), V) float32, in `slots` order.
        A fused plan takes any rows: a slot may appear several times at consecutive positions (drafts to verify)."""
        n = len(slots)
        if self.fused is not None:  # row-independent by construction: live rows only
            return self.fused.logits(self.fused.hidden(torch.tensor(tokens), torch.tensor(slots), torch.tensor(positions)))
        if self.decode_mode == "compact":
            self._tokens[:n, 0] = torch.tensor(tokens)
            self._positions[:n, 0] = torch.tensor(positions)
            self._row_slots[:n] = torch.tensor(slots)
            return self._run_static(n)
        # fixed: every slot is a row (row b is slot b); idle rows run on token 0 at position 0 of their own slot
        self._tokens.zero_()
        self._positions.zero_()
        index = torch.tensor(slots, device=self.device)
        self._tokens[index, 0] = torch.tensor(tokens, device=self.device)
        self._positions[index, 0] = torch.tensor(positions, device=self.device)
        return self._run_static(self.config.slots)[index]

    def _static_step(self, n: int) -> torch.Tensor:
        """The decode step on the static input buffers: rows 0..n-1 (compact) or every slot (fixed, n = slots).
        Shapes and addresses never change, so it can be captured as a CUDA graph."""
        slot_index = self._row_slots[:n] if self.decode_mode == "compact" else self._slot_ids
        return self.model(self._tokens[:n], self._positions[:n], self.cache, _NO_ROWS, slot_index)

    def _run_static(self, n: int) -> torch.Tensor:
        graph = self.graphs.get(n)
        return graph.replay() if graph is not None else self._static_step(n)

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """CUDA: capture the decode step once per row count it can run with (fixed: all slots; compact: 1..slots)."""
        counts = [self.config.slots] if self.decode_mode == "fixed" else range(1, self.config.slots + 1)
        self.graphs = {n: CudaGraph(lambda n=n: self._static_step(n)) for n in counts}


_NO_ROWS = Rows((), (), ())  # a decode step (T = 1) attends by slot_index and positions; Rows serve prefill


class CudaGraph:
    """One decode shape captured as a CUDA graph: `replay()` reruns every kernel of the step on whatever the
    static buffers hold, with no Python or launch overhead, and returns a copy of the logits."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph (allocator, library handles)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


# ---------------------------------------------------------------------------------------------


DEFAULT_CTX = 2048


def default_ctx(cfg: ModelConfig, requested: int | None) -> int:
    """The context a plan holds: as requested, else 2048 or the model's own context if that is shorter."""
    return requested if requested is not None else min(DEFAULT_CTX, cfg.max_position)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask): the fused decoder's default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_weights(loaded: LoadedModel, config: EngineConfig) -> str:
    """auto: bf16 on GPU; on CPU int4 when the file's matrices are Q4_0/Q4_1 blocks (exact), else int8."""
    if config.weights not in ("auto", *(_DTYPES)):
        raise PlanError(f"weights={config.weights!r}: choose one of auto, {', '.join(_DTYPES)}")
    cuda = config.device.startswith("cuda")
    if cuda and config.weights in ("int4", "int8"):
        raise PlanError(f"weights={config.weights!r} runs on CPU only for now; use --weights bf16 on cuda")
    if config.weights != "auto":
        return config.weights
    if cuda:
        return "bf16"
    q4 = sum(isinstance(w, QuantTensor) and w.qtype in ("Q4_0", "Q4_1") for w in loaded.weights.values())
    matrices = sum(len(w.shape) == 2 for w in loaded.weights.values())
    return "int4" if q4 * 2 > matrices else "int8"


def compile_plan(loaded: LoadedModel, config: EngineConfig, calibrate: bool = True,
                 progress: Callable[[str], None] | None = None, cache: bool = True) -> Plan:
    """Build the model in its run-time format, allocate everything, choose the decode shape, time it.

    With `cache`, a calibrated plan is saved on disk (see `plan_cache_path`) and a later compile of the
    same model file with the same settings on the same machine and code reads it back: packed weights,
    decode shape and step latencies, without packing, probing or calibrating again."""
    cfg = loaded.config
    if config.slots < 1:
        raise PlanError(f"slots={config.slots}: need at least 1 request slot")
    if not 16 <= config.ctx:
        raise PlanError(f"ctx={config.ctx}: the context must hold at least 16 tokens")
    if config.ctx > cfg.max_position:
        raise PlanError(f"ctx={config.ctx} is longer than the model's context ({cfg.max_position}); lower --ctx")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError(f"device={config.device!r} but no CUDA GPU is visible to torch; use --device cpu")
    if config.threads:
        torch.set_num_threads(config.threads)
    weights = resolve_weights(loaded, config)
    dtype = _DTYPES[weights]
    say = progress or (lambda _msg: None)
    ops, kernels = _choose_ops(config, say)
    why_not = _why_not_fused(cfg, config, weights, ops)
    if why_not is None:
        # The decoder computes on its own pool; torch keeps one thread for the small glue around it. Its OpenMP
        # team would otherwise spin between steps on the same cores (measured: 5 live rows took 16 ms, not 6.6).
        ops.set_threads(config.threads or available_cores())
        torch.set_num_threads(1)
    elif isinstance(ops, CppOps):
        ops.set_threads(config.threads or torch.get_num_threads())
    cache_path = plan_cache_path(loaded, config, weights, ops) if cache else None
    saved = _read_plan_cache(cache_path, say) if cache_path is not None else None
    if why_not is None:
        say(f"packing {weights} weights for the fused decoder" if saved is None else "reading the cached plan")
        kv = KVCache.allocate(cfg, config.slots, config.ctx, dtype, config.device)
        fused = FusedModel(cfg, loaded.weights, kv, weights, ops, packed=saved["matrices"] if saved else None)
        plan = Plan(None, cfg, config, weights, dtype, cache=kv, fused=fused)
        kernels = "cpp, fused decoder (every layer in one call)"
    else:
        say(f"building {cfg.arch} with {weights} weights")
        dense_weights = {k: dense(v) for k, v in loaded.weights.items()}
        model = build_model(cfg, dense_weights, config.ctx, dtype, config.device)
        del dense_weights
        use_ops(model, ops)
        if weights in ("int4", "int8"):
            say(f"packing {weights} weights")
            quantize(model, loaded.weights, weights, q8_ops=ops if isinstance(ops, CppOps) else None)
        plan = Plan(model, cfg, config, weights, dtype)
        if isinstance(ops, CppOps):
            kernels += f" ({why_not})"
    if saved is not None:
        plan.decode_mode, invariance, step_ms = saved["decode_mode"], saved["invariance"], saved["step_ms"]
        if plan.device.type == "cuda":
            plan.capture_graphs()
    else:
        say("checking batch invariance of the decode step")
        plan.decode_mode, invariance = _choose_decode_mode(plan)
        if plan.fused is not None and plan.decode_mode != "compact":  # the decoder's rows are independent by design
            raise RuntimeError(f"fused decoder failed its batch-invariance probe ({invariance}): a kernel bug, please report it")
        if plan.device.type == "cuda":
            say("capturing the decode step as CUDA graphs")
            plan.capture_graphs()
        step_ms = _calibrate(plan) if calibrate else {}
        if cache_path is not None and calibrate:
            _write_plan_cache(cache_path, plan, invariance, step_ms)
    plan.report = PlanReport(
        weights=weights,
        device=config.device,
        slots=config.slots,
        ctx=config.ctx,
        decode_mode=plan.decode_mode,
        weight_bytes=plan.fused.weight_bytes if plan.fused is not None else _weight_bytes_per_step(plan.model),
        kv_cache_bytes=plan.cache.nbytes(),
        step_ms=step_ms,
        invariance=invariance,
        kernels=kernels,
        cached=saved is not None,
    )
    return plan


PLAN_CACHE_VERSION = 1


def plan_cache_path(loaded: LoadedModel, config: EngineConfig, weights: str, ops: Ops) -> Path:
    """Where a plan is cached: $METRONOME_PLAN_CACHE/<key>.pt (default ~/.cache/metronome/plans).
    The key covers the model file (size, head and tail hash), every setting, the resolved weight format,
    the code that packs weights (quant.py, plan.py) and the kernel build (its source, torch, Python and
    this CPU; calibrated latencies belong to a machine, so its name too)."""
    key = hashlib.sha256()
    kernel_build = build_directory().name if isinstance(ops, CppOps) else "torch-ops"
    threads = config.threads or torch.get_num_threads()
    code = b"".join(Path(m.__file__).read_bytes() for m in (quant, sys.modules[__name__]))
    for part in (PLAN_CACHE_VERSION, loaded.fingerprint(), repr(config), weights, kernel_build, threads, torch.__version__,
                 platform.node(), hashlib.sha256(code).hexdigest()):
        key.update(str(part).encode())
        key.update(b"\0")
    root = Path(os.environ.get("METRONOME_PLAN_CACHE") or Path.home() / ".cache" / "metronome" / "plans")
    return root / f"{key.hexdigest()[:24]}.pt"


def _read_plan_cache(path: Path, say: Callable[[str], None]) -> dict | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, mmap=True)  # pages come in as the decoder first reads them
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # damaged: compile afresh
        say(f"ignoring an unreadable cached plan {path}: {exc}")
        return None
    return saved if isinstance(saved, dict) and saved.get("version") == PLAN_CACHE_VERSION else None


def _write_plan_cache(path: Path, plan: Plan, invariance: str, step_ms: dict[int, float]) -> None:
    """Atomically (write, then rename): a concurrent reader sees the old file or the new one."""
    saved = {"version": PLAN_CACHE_VERSION, "decode_mode": plan.decode_mode, "invariance": invariance,
             "step_ms": step_ms, "matrices": plan.fused.matrices if plan.fused is not None else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)


def _why_not_fused(cfg: ModelConfig, config: EngineConfig, weights: str, ops: Ops) -> str | None:
    """None when the fused C++ decoder can run this plan, else the reason (shown in the report)."""
    if not isinstance(ops, CppOps):
        return "the fused decoder needs the C++ kernels"
    if weights not in ("int4", "int8"):
        return f"the fused decoder runs block-quantized weights (int4/int8), not {weights}"
    dims = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "q_size": cfg.q_size}
    odd = [f"{k}={v}" for k, v in dims.items() if v % 32]
    if odd or cfg.head_dim % 16:
        return f"the fused decoder needs multiples of 32 (blocks) and a head_dim multiple of 16: {', '.join(odd) or cfg.head_dim}"
    return None


def _choose_ops(config: EngineConfig, say: Callable[[str], None]) -> tuple[Ops, str]:
    """The C++ kernels on CPU when they build (config.kernels auto/cpp), else the torch reference ops."""
    if config.kernels not in ("auto", "cpp", "torch"):
        raise PlanError(f"kernels={config.kernels!r}: choose auto, cpp or torch")
    if config.device != "cpu":
        return StaticOps(), "torch, static shapes (CUDA graphs)"
    if config.kernels == "torch":
        return TorchOps(), "torch"
    say("building C++ kernels (once per machine)")
    try:
        return load_kernels(), "cpp"
    except KernelBuildError as exc:
        if config.kernels == "cpp":
            raise PlanError(f"kernels='cpp' but they cannot be used here: {exc}") from exc
        return TorchOps(), f"torch (C++ kernels unavailable: {exc})"


def _choose_decode_mode(plan: Plan) -> tuple[str, str]:
    """'compact' if each row's logits are bitwise the same whether 1 or all slots are live, else 'fixed'."""
    S = plan.config.slots
    if S == 1:
        return "compact", "one slot: nothing shares the batch"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, plan.cfg.vocab_size, (S,), generator=g).tolist()
    positions = [3 + 2 * s for s in range(S)]
    plan.decode_mode = "compact"
    together = plan.decode(list(range(S)), tokens, positions)
    for s in range(S):
        alone = plan.decode([s], [tokens[s]], [positions[s]])
        if not torch.equal(alone[0], together[s]):
            return "fixed", f"rows differ between 1 and {S} live slots (slot {s}): fixed shape M={S}"
    return "compact", f"bitwise identical for 1 and {S} live slots: compact rows"


def _calibrate(plan: Plan, steps: int = 5) -> dict[int, float]:
    """Median decode-step latency (ms) at each number of live slots."""
    S, ctx = plan.config.slots, plan.config.ctx
    pos = min(64, ctx - 1)
    out = {}
    for live in range(1, S + 1):
        slots = list(range(live))
        plan.decode(slots, [1] * live, [pos] * live)  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            plan.decode(slots, [1] * live, [pos] * live)
            if plan.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        out[live] = median(times)
    return out


def _weight_bytes_per_step(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every linear layer's matrix, plus one embedding row."""
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear, Q8Linear)):
            total += m.nbytes
        elif isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.nbytes + (m.bias.nbytes if m.bias is not None else 0)
    emb = model.embed.weight
    return total + emb[0].nbytes
