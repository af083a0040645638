"""Compile a loaded model into a static plan, in named stages:

resolve    settings -> weight format, ops (C++ or torch), runner kind, threads   (checks every setting)
build      weights in their run-time format, the KV cache of every slot allocated once
probe      the decode shape: compact rows where every row is bitwise batch-invariant, else fixed
calibrate  the median step latency at each number of live slots
cache      a calibrated plan is saved on disk; the next compile reads it back and skips build work,
           probe and calibration (cache.py)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from metronome.compile.cache import plan_cache_path, read_plan_cache, write_plan_cache
from metronome.compile.fused import FusedRunner
from metronome.compile.pages import PagePool
from metronome.compile.plan import PREFIX_PAGE_TOKENS, Plan, PlanError, PlanReport
from metronome.compile.probe import (
    calibrate_consistent,
    calibration_problem,
    choose_decode_mode,
    far_position,
    inconsistent_calibration,
    prompt_row_positions,
)
from metronome.compile.quant import dense, quantize
from metronome.compile.runner import Runner, TorchRunner
from metronome.config import DEFAULT_CTX, EngineConfig, KvCache, Layout, ModelConfig
from metronome.kernels.ops import CppOps, KernelBuildError, Ops, StaticOps, TorchOps, load_kernels
from metronome.model.loader import LoadedModel, QuantTensor
from metronome.model.moe import use_dense_dispatch
from metronome.model.transformer import KVCache, build_model, use_ops

# Run-time weight formats -> activation and KV-cache dtype. int4/int8 are weight-only (quant.py) with bf16
# activations on the torch path; the fused decoder keeps activations in float32 and the cache in this dtype.
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}


Say = Callable[[str], None]


def default_ctx(cfg: ModelConfig, requested: int | None) -> int:
    """The context a plan holds: as requested, else 2048 or the model's own context if that is shorter."""
    return requested if requested is not None else min(DEFAULT_CTX, cfg.max_position)


def resolve_settings(cfg: ModelConfig, config: EngineConfig) -> EngineConfig:
    """The settings a plan runs with, whichever entry point built `config` (`Engine.from_model`, the CLI,
    `serve`): ctx None -> DEFAULT_CTX or the model's own context if shorter; threads None -> every core this
    process may use. The one place where defaults that depend on the model or the machine are decided."""
    return dataclasses.replace(config, ctx=default_ctx(cfg, config.ctx), threads=config.threads or available_cores())


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask): the default compute thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_placement(config: EngineConfig, threads: int) -> tuple[int, ...]:
    """The CPUs a plan's `threads` compute threads are pinned to, one each, the engine's thread on the first;
    () to leave them to the OS.

    Why pin: a step's threads meet hundreds of times per step, so two of them on one core wait on each other.
    Left to itself, Linux put the engine's thread and the pool's worker on one core after the engine had idled
    for a second or so (the Intel Xeon VM: dozens of involuntary context switches in the next steps, which ran
    at a third of their speed), so a request arriving after a pause got its first token about twice as late
    (docs/performance.md, "Threads pinned to cores").

    Only where the placement is this process's to make: `pin_threads`, one process (not tensor parallel), the
    colocated layout (a disaggregated prefill worker shares the cores), at least two threads, and no more
    threads than the cores this thread may use (a pinned thread could not step aside for the others)."""
    if not config.pin_threads or config.layout != Layout.COLOCATED or config.tp > 1 or threads < 2:
        return ()
    if not hasattr(os, "sched_getaffinity"):
        return ()
    allowed = sorted(os.sched_getaffinity(0))
    return tuple(allowed[:threads]) if threads <= len(allowed) else ()


@dataclass(frozen=True)
class Resolved:
    """What the resolve stage decided: everything the later stages need to know about the settings."""

    weights: str  # "f32" | "bf16" | "int8" | "int4"
    ops: Ops
    fused: bool  # run on the fused C++ decoder
    kernels: str  # a sentence for the report: which ops, and why not fused when not
    threads: int  # compute threads of the plan
    warnings: tuple[str, ...] = ()  # for PlanReport.warnings
    cpus: tuple[int, ...] = ()  # for PlanReport.cpus: where the threads are pinned (thread_placement)


