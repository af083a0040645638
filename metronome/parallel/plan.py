"""Compile a tensor-parallel plan: `config.tp` ranks on this host, each holding its cut of the model.

Rank 0 is this process (the engine, the server); ranks 1..tp-1 are processes it starts, which build the
same plan for their rank and then follow rank 0's calls (runner.py). Every rank builds the model from the
same file: a file that differs between ranks (another machine's copy) is caught by comparing
fingerprints before the first step.

int4/int8 weights run on the fused C++ decoder, each rank holding its cut of the file's blocks
(fused_tp.py; its row-parallel sums meet inside the decoder's call, through the host exchange or the
reduce hook); f32/bf16 on the torch path (tp.py). Mixture-of-experts models on both: every expert's width
cut in the same chunks. docs/parallel.md says what it costs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from typing import Any, Callable, Iterator

import torch

from metronome.compile.plan import Plan, PlanError, PlanReport
from metronome.compile.probe import (
    calibrate_consistent,
    choose_decode_mode,
    far_position,
    inconsistent_calibration,
    prompt_row_positions,
)
from metronome.compile.quant import dense
from metronome.compile.runner import Runner, TorchRunner
from metronome.compile.stages import (
    DTYPES,
    check_ctx,
    check_layout,
    kv_cache_dtype,
    prefix_pool,
    resolve_settings,
    resolve_weights,
)
from metronome.config import EngineConfig
from metronome.kernels.ops import KernelBuildError, TorchOps, load_kernels
from metronome.model.loader import LoadedModel, load
from metronome.model.transformer import build_model, use_ops
from metronome.parallel.fused_tp import TPFusedRunner, rank_weights
from metronome.parallel.group import Endpoint, GlooGroup, GroupError, await_go, await_joining, env_rank, free_port
from metronome.parallel.host import exchange_bytes
from metronome.parallel.runner import Rank, TPPages, TPRunner, follow
from metronome.parallel.tp import (
    Collective,
    ShardingError,
    TPLayout,
    allocate_shard_cache,
    check_shards,
    default_shards,
    shard_model,
)

COLLECTIVE_TIMEOUT_S = 30.0  # a collective that waits longer fails (a rank is gone or stuck)


@contextlib.contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Ranks start with Ctrl-C ignored (rank 0 ends them; `_worker` ignores it too, once it runs): a spawned
    rank imports torch and the model code for seconds first, and a Ctrl-C then printed its KeyboardInterrupt
    traceback. A spawned process keeps an ignored SIGINT from its parent; the parent's handler is back as soon
    as they have started. Only the main thread may set handlers (elsewhere, as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def tp_settings(loaded: LoadedModel, config: EngineConfig) -> tuple[EngineConfig, TPLayout, str]:
    """The resolved settings of a TP plan, rank 0's layout, and the weight format; PlanError if unusable.
    int4/int8 (the CPU default) run on the fused C++ decoder (parallel/fused_tp.py); f32/bf16 on the torch
    path (parallel/tp.py)."""
    config = resolve_settings(loaded.config, config)
    check_ctx(loaded.config, config)  # as a plan of one process does (compile/stages.py `resolve`)
    if config.device != "cpu":
        raise PlanError(f"device={config.device!r}: tensor parallel runs on CPU ranks (gloo) for now", "device")
    weights = resolve_weights(loaded, config)
    fused = weights in ("int4", "int8")
    if fused and config.kernels == "torch":
        raise PlanError(
            f"kernels='torch' with weights={weights!r}: tensor parallel runs int4/int8 on the C++ kernels and "
            "f32/bf16 on torch; use --weights f32 for the torch path",
            "weights",
        )
    kv_cache_dtype(config, weights, fused)  # an int8 KV cache needs the fused decoder: raises here, before any rank
    check_layout(config, fused)  # and so does a prefill worker
    try:
        shards = config.tp_shards or default_shards(loaded.config)
        if config.tp_shards is None and shards % config.tp:
            try:  # what stops a cut in tp (the heads, the widths, an MoE's experts, a QK norm over them all)
                check_shards(loaded.config, config.tp)
            except ShardingError as exc:
                why = str(exc).rsplit(": ", 1)[-1]
                raise ShardingError(
                    f"tp={config.tp}: this model cuts into at most {shards} equal chunk(s) ({why}); "
                    + (f"choose a tp dividing {shards}" if shards > 1 else "it runs at tp=1 only"),
                    "tp",
                ) from None
            # it does cut in tp, just not in the default count (the largest power of two it takes, so that
            # tp=1, 2, 4... give the same answers): SmolLM2's 9 heads at tp=3 were refused as "at most 1 chunk"
            raise ShardingError(
                f"tp={config.tp}: the default cut is the largest power of two this model takes ({shards} "
                f"chunk(s)), which {config.tp} ranks do not divide; the model also cuts into {config.tp} chunks: "
                f"add --tp-shards {config.tp} (its answers are those of --tp-shards {config.tp} at any tp)",
                "tp",
            )
        layout = TPLayout(config.tp, 0, shards)
        check_shards(loaded.config, shards)
        if fused:  # the file's blocks must cut along K where the chunks do (raises before any rank starts)
            rank_weights(loaded.config, loaded.weights, layout)
    except ShardingError as exc:
        raise PlanError(str(exc), exc.param) from None
    threads = max(1, (config.threads or 1) // config.tp)  # the machine's cores shared among the ranks
    kernels = "cpp" if fused else "torch"
    resolved = dataclasses.replace(config, threads=threads, weights=weights, kernels=kernels, tp_shards=shards)
    return resolved, layout, weights


def rank_runner(loaded: LoadedModel, config: EngineConfig, layout: TPLayout, group: Collective) -> Runner:
    """One rank's runner over the rank's KV cache: its cut of the file's blocks on the fused decoder
    (int4/int8), or the model built dense and cut (f32/bf16, torch)."""
    cfg = loaded.config
    dtype = DTYPES[str(config.weights)]
    if config.kernels == "cpp":
        try:
            ops = load_kernels()
        except KernelBuildError as exc:
            raise PlanError(
                f"tensor parallel with weights={config.weights!r} needs the C++ kernels: {exc}", "kernels"
            ) from exc
        ops.set_threads(config.threads or 1)
        torch.set_num_threads(1)  # the decoder computes on its own pool (as compile/stages.py does)
        kv_dtype = kv_cache_dtype(config, str(config.weights), fused=True)
        cache = allocate_shard_cache(cfg, layout, config.slots, config.ctx, kv_dtype, "cpu")
        return TPFusedRunner(cfg, loaded.weights, cache, str(config.weights), ops, layout, group)
    # One torch thread on every rank, tp=1 included: torch's CPU matmul splits some shapes among its
    # threads, which changes their bits (a 9-row x 64 by 64 x 32 product did, 1 thread against 2), and a
    # rank of tp=N has 1/N of the cores; the MoE experts' row counts (the rows routed to each) hit such
    # shapes. The ranks are the parallelism here (docs/parallel.md).
    torch.set_num_threads(1)
    model = build_model(cfg, {k: dense(v) for k, v in loaded.weights.items()}, config.ctx, dtype)
    use_ops(model, TorchOps())
    shard_model(model, layout, group)
    cache = allocate_shard_cache(cfg, layout, config.slots, config.ctx, dtype, "cpu")
    return TorchRunner(model, cache, config)


def _follow(loaded: LoadedModel, config: EngineConfig, layout: TPLayout, group: GlooGroup) -> int:
    """A rank other than 0: build its runner and its prefix cache pool (the same settings as rank 0's, its
    own KV heads), then run rank 0's calls until told to stop. Returns the calls run."""
    runner = rank_runner(loaded, config, layout, group)
    pages, _ = prefix_pool(config, runner, runner.cache)
    return follow(Rank(runner, pages, group))


