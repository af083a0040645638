"""Compile a loaded model into a static plan: weights in their run-time format, the KV cache of every
slot allocated once, the decode step's shape fixed, and its latency measured before serving.

The decode shape. A fixed M = slots rows every step makes each row's result independent of the
others by construction (the same kernels, same shapes, every step). Where every matmul kernel is
also invariant to the number of rows (bitwise: checked here, at compile time, on the real weights),
the plan may instead run only the live rows ("compact"), which is much faster for a lone user on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import median
from typing import Callable

import torch

from metronome.config import EngineConfig, ModelConfig
from metronome.loader import LoadedModel, QuantTensor
from metronome.model import KVCache, Rows, Transformer, build_model
from metronome.kernels import CppOps, KernelBuildError, Ops, TorchOps, load_kernels
from metronome.model import use_ops
from metronome.quant import Int4Linear, Int8Linear, Q8Linear, quantize

# Run-time weight formats -> activation dtype. int4/int8 are weight-only (quant.py) with bf16 activations.
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

    def tokens_per_s(self, live: int) -> float:
        return 1000.0 / self.step_ms[live] if live in self.step_ms else float("nan")


class Plan:
    """The compiled model: `prefill` one request into its slot, `decode` one token for the live slots."""

    def __init__(self, model: Transformer, cfg: ModelConfig, config: EngineConfig, weights: str, dtype: torch.dtype) -> None:
        self.model, self.cfg, self.config = model, cfg, config
        self.device = torch.device(config.device)
        self.weights = weights
        self.dtype = dtype
        self.cache = KVCache.allocate(cfg, config.slots, config.ctx, dtype, self.device)
        S = config.slots
        # Static step inputs: filled in place each step.
        self._tokens = torch.zeros(S, 1, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(S, 1, dtype=torch.long, device=self.device)
        self._slot_ids = torch.arange(S, dtype=torch.long, device=self.device)  # constant: row b is slot b
        self._row_slots = torch.zeros(S, dtype=torch.long, device=self.device)  # compact: slot of each row
        self.decode_mode = "fixed"
        self.report: PlanReport | None = None

    # -- the two operations the engine runs ----------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into `slot` from position 0; logits of its last position (V,) float32."""
        T = len(ids)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(T, device=self.device)[None]
        rows = Rows((0,), (slot,), (0,))
        logits = self.model(tokens, positions, self.cache, rows, self._slot_ids[slot : slot + 1], all_logits=all_logits)
        return logits[0]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each live slot (slots ascending): logits (len(slots), V) float32, in `slots` order."""
        n = len(slots)
        if self.decode_mode == "compact":
            self._tokens[:n, 0] = torch.tensor(tokens)
            self._positions[:n, 0] = torch.tensor(positions)
            self._row_slots[:n] = torch.tensor(slots)
            rows = Rows(tuple(range(n)), tuple(slots), tuple(positions))
            return self.model(self._tokens[:n], self._positions[:n], self.cache, rows, self._row_slots[:n])
        # fixed: every slot is a row (row b is slot b); idle rows run on token 0 at position 0 of their own slot
        self._tokens.zero_()
        self._positions.zero_()
        index = torch.tensor(slots, device=self.device)
        self._tokens[index, 0] = torch.tensor(tokens, device=self.device)
        self._positions[index, 0] = torch.tensor(positions, device=self.device)
        rows = Rows(tuple(slots), tuple(slots), tuple(positions))
        return self.model(self._tokens, self._positions, self.cache, rows, self._slot_ids)[index]


# ---------------------------------------------------------------------------------------------


DEFAULT_CTX = 2048


def default_ctx(cfg: ModelConfig, requested: int | None) -> int:
    """The context a plan holds: as requested, else 2048 or the model's own context if that is shorter."""
    return requested if requested is not None else min(DEFAULT_CTX, cfg.max_position)


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
                 progress: Callable[[str], None] | None = None) -> Plan:
    """Build the model in its run-time format, allocate everything, choose the decode shape, time it."""
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
    say(f"building {cfg.arch} with {weights} weights")
    dense = {k: (v.dequantize() if isinstance(v, QuantTensor) else v) for k, v in loaded.weights.items()}
    model = build_model(cfg, dense, config.ctx, dtype, config.device)
    del dense
    ops, kernels = _choose_ops(config, say)
    use_ops(model, ops)
    if weights in ("int4", "int8"):
        say(f"packing {weights} weights")
        quantize(model, loaded.weights, weights, q8_ops=ops if isinstance(ops, CppOps) else None)
    plan = Plan(model, cfg, config, weights, dtype)
    say("checking batch invariance of the decode step")
    plan.decode_mode, invariance = _choose_decode_mode(plan)
    step_ms = _calibrate(plan) if calibrate else {}
    plan.report = PlanReport(
        weights=weights,
        device=config.device,
        slots=config.slots,
        ctx=config.ctx,
        decode_mode=plan.decode_mode,
        weight_bytes=_weight_bytes_per_step(model),
        kv_cache_bytes=plan.cache.nbytes(),
        step_ms=step_ms,
        invariance=invariance,
        kernels=kernels,
    )
    return plan


def _choose_ops(config: EngineConfig, say: Callable[[str], None]) -> tuple[Ops, str]:
    """The C++ kernels on CPU when they build (config.kernels auto/cpp), else the torch reference ops."""
    if config.kernels not in ("auto", "cpp", "torch"):
        raise PlanError(f"kernels={config.kernels!r}: choose auto, cpp or torch")
    if config.kernels == "torch" or config.device != "cpu":
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
