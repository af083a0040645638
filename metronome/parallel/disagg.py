"""Disaggregated prefill: prompts run on a prefill worker (its own process and plan), and each prompt's KV
cache moves into a decode slot of the serving engine, so decode steps never carry prompt rows.

Groq's layout is prefill on GPUs, decode on LPUs; here both are CPU processes on one host, joined in a
gloo group of two of their own (`PairLink`; rank 0: the engine; rank 1: the prefill worker), and the KV
moves with its send/recv over loopback. The worker's plan is the engine's own settings with one slot,
and the fused decoder's rows are independent, so a prompt's KV (and its last logits) have the same bits
computed there as in the engine: a disaggregated request gives the same tokens as a colocated one.

With tensor parallel (tp > 1) the engine's ranks use torch.distributed's default group, hence the pair's
own. The worker runs the ranks' chunked plan in one process (tp=1 with the engine's `tp_shards`: the same
bits, parallel/tp.py), and the engine hands every rank its share of the KV heads (`TPRunner.install_kv`).

A prompt whose beginning the engine found in its prefix cache goes with that beginning's KV: the worker
writes it into its slot and runs only the rest, whose KV alone comes back.

Rank 0 talks to the worker on one thread of its own (`_transfer`): it sends a prompt, receives its KV
and logits, and hands them to the engine (`take`). Every wait is bounded: the group's collective
timeout on the wire, a slice of `POLL_S` on the job queue. A dead worker fails the prompts it held
(`PrefillFailed`) and is started again for the next ones.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from metronome.config import EngineConfig
from metronome.parallel.group import Endpoint, GroupError, PairLink, await_joining, free_port

COLLECTIVE_TIMEOUT_S = 30.0
POLL_S = 0.5  # the transfer thread's longest sleep without work (bounds every wait)
_STOP = -1  # header value that tells the worker to end


@dataclass(frozen=True)
class KVShape:
    """What a prompt's KV looks like on the wire: (layers, kv_heads, T, head_dim) keys and values."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: torch.dtype


@dataclass
class PrefillResult:
    """One prompt, prefilled: the KV (keys, values) of its positions `start`.. (those before came with it,
    from the engine's prefix cache) and the logits of its last position, or the error."""

    key: Any
    k: torch.Tensor | None
    v: torch.Tensor | None
    logits: torch.Tensor | None
    error: str | None = None
    start: int = 0


@dataclass
class PrefillJob:
    """A prompt for the worker: its tokens, and the KV of its first `cached` positions (from the engine's
    prefix cache; None when 0), which the worker takes as they are and does not compute."""

    key: Any
    ids: list[int]
    cached: int = 0
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    price_ms: float = float("nan")  # what the engine's plan says the job costs (for `Backlog.slowdown`)


SLOWDOWN_JOBS = 8  # the finished jobs `Backlog.slowdown` is the median over
WARM_ROWS = 16  # the rows of the worker's warm-up call
READY_S = 600.0  # the longest the worker may take to compile its plan and warm up


@dataclass(frozen=True)
class Backlog:
    """What the worker has yet to do: the prices (`PrefillJob.price_ms`) of the prompts not finished, in the
    order it runs them; how long the first has been running (s; 0 while it waits to be sent); and the lower
    median, over the last SLOWDOWN_JOBS jobs that came with a price, of each job's time over its price (1.0
    before any). The plan's price is for its engine alone on the machine; the worker runs beside that
    engine's decode steps, which share the cores' caches and the memory bus with it."""

    prices: list[float]
    running_s: float
    slowdown: float