def _worker(
    rank: int,
    path: str,
    config: EngineConfig,
    layout: TPLayout,
    endpoint: Endpoint,
    errors: Any,
    joining: Any,
    go: Any,
    parent: int,
) -> None:
    """Rank `rank` (>= 1): build, check the file against rank 0's, follow rank 0's calls until Stop. The
    file's fingerprint is taken before the join (hashing a large file the first time takes seconds, which
    inside the join's 30 s would count against it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 ends us (Stop)
    torch.set_num_threads(config.threads or 1)
    group = None
    try:
        loaded = load(path)
        host_bytes = exchange_bytes(loaded.config, layout, config)
        fingerprint = loaded.fingerprint()
        joining.set()
        await_go(go, parent)
        group = GlooGroup(rank, layout.world, endpoint, COLLECTIVE_TIMEOUT_S, host_bytes)
        fingerprints = group.all_gather_objects(fingerprint)
        if len(set(fingerprints)) != 1:
            return  # rank 0 reports it
        _follow(loaded, config, dataclasses.replace(layout, rank=rank), group)
    except BaseException as exc:  # told to the launcher (rank 0), which names this rank
        errors.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None  # said: the exit code shows it failed, without a second traceback
    finally:
        if group is not None:
            group.close()


class Ranks:
    """Ranks 1..tp-1 as processes of this one, and this process's (rank 0's) place in their group.

    `form()` starts them and forms the group; `reform()` does it again after a rank died: the survivors
    are stopped, new processes build their cut of the model again, and rank 0 joins the new group on a
    new port (its own modules keep their group object, which reconnects)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        layout: TPLayout,
        say: Callable[[str], None],
        path: str | None = None,
    ) -> None:
        """`path`: the file the other ranks load (default: rank 0's; on other hosts, their own copy)."""
        self.loaded, self.config, self.layout, self.say = loaded, config, layout, say
        self.path = path or str(loaded.path)
        self._ctx = mp.get_context("spawn")
        # the other ranks' errors; none at tp=1 (a prefill worker's own chunked plan, in its process): that
        # queue's 3 semaphores were reported leaked by multiprocessing's resource tracker when a server
        # with --tp 2 --layout disaggregated stopped on SIGTERM (not examined further)
        self.errors = self._ctx.Queue() if layout.world > 1 else None
        self.workers: list = []
        self.joining: list = []  # each worker's event, set when it is ready to join the group
        self.go: Any = None  # set by rank 0 once every worker is ready: all join at once
        self.group: GlooGroup | None = None
        self.generation = 0  # how many times the group was formed

    def _spawn(self) -> Endpoint:
        endpoint = Endpoint("127.0.0.1", free_port())
        self.joining = [self._ctx.Event() for _ in range(1, self.layout.world)]
        # none for a group of one (a prefill worker's chunked plan): an Event is 5 semaphores registered with
        # the resource tracker that the whole process tree shares, and a worker killed with SIGKILL never
        # unregistered them, so a server that replaced it reported "5 leaked semaphore objects" at its stop
        self.go = self._ctx.Event() if self.layout.world > 1 else None
        parent = os.getpid()
        self.workers = [
            self._ctx.Process(
                target=_worker,
                args=(
                    r,
                    self.path,
                    self.config,
                    self.layout,
                    endpoint,
                    self.errors,
                    self.joining[r - 1],
                    self.go,
                    parent,
                ),
                daemon=True,
                name=f"tp-rank-{r}",
            )
            for r in range(1, self.layout.world)
        ]
        with _sigint_ignored_by_children():
            for w in self.workers:
                w.start()
        return endpoint

    def form(self) -> GlooGroup:
        """Start ranks 1.. and join them (rank 0): the group; GroupError naming what went wrong."""
        fingerprint = self.loaded.fingerprint()  # before the join, as the workers take theirs
        endpoint = self._spawn()
        self.say(
            f"tensor parallel: {self.layout.world} ranks on 127.0.0.1:{endpoint.port}, {self.layout.shards} shards"
        )
        try:
            await_joining(self.workers, self.joining)
            if self.go is not None:
                self.go.set()
            if self.group is None:
                host_bytes = exchange_bytes(self.loaded.config, self.layout, self.config)
                self.group = GlooGroup(0, self.layout.world, endpoint, COLLECTIVE_TIMEOUT_S, host_bytes)
            else:
                self.group.reconnect(endpoint)
            fingerprints = self.group.all_gather_objects(fingerprint)
        except Exception as exc:
            self.stop()
            raise GroupError(f"the tensor-parallel group did not form: {exc}{self._worker_errors()}") from exc
        if len(set(fingerprints)) != 1:
            self.stop()
            raise GroupError(
                f"the model file differs between ranks (fingerprints by rank: {fingerprints}): every rank must "
                "load the same file"
            )
        self.generation += 1
        return self.group

    def reform(self) -> None:
        """After a failure: stop what is left of the ranks and form the group again."""
        self.stop()
        self.form()

    def alive(self) -> bool:
        """Every rank process is running."""
        return all(w.is_alive() for w in self.workers)

    def stop(self) -> None:
        """Stop ranks 1.. (killed if they do not end at once) and leave the group."""
        if self.group is not None:
            self.group.close()
        for w in self.workers:
            w.join(timeout=0.5)
            if w.is_alive():
                w.kill()
                w.join(timeout=5.0)
        self.workers = []

    def _worker_errors(self) -> str:
        if self.errors is None:
            return ""
        found = []
        while True:
            try:
                rank, text = self.errors.get(timeout=0.5)
            except queue.Empty:
                return "".join(found)
            found.append(f"\nrank {rank}: {text}")