def compile_plan(
    loaded: LoadedModel, config: EngineConfig, calibrate: bool = True, progress: Say | None = None, cache: bool = True
) -> Plan:
    """Build the model in its run-time format, allocate everything, choose the decode shape, time it.

    With `cache`, a calibrated plan is saved on disk (see `cache.plan_cache_path`) and a later compile of
    the same model file with the same settings on the same machine and code reads it back."""
    say = progress or (lambda _msg: None)
    if config.tp > 1 or config.tp_shards is not None:  # ranks in processes of their own (parallel/plan.py)
        from metronome.parallel.plan import compile_tp_plan

        return compile_tp_plan(loaded, config, calibrate, say)
    config = resolve_settings(loaded.config, config)
    r = resolve(loaded, config, say)
    path = plan_cache_path(loaded, config, r.weights, r.ops, r.threads) if cache else None
    saved = read_plan_cache(path, say) if path is not None else None
    if saved is not None and (problem := calibration_problem(saved["step_ms"], saved["step_ms_far"])):
        say(f"compiling afresh: the cached plan's calibration does not hold together ({problem})")
        saved = None  # written before that check, or by hand: its prices would misjudge every step
    warnings = list(r.warnings)
    kv_dtype = kv_cache_dtype(config, r.weights, r.fused, r.kernels)
    check_layout(config, r.fused, r.kernels)
    check_memory(loaded.config, config, kv_dtype, pooled=r.fused)
    kv = KVCache.allocate(loaded.config, config.slots, config.ctx, kv_dtype, config.device)
    runner = build(loaded, config, r, kv, saved, say)
    if saved is not None:
        runner.decode_mode, invariance, step_ms = saved["decode_mode"], saved["invariance"], saved["step_ms"]
        prompt_row_ms, prefill_row_ms, prompt_row_ms_far = saved["prompt_row_ms"]
        step_ms_far = saved["step_ms_far"]
    else:
        say("checking batch invariance of the decode step")
        _, invariance = choose_decode_mode(runner, loaded.config, config.slots, config.ctx)
        if runner.any_rows and runner.decode_mode != "compact":  # the decoder's rows are independent by design
            raise RuntimeError(
                f"fused decoder failed its batch-invariance probe ({invariance}): a kernel bug, please report it"
            )
    if isinstance(runner, TorchRunner) and (runner.decode_mode == "fixed" or runner.device.type == "cuda"):
        use_dense_dispatch(runner.model)  # MoE blocks at fixed shapes whatever the routing (model/moe.py)
    if isinstance(runner, TorchRunner) and runner.device.type == "cuda":
        say("capturing the decode step as CUDA graphs")
        runner.capture_graphs()
    if saved is None:
        step_ms, step_ms_far = {}, {}
        prompt_row_ms = prefill_row_ms = prompt_row_ms_far = float("nan")
        problem = None
        if calibrate:
            c, problem = calibrate_consistent(
                runner, config.slots, config.ctx, torch.device(config.device), config.prefill_chunk, say
            )
            step_ms, step_ms_far = c.step_ms, c.step_ms_far
            prompt_row_ms, prefill_row_ms, prompt_row_ms_far = c.prompt_row_ms, c.prefill_row_ms, c.prompt_row_ms_far
            if problem is not None:
                warnings.append(inconsistent_calibration(problem))
        if path is not None and calibrate and problem is None:  # a calibration that does not hold: not kept
            not_saved = write_plan_cache(
                say,
                path,
                runner.decode_mode,
                invariance,
                step_ms,
                (prompt_row_ms, prefill_row_ms, prompt_row_ms_far),
                step_ms_far,
                runner.matrices if isinstance(runner, FusedRunner) else None,
            )
            if not_saved:
                warnings.append(not_saved)
    pool, note = prefix_pool(config, runner, kv)
    positions = prompt_row_positions(config.ctx, config.prefill_chunk)  # where prompt rows were calibrated
    report = PlanReport(
        weights=r.weights,
        device=config.device,
        slots=config.slots,
        ctx=config.ctx,
        decode_mode=runner.decode_mode,
        weight_bytes=runner.weight_bytes,
        kv_cache_bytes=kv.nbytes(),
        kv_cache_format=str(kv.k.dtype).removeprefix("torch."),
        step_ms=step_ms,
        step_ms_far=step_ms_far,
        far_position=far_position(config.ctx),
        prompt_row_ms=prompt_row_ms,
        prefill_row_ms=prefill_row_ms,
        prompt_row_position=positions[0],
        prefill_row_position=positions[1],
        prompt_row_ms_far=prompt_row_ms_far,
        prompt_row_far_position=positions[2],
        invariance=invariance,
        kernels=r.kernels,
        cpus=r.cpus,
        cached=saved is not None,
        prefix_cache_bytes=pool.nbytes() if pool is not None else 0,
        prefix_cache_note=note,
        warnings=tuple(warnings),
    )
    draw_rows = r.ops.sample_rows if isinstance(r.ops, CppOps) else None
    return Plan(runner, loaded.config, config, r.weights, kv, report, pages=pool, draw_rows=draw_rows)