def _worker_main(path: str, config: EngineConfig, endpoint: Endpoint, errors: Any, joining: Any, ready: Any) -> None:
    """The prefill worker (rank 1): compile the plan with one slot, warm it up, say so (`ready`), then
    prefill what rank 0 sends."""
    from metronome.compile import compile_plan
    from metronome.model.loader import load

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the engine ends us
    link = None
    try:
        joining.set()
        link = PairLink(1, endpoint, COLLECTIVE_TIMEOUT_S)
        plan = compile_plan(load(path), config, calibrate=False, cache=False)
        k, v = plan.cache.k[:, 0], plan.cache.v[:, 0]  # the one slot: (layers, kv heads, ctx, head dim)
        # every weight read once before the first prompt, so that it does not pay for the pages coming in
        # (a cold first job took 10x its price here, and skewed `Backlog.slowdown`)
        warm = min(WARM_ROWS, plan.config.ctx)
        plan.decode([0] * warm, [0] * warm, list(range(warm)), [warm - 1])
        ready.set()
        header = torch.zeros(2, dtype=torch.int64)  # prompt tokens T, of which the first `cached` come as KV
        while True:
            link.recv(header, src=0)
            T, cached = int(header[0]), int(header[1])
            if T == _STOP:
                return
            ids = torch.empty(T, dtype=torch.int64)
            link.recv(ids, src=0)
            if cached:  # the engine's prefix cache had them: received and written in place, not computed
                for into in (k, v):
                    wire = torch.empty(into[:, :, :cached].shape, dtype=into.dtype)  # gloo: contiguous tensors
                    link.recv(wire, src=0)
                    into[:, :, :cached].copy_(wire)
            # the rest, as the engine's chunked prefill would run it (rows are independent: the same bits)
            rest = ids[cached:].tolist()
            logits = plan.decode([0] * len(rest), rest, list(range(cached, T)), [len(rest) - 1])[0]
            link.send(k[:, :, cached:T].contiguous(), dst=0)
            link.send(v[:, :, cached:T].contiguous(), dst=0)
            link.send(logits.float().contiguous(), dst=0)
    except BaseException as exc:  # told to rank 0, which fails the prompt it was sending and restarts us
        errors.put(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(1) from None  # said: the exit code shows it failed, without a second traceback
    finally:
        if link is not None:
            link.close()


class PrefillWorker:
    """Rank 0's handle on the prefill worker: `submit` prompts, `take` their KV when ready."""

    def __init__(
        self,
        path: str,
        config: EngineConfig,
        shape: KVShape,
        on_ready: Callable[[], None] | None = None,
        threads: int = 1,
    ) -> None:
        self.path, self.shape = path, shape
        # the worker's plan: the engine's settings, one slot, no speculation, its own share of the cores
        self.config = dataclasses.replace(
            config, slots=1, spec_tokens=0, draft=None, threads=threads, prefix_cache_tokens=0
        )
        self.on_ready = on_ready or (lambda: None)
        self._ctx = mp.get_context("spawn")
        self._errors = self._ctx.Queue()
        self._jobs: queue.Queue[PrefillJob | None] = queue.Queue()
        self._done: queue.Queue[PrefillResult] = queue.Queue()
        # what `backlog` reports: the jobs not finished, oldest first, and when the first one started
        self._backlog_lock = threading.Lock()
        self._pending: collections.deque[PrefillJob] = collections.deque()
        self._started: float | None = None
        self._ratios: collections.deque[float] = collections.deque(maxlen=SLOWDOWN_JOBS)
        self._link: PairLink | None = None
        self._process: Any = None
        self.restarts = 0
        self.rows = 0  # prompt rows the worker computed (what it received as KV not counted)
        self._broken = False
        self._start()
        self._thread = threading.Thread(target=self._transfer, name="metronome-prefill-transfer", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # the worker ends with this process

    def _start(self) -> None:
        """Start the worker and join its group; return once its plan is compiled and warm (a prompt sent
        earlier would wait for that, and its TTFT with it)."""
        endpoint = Endpoint("127.0.0.1", free_port())
        joining, ready = self._ctx.Event(), self._ctx.Event()
        self._process = self._ctx.Process(
            target=_worker_main,
            args=(self.path, self.config, endpoint, self._errors, joining, ready),
            daemon=True,
            name="prefill worker",
        )
        self._process.start()
        try:
            await_joining([self._process], [joining])
            if self._link is None:
                self._link = PairLink(0, endpoint, COLLECTIVE_TIMEOUT_S)
            else:
                self._link.reconnect(endpoint)
            deadline = time.monotonic() + READY_S
            while not ready.wait(POLL_S):
                if not self._process.is_alive():
                    raise GroupError(f"it exited with code {self._process.exitcode} while compiling its plan")
                if time.monotonic() > deadline:
                    raise GroupError(f"its plan was not compiled within {READY_S:.0f} s")
        except Exception as exc:
            self._process.kill()
            raise GroupError(f"the prefill worker did not join: {exc}{self._worker_error()}") from exc

    def _worker_error(self) -> str:
        try:
            return "\nprefill worker: " + self._errors.get(timeout=0.5)
        except queue.Empty:
            return ""

    def submit(self, job: PrefillJob) -> None:
        """Queue a prompt; its result comes back through `take` (and `on_ready` is called)."""
        if not 0 <= job.cached < len(job.ids):
            raise ValueError(f"cached={job.cached}: the worker must run at least the prompt's last token")
        if job.cached and (
            job.k is None or job.v is None or job.k.shape[2] != job.cached or job.v.shape != job.k.shape
        ):
            raise ValueError(f"a job with cached={job.cached} needs the keys and values of that many positions")
        with self._backlog_lock:
            self._pending.append(job)
        self._jobs.put(job)

    def probe(self, price_ms: float, rows: int, timeout_s: float = READY_S) -> None:
        """Run one prompt of `rows` tokens, which the engine's plan prices at `price_ms`, before any request:
        its time over that price becomes the first `Backlog.slowdown`. Without it the slowdown was 1.0 until
        a job finished, but the worker's plan and threads are not the engine's, and the first burst's TTFT
        was predicted 1.3-2.1x what it measured. Not counted in `rows`."""
        started_rows = self.rows
        self.submit(PrefillJob(None, [0] * rows, 0, price_ms=price_ms))
        deadline = time.monotonic() + timeout_s
        while not self.has_results:
            if time.monotonic() > deadline:
                raise GroupError(f"the prefill worker's first prompt ({rows} rows) took over {timeout_s:.0f} s")
            time.sleep(POLL_S / 100)
        (result,) = self.take()  # nothing else was submitted: nobody could, before the engine has this worker
        self.rows = started_rows
        if result.error is not None:
            raise GroupError(f"the prefill worker failed its first prompt: {result.error}")

    def backlog(self) -> Backlog:
        """What the worker has yet to do (for the engine's TTFT predictions)."""
        with self._backlog_lock:
            prices = [job.price_ms for job in self._pending]
            started, ratios = self._started, sorted(self._ratios)
        running_s = time.perf_counter() - started if started is not None else 0.0
        return Backlog(prices, running_s, ratios[(len(ratios) - 1) // 2] if ratios else 1.0)  # the lower median

    @property
    def has_results(self) -> bool:
        """Some prompt is ready to `take`."""
        return not self._done.empty()

    def take(self) -> list[PrefillResult]:
        """The prompts prefilled since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def _transfer(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=POLL_S)
            except queue.Empty:
                self._replace_if_dead()
                continue
            if job is None:
                return
            try:
                # the last worker died with a job, or died idle since the last poll: a new one for this prompt
                if self._broken or not self._process.is_alive():
                    self._restart()
                with self._backlog_lock:  # after a restart: its compile is not the job's time
                    self._started = time.perf_counter()
                k, v, logits = self._prefill(job)
                self.rows += len(job.ids) - job.cached
                result = PrefillResult(job.key, k, v, logits, start=job.cached)
            except Exception as exc:  # the worker died, timed out, or could not start: fail this prompt
                self._broken = True
                why = f"the prefill worker failed: {type(exc).__name__}: {exc}"
                result = PrefillResult(job.key, None, None, None, why, job.cached)
            with self._backlog_lock:  # the jobs run in the order they were queued: this is the first
                if result.error is None and job.price_ms > 0 and self._started is not None:
                    self._ratios.append((time.perf_counter() - self._started) * 1000 / job.price_ms)
                self._pending.popleft()
                self._started = None
            self._done.put(result)
            self.on_ready()

    def _prefill(self, job: PrefillJob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Send one prompt (and its cached beginning's KV), receive the KV of the rest and the last logits
        (each wait bounded by the group's timeout)."""
        s, T, link = self.shape, len(job.ids), self._connected()
        link.send(torch.tensor([T, job.cached], dtype=torch.int64), dst=1)
        link.send(torch.tensor(job.ids, dtype=torch.int64), dst=1)
        if job.cached:  # submit checked that both are there, `cached` positions long
            link.send(job.k, dst=1)
            link.send(job.v, dst=1)
        k = torch.empty(s.layers, s.kv_heads, T - job.cached, s.head_dim, dtype=s.dtype)
        v = torch.empty_like(k)
        logits = torch.empty(s.vocab, dtype=torch.float32)
        link.recv(k, src=1)
        link.recv(v, src=1)
        link.recv(logits, src=1)
        return k, v, logits

    def _connected(self) -> PairLink:
        if self._link is None:
            raise GroupError("the prefill worker is not connected")
        return self._link

    def _replace_if_dead(self) -> None:
        """While idle: a worker that died holding no prompt is replaced now, so that the next prompt neither
        fails on it nor waits for its replacement's compile. A replacement that cannot start leaves the
        worker broken: the next prompt tries again, and fails with the reason."""
        if self._broken or self._process.is_alive():
            return
        try:
            self._restart()
        except Exception:  # kept as _broken: the next job's own restart reports why
            self._broken = True

    def _restart(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=5.0)
        self.restarts += 1
        self._start()
        self._broken = False

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker and the transfer thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._process.is_alive() and not self._broken and self._link is not None:
            self._link.send(torch.tensor([_STOP, 0], dtype=torch.int64), dst=1)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
        if self._link is not None:
            self._link.close()