class Launched:
    """Ranks started by torchrun, not by us: a rank that dies cannot be started again from here (torchrun's
    own restart policy relaunches the job), so a failure stays a failure."""

    def __init__(self, group: GlooGroup) -> None:
        self.group = group

    def reform(self) -> None:
        raise GroupError("a rank launched by torchrun failed; restart the job (torchrun --max-restarts)")

    def alive(self) -> bool:
        return True  # not ours to watch: a dead rank shows as a failed collective

    def stop(self) -> None:
        self.group.close()


def compile_tp_plan(
    loaded: LoadedModel, config: EngineConfig, calibrate: bool = True, say: Callable[[str], None] | None = None
) -> Plan:
    say = say or (lambda _msg: None)
    config, layout, weights = tp_settings(loaded, config)
    torch.set_num_threads(config.threads or 1)
    launched = env_rank()
    if launched is not None and launched[1] > 1:  # torchrun started every rank (one host or many)
        rank, world, endpoint = launched
        if world != config.tp:
            raise PlanError(f"tp={config.tp} but torchrun started {world} ranks (WORLD_SIZE): pass --tp {world}", "tp")
        fingerprint = loaded.fingerprint()  # before the join: a first hash of a large file takes seconds
        group = GlooGroup(rank, world, endpoint, COLLECTIVE_TIMEOUT_S, exchange_bytes(loaded.config, layout, config))
        fingerprints = group.all_gather_objects(fingerprint)
        if len(set(fingerprints)) != 1:
            group.close()
            raise GroupError(f"the model file differs between ranks (fingerprints by rank: {fingerprints})")
        if rank > 0:  # a follower never gets a plan of its own: it runs rank 0's calls, then this process ends
            calls = _follow(loaded, config, dataclasses.replace(layout, rank=rank), group)
            group.close()
            say(f"rank {rank}: rank 0 stopped after {calls} calls")
            raise SystemExit(0)
        ranks: Ranks | Launched = Launched(group)
    else:
        ranks = Ranks(loaded, config, layout, say)
        group = ranks.form()
    runner = rank_runner(loaded, config, layout, group)
    local_pages, prefix_note = prefix_pool(config, runner, runner.cache)  # every rank allocates its own
    tp = TPRunner(runner, group, ranks, local_pages)
    pages = TPPages(tp, local_pages) if local_pages is not None else None  # the ranks' pools, as one
    say("checking batch invariance of the decode step")
    _, invariance = choose_decode_mode(tp, loaded.config, config.slots, config.ctx)
    step_ms, step_ms_far, rows, warnings = {}, {}, (float("nan"),) * 3, ()
    if calibrate:
        c, problem = calibrate_consistent(tp, config.slots, config.ctx, torch.device("cpu"), config.prefill_chunk, say)
        step_ms, step_ms_far = c.step_ms, c.step_ms_far
        rows = (c.prompt_row_ms, c.prefill_row_ms, c.prompt_row_ms_far)
        warnings = () if problem is None else (inconsistent_calibration(problem),)
    positions = prompt_row_positions(config.ctx, config.prefill_chunk)  # where prompt rows were calibrated
    report = PlanReport(
        weights=weights,
        device="cpu",
        slots=config.slots,
        ctx=config.ctx,
        decode_mode=tp.decode_mode,
        weight_bytes=tp.weight_bytes,
        kv_cache_bytes=runner.cache.nbytes() * layout.world,
        kv_cache_format=str(runner.cache.k.dtype).removeprefix("torch."),
        step_ms=step_ms,
        step_ms_far=step_ms_far,
        far_position=far_position(config.ctx),
        prompt_row_ms=rows[0],
        prefill_row_ms=rows[1],
        prompt_row_position=positions[0],
        prefill_row_position=positions[1],
        prompt_row_ms_far=rows[2],
        prompt_row_far_position=positions[2],
        invariance=invariance,
        prefix_cache_bytes=pages.nbytes() if pages is not None else 0,
        prefix_cache_note=prefix_note,
        kernels=f"{'cpp, fused decoder' if config.kernels == 'cpp' else 'torch'}, tensor parallel: "
        f"tp={layout.world} ranks x {config.threads} threads, {layout.shards} shards, exchanges: {group.transport}",
        warnings=warnings,
        shards=layout.shards,
    )
    draw_rows = load_kernels().sample_rows if config.kernels == "cpp" else None  # as a one-process plan draws
    return Plan(tp, loaded.config, config, weights, runner.cache, report, pages=pages, draw_rows=draw_rows)