def available_memory() -> int | None:
    """Bytes this machine can still give (Linux's MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(cfg: ModelConfig, config: EngineConfig, kv_dtype: torch.dtype, pooled: bool) -> None:
    """Refuse, naming the settings, a KV cache and prefix pool larger than the memory left on a CPU machine:
    torch's allocator failed with a traceback (100,000 slots: 2.4 TB), or a size that just fit overcommit
    was filled until the system killed the process. `pooled`: the plan will have a prefix pool (the fused
    decoder's; prefix_pool)."""
    if config.device != "cpu":
        return
    available = available_memory()
    if available is None:
        return
    per_token = KVCache.token_bytes(cfg, kv_dtype)  # with int8, the rows' scales too
    pool_tokens = (config.prefix_cache_tokens // PREFIX_PAGE_TOKENS) * PREFIX_PAGE_TOKENS if pooled else 0
    cache, pool = per_token * config.slots * config.ctx, per_token * pool_tokens
    if cache + pool > available:
        raise PlanError(
            f"slots={config.slots} x ctx={config.ctx} tokens of KV cache ({cache / 1e9:.1f} GB) and a prefix cache "
            f"of {config.prefix_cache_tokens} tokens ({pool / 1e9:.1f} GB) need more than the {available / 1e9:.1f} GB "
            "of memory left; lower --slots, --ctx or --prefix-cache-tokens",
            "slots" if cache >= pool else "prefix_cache_tokens",
        )


def prefix_pool(config: EngineConfig, runner: Runner, kv: KVCache) -> tuple[PagePool | None, str]:
    """The prefix cache's pool: `config.prefix_cache_tokens` of KV in pages with the heads of `kv` (a
    rank's own under tensor parallel), allocated now (never while serving), or None and the reason. Only a
    runner whose rows are independent can use it: a row's KV then depends on the tokens before it alone,
    so a copied prefix has the bits the request would compute (engine/prefix_cache.py). The torch runner prefills a prompt whole, from position 0, in one call (and its
    float32 path's results depend on the call's shape): it cannot start at a cached position, so it is off."""
    pages = config.prefix_cache_tokens // PREFIX_PAGE_TOKENS
    if not config.prefix_cache_tokens:
        return None, "off"
    if not pages:
        return None, f"off: fewer tokens than a page ({PREFIX_PAGE_TOKENS})"
    if not runner.any_rows:
        return None, "off: only the fused decoder runs a prompt from a cached position with the same bits"
    return PagePool.allocate(kv, pages, PREFIX_PAGE_TOKENS), ""


# -- resolve -------------------------------------------------------------------------------------------


def resolve(loaded: LoadedModel, config: EngineConfig, say: Say) -> Resolved:
    """Check the settings against the model and this machine; choose weights, ops and threads."""
    cfg = loaded.config
    check_ctx(cfg, config)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError(f"device={config.device!r} but no CUDA GPU is visible to torch; use --device cpu", "device")
    weights = resolve_weights(loaded, config)
    ops, kernels, fallback = _choose_ops(config, say)
    if isinstance(ops, CppOps) and cfg.head_dim % 16:  # every C++ attention kernel reads heads 16 floats at a time
        if config.kernels == "cpp":
            raise PlanError(
                f"kernels='cpp' needs a head_dim multiple of 16; this model's is {cfg.head_dim}: use --kernels auto",
                "kernels",
            )
        ops, kernels = TorchOps(), f"torch (the C++ attention needs a head_dim multiple of 16, not {cfg.head_dim})"
    why_not = _why_not_fused(cfg, weights, ops)
    threads = config.threads or available_cores()  # resolved already when called from compile_plan
    warnings = [fallback] if fallback else []
    if threads > available_cores():  # said, not refused: the cores a container is given can change
        warnings.append(
            f"threads={threads} is more than the {available_cores()} cores this process may run on: a step's "
            "threads wait on each other, and steps run several times slower; "
            "leave --threads out to use every core"
        )
    cpus: tuple[int, ...] = ()
    if why_not is None:
        # The decoder computes on its own pool; torch keeps one thread for the small glue around it. Its OpenMP
        # team would otherwise spin between steps on the same cores (docs/performance.md).
        cpus = thread_placement(config, threads) if isinstance(ops, CppOps) else ()
        if cpus:
            ops.place_threads(cpus)
        else:
            ops.set_threads(threads)
        torch.set_num_threads(1)
        kernels = "cpp, fused decoder (every layer in one call)"
        if isinstance(ops, CppOps) and ops.amx():
            kernels += "; prompts' packed Q4_1/Q5_0/Q8_0/Q4_K matmuls on AMX"
    else:
        torch.set_num_threads(threads)
        if isinstance(ops, CppOps):
            ops.set_threads(threads)
            kernels += f" ({why_not})"
    return Resolved(weights, ops, why_not is None, kernels, threads, tuple(warnings), cpus)


def check_ctx(cfg: ModelConfig, config: EngineConfig) -> None:
    """A plan's context must fit the model's (a sliding-window model's is cut to its window: past it, the
    layers would attend where the model does not). Every plan checks it, tensor-parallel ones included."""
    if config.ctx > cfg.max_position:
        raise PlanError(
            f"ctx={config.ctx} is longer than the model's context ({cfg.max_position}); lower ctx (--ctx)", "ctx"
        )


def kv_cache_dtype(config: EngineConfig, weights: str, fused: bool, kernels: str = "") -> torch.dtype:
    """The KV cache's dtype: the plan's activations' (DTYPES), or int8 rows (config.KvCache) on the fused decoder.
    `kernels`: what the plan runs on, and why not the fused decoder (Resolved.kernels), for the error."""
    if config.kv_cache == KvCache.INT8:
        if not fused:
            raise PlanError(
                "kv_cache='int8' runs on the fused C++ decoder only (int4/int8 weights on CPU, C++ kernels); "
                f"use --kv-cache auto with these settings{f' (this plan: {kernels})' if kernels else ''}",
                "kv_cache",
            )
        return torch.int8
    return DTYPES[weights]


def check_layout(config: EngineConfig, fused: bool, kernels: str = "") -> None:
    """A disaggregated layout's prefill worker must give prompt rows the engine's own bits: the fused decoder's
    rows are independent wherever they run, the torch path's are not. Refused here, before the weights are
    built (it was refused when the worker was attached, after the whole compile: 20-50 s, more with ranks)."""
    if config.layout == Layout.DISAGGREGATED and not fused:
        raise PlanError(
            "layout='disaggregated' needs the fused CPU decoder (int4/int8 weights, C++ kernels); use --layout "
            f"colocated with these settings{f' (this plan: {kernels})' if kernels else ''}",
            "layout",
        )


def resolve_weights(loaded: LoadedModel, config: EngineConfig) -> str:
    """auto: bf16 on GPU; on CPU int4 when the file's matrices are Q4_0/Q4_1 blocks (exact), else int8."""
    cuda = config.device.startswith("cuda")
    if cuda and config.weights in ("int4", "int8"):
        raise PlanError(f"weights={config.weights!r} runs on CPU only for now; use --weights bf16 on cuda", "weights")
    if config.weights != "auto":
        return str(config.weights)
    if cuda:
        return "bf16"
    q4 = sum(isinstance(w, QuantTensor) and w.qtype in ("Q4_0", "Q4_1") for w in loaded.weights.values())
    matrices = sum(len(w.shape) == 2 for w in loaded.weights.values())
    return "int4" if q4 * 2 > matrices else "int8"


def _why_not_fused(cfg: ModelConfig, weights: str, ops: Ops) -> str | None:
    """None when the fused C++ decoder can run this plan, else the reason (shown in the report)."""
    if not isinstance(ops, CppOps):
        return "the fused decoder needs the C++ kernels"
    if weights not in ("int4", "int8"):
        return f"the fused decoder runs block-quantized weights (int4/int8), not {weights}"
    dims = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "q_size": cfg.q_size}
    if cfg.is_moe:
        dims |= {"moe_intermediate_size": cfg.moe_intermediate_size, "shared_expert_size": cfg.shared_expert_size}
    odd = [f"{k}={v}" for k, v in dims.items() if v % 32]
    if odd or cfg.head_dim % 16:
        return f"the fused decoder needs multiples of 32 (blocks) and a head_dim multiple of 16: {', '.join(odd) or cfg.head_dim}"
    return None


def _choose_ops(config: EngineConfig, say: Say) -> tuple[Ops, str, str | None]:
    """The C++ kernels on CPU when they build (config.kernels auto/cpp), else the torch reference ops; and
    a warning when auto fell back (several times slower, and only `compile` and `serve` said so)."""
    if config.device != "cpu":
        return StaticOps(), "torch, static shapes (CUDA graphs)", None
    if config.kernels == "torch":
        return TorchOps(), "torch", None
    say("loading the C++ kernels (built once per machine)")
    try:
        return load_kernels(), "cpp", None
    except KernelBuildError as exc:
        if config.kernels == "cpp":
            raise PlanError(f"kernels='cpp' but they cannot be used here: {exc}", "kernels") from exc
        why = f"C++ kernels unavailable: {exc}"
        return (
            TorchOps(),
            f"torch ({why})",
            f"{why}; running on torch ops, several times slower (--kernels torch says this is meant)",
        )


# -- build ---------------------------------------------------------------------------------------------


def build(loaded: LoadedModel, config: EngineConfig, r: Resolved, kv: KVCache, saved: dict | None, say: Say) -> Runner:
    """The runner with its weights in their run-time format, over the allocated cache."""
    cfg = loaded.config
    if r.fused:
        say(f"packing {r.weights} weights for the fused decoder" if saved is None else "reading the cached plan")
        assert isinstance(r.ops, CppOps)
        return FusedRunner(cfg, loaded.weights, kv, r.weights, r.ops, packed=saved["matrices"] if saved else None)
    say(f"building {cfg.arch} with {r.weights} weights")
    dense_weights = {k: dense(v) for k, v in loaded.weights.items()}
    model = build_model(cfg, dense_weights, config.ctx, DTYPES[r.weights], config.device)
    del dense_weights
    use_ops(model, r.ops)
    if r.weights in ("int4", "int8"):
        say(f"packing {r.weights} weights")
        quantize(model, loaded.weights, r.weights, q8_ops=r.ops if isinstance(r.ops, CppOps) else None)
    return TorchRunner(model, kv, config)
