"""The plan's promise under load: `metronome bench --load 1,4,8` (and `--stall`).

For each number of concurrent users, every user sends one greedy `ignore_eos` request of `--output-tokens`
tokens at the same moment, in process (the Engine's own thread, callbacks on it) and served (a `metronome
serve` child process on 127.0.0.1, streaming clients in this process). Per-user speed is a user's tokens
after the first over the time from its first token to its last; the plan's promise is 1000 / step_ms at that
many live slots (the calibration every plan takes of itself), and its TTFT prediction is the one the engine
made at submit (`Request.predicted_ttft_ms`), its speed promise the one made with each user's first token
(`Request.promised_tps`: the plan's price times the pace of recent steps at that load, so it follows the
machine). On a machine whose speed drifts (these VMs' 1-row step moved between 3.4 and 10 ms from one minute
to the next, 2026-12-01), a calibration taken at compile time says little about a level run minutes later,
so each level is also held to the plan's step timed just before it (`step_ms_now`): per user ÷ that promise
is what the work outside the plan call costs. `--stall` streams one
user, then sends a long prompt from another: the streaming user's longest inter-token gap, and the long
prompt's TTFT against the same-length prompt sent alone.

The engine's step profile (engine/profile.py) is printed after each in-process level: where a step's time
goes (schedule, draft, plan, sample, emit). What the server adds on top is served ÷ in process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence
from urllib.parse import urlsplit

from metronome.bench.sse import post_events
from metronome.compile.probe import time_warm
from metronome.config import EngineConfig, SamplingParams
from metronome.engine.heap import freeze_startup_heap
from metronome.engine.profile import PHASES, THREAD_ROLES, cpu_seconds_by_thread

_WAIT_S = 600.0  # the longest any level may take before the bench gives up on it


@dataclass(frozen=True)
class LevelResult:
    where: str  # "in process" | "served"
    users: int
    aggregate_tps: float
    per_user_tps: float  # median over users
    predicted_tps: float  # the plan's promise per user at this many live slots, its step timed before the level
    compiled_tps: float  # ... from the plan's own calibration (compile time, or the plan cache)
    ttft_ms: float  # median
    predicted_ttft_ms: float  # median of the engine's predictions (served: from each answer's usage)
    # median of the decode speeds the engine promised with each user's first token (Request.promised_tps;
    # served: usage's predicted_output_tokens_per_second); NaN where it promised none
    promised_tps: float = float("nan")


_TOPICS = ("the sea", "a city at night", "mountains", "a library", "the first snow", "trains", "a market", "rain")


def _texts(n: int, salt: str = "") -> list[str]:
    """A level's prompts. `salt` (the round and level) opens each, so that no level's prompt is served from
    an earlier one's cached prefix: with the same texts every round, round 2's TTFT timed a prefix cache
    copy, not a prompt (TTFT fell as users were added)."""
    return [f"({salt}{i}) Write a long story about {_TOPICS[i % len(_TOPICS)]}." for i in range(n)]


def _prompts(engine, n: int, salt: str = "") -> list[list[int]]:
    return [engine.encode_prompt(t) for t in _texts(n, salt)]


def step_ms_now(engine, live: int, position: int, steps: int = 9) -> float:
    """The plan's step with `live` decode rows at `position`, timed now: the median of `steps` plan calls on
    slots 0..live-1, warmed up first as the plan's calibration times them (compile/probe.time_warm). Call it
    only while the engine is idle: the rows write those slots' KV, which the next request overwrites (a prefix
    it reuses is copied in from the prefix cache's pool, never trusted in a free slot)."""
    slots, tokens, positions = list(range(live)), [1] * live, [min(position, engine.config.ctx - 1)] * live
    times = time_warm(lambda: engine.plan.decode(slots, tokens, positions), engine.plan.device, calls=steps)
    return statistics.median(times)


def _median_promise(values: Sequence[float]) -> float:
    """The median of the promises made (NaN where the engine made none)."""
    made = [v for v in values if v > 0]
    return statistics.median(made) if made else float("nan")


def _mean_position(prompts: list[list[int]], output_tokens: int) -> int:
    """The mean position of a level's decode rows (the prompts' and the served ones are the same texts)."""
    return round(statistics.mean(len(p) + output_tokens / 2 for p in prompts))


def run_in_process(engine, users: int, output_tokens: int, salt: str = "") -> tuple[LevelResult, str]:
    """`users` requests at once on the engine's own thread, held to the plan's step timed just before them;
    returns the level and the step profile. `salt`: see _texts."""
    prompts = _prompts(engine, users, salt)
    mean_position = _mean_position(prompts, output_tokens)
    step_now = step_ms_now(engine, users, mean_position)
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in range(users)]
    done = threading.Semaphore(0)

    def on_event(i: int):
        def deliver(delta) -> None:
            now = time.perf_counter()
            stamps[i].extend([now] * len(delta.choices))
            if delta.finish_reason is not None:
                done.release()

        return deliver

    engine.profile.reset()
    cpu0 = cpu_seconds_by_thread(engine.thread_id)
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params, on_event(i)) for i, p in enumerate(prompts)]
    for _ in range(users):
        if not done.acquire(timeout=_WAIT_S):
            raise TimeoutError(f"in-process level of {users} users did not finish within {_WAIT_S:.0f} s")
    wall = time.perf_counter() - t0
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_seconds_by_thread(engine.thread_id).items()}
    per_user = [(len(s) - 1) / (s[-1] - s[0]) for s in stamps if len(s) > 1 and s[-1] > s[0]]
    ttft = [1000 * (r.timings.first_token - r.timings.submitted) for r in reqs]
    predicted = [r.predicted_ttft_ms for r in reqs]
    result = LevelResult(
        "in process",
        users,
        sum(len(s) for s in stamps) / wall,
        statistics.median(per_user),
        1000.0 / step_now,
        engine.plan.report.tokens_per_s(users, mean_position),
        statistics.median(ttft),
        statistics.median(predicted),
        _median_promise([r.promised_tps for r in reqs]),
    )
    profile = engine.profile.snapshot().table()
    pace = (
        f"the engine's pace (its promises over the plan's prices): {engine.pace.factor:.2f} ({engine.pace.steps} steps)"
    )
    return result, f"{profile}\n{_cpu_table(cpu, sum(len(s) for s in stamps), wall)}\n{pace}"


class ServedStream(NamedTuple):
    """What one served user's stream gave the bench."""

    stamps: list[float]  # perf_counter() at each event that carried text
    tokens: int  # completion tokens, from the usage chunk
    ttft_ms: float  # from the request to its first text event
    promised_ms: float = float("nan")  # the engine's TTFT promise at submit (usage's predicted_time_to_first_token)
    promised_tps: float = float("nan")  # ... and its speed promise (usage's predicted_output_tokens_per_second)


async def _served_level(url: str, prompts: list[str], output_tokens: int) -> list[ServedStream]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    async def one(prompt: str) -> ServedStream:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": output_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
        }
        stamps: list[float] = []  # one per event that carried text
        tokens, promised, speed = 0, float("nan"), float("nan")
        t0 = time.perf_counter()
        async for data in post_events(host, port, "/v1/chat/completions", body):
            now = time.perf_counter()
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                seconds = chunk["usage"].get("predicted_time_to_first_token")
                promised = float("nan") if seconds is None else 1000 * seconds
                speed = chunk["usage"].get("predicted_output_tokens_per_second") or float("nan")
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                stamps.append(now)
        return ServedStream(stamps, tokens, 1000 * ((stamps[0] if stamps else t0) - t0), promised, speed)

    async with asyncio.timeout(_WAIT_S):
        return list(await asyncio.gather(*(one(p) for p in prompts)))


def _run(coro):
    """Run the client on uvloop where it is installed (it costs the shared cores less), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _scrape(url: str) -> dict[tuple[str, str], float]:
    """The server's step profile and CPU-by-thread counters: {(metric, label value): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "metronome_engine_step_phase_seconds": "phase",
        "metronome_engine_steps": "",
        "metronome_engine_step_rows": "kind",
        "metronome_thread_cpu_seconds": "thread",
    }
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[(family.name, sample.labels.get(wanted[family.name], ""))] = sample.value
    return values


def served_profile(
    before: dict[tuple[str, str], float],
    after: dict[tuple[str, str], float],
    client_cpu_s: float,
    wall_s: float,
    tokens: int,
) -> str:
    """Where a served level's time went: the server's engine phases per step (as in process), and CPU
    seconds by thread, the server's and this client's, per token and as cores busy over the level."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = max(1.0, d.get(("metronome_engine_steps", ""), 0.0))
    lines = [f"{'phase':<10} {'ms/step':>9}"]
    for phase in PHASES:
        lines.append(f"{phase:<10} {1000 * d.get(('metronome_engine_step_phase_seconds', phase), 0.0) / steps:9.3f}")
    lines.append(f"{steps:.0f} steps")
    cpu = {role: d.get(("metronome_thread_cpu_seconds", role), 0.0) for role in THREAD_ROLES}
    cpu["client (this process)"] = client_cpu_s
    lines.append(_cpu_table(cpu, tokens, wall_s))
    return "\n".join(lines)


def _cpu_table(cpu: dict[str, float], tokens: int, wall_s: float) -> str:
    """CPU seconds by thread role, per token and as cores kept busy over the level's wall time."""
    lines = [f"CPU by thread (µs per token, cores busy over {wall_s:.2f} s):"]
    for role, seconds in cpu.items():
        lines.append(f"  {role:<22} {1e6 * seconds / max(1, tokens):9.1f} µs  {seconds / wall_s:5.2f} cores")
    return "\n".join(lines)


def run_served(
    url: str, users: int, output_tokens: int, predicted_tps: float, compiled_tps: float, salt: str = ""
) -> tuple[LevelResult, str]:
    """`users` streaming clients at once against the server; returns the level and where its time went.
    `predicted_tps`: the promise, from the plan's step timed just before (on the bench's own copy of the
    plan, idle while the server runs)."""
    before = _scrape(url)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    runs = _run(_served_level(url, _texts(users, salt), output_tokens))
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    tokens = sum(r.tokens for r in runs)
    profile = served_profile(before, _scrape(url), client_cpu, wall, tokens)
    per_user = [
        (r.tokens - 1) / (r.stamps[-1] - r.stamps[0]) for r in runs if len(r.stamps) > 1 and r.stamps[-1] > r.stamps[0]
    ]
    promised = [r.promised_ms for r in runs if r.promised_ms >= 0]  # NaN: no promise (uncalibrated, or no free slot)
    level = LevelResult(
        "served",
        users,
        tokens / wall,
        statistics.median(per_user) if per_user else float("nan"),
        predicted_tps,
        compiled_tps,
        statistics.median(r.ttft_ms for r in runs),
        statistics.median(promised) if promised else float("nan"),
        _median_promise([r.promised_tps for r in runs]),
    )
    return level, profile


def measure_stall(engine, long_tokens: int = 1300, output_tokens: int = 200, repeats: int = 1) -> dict[str, object]:
    """One user streams; a `long_tokens` prompt arrives from another. The stream's longest gap while the
    prompt runs, and the long prompt's TTFT against the same-length prompt sent alone just before.

    `repeats` pairs (alone, then beside a stream), so that the figures are medians: the machine's speed
    drifts between seconds here, and one pair's TTFT ratio moved between 0.99 and 1.48 (2026-12-01). The
    8-row step the gap is held to is timed just before the pairs (`step_ms_now`), beside the plan's own."""
    tok = engine.tokenizer
    vocab = engine.plan.cfg.vocab_size
    uses = iter(range(1, 1 << 30))

    def filler() -> list[int]:
        """A long prompt whose second token differs each time, so that no prompt is served from another's
        cached prefix (the prefix cache would make 'alone' and 'beside' a copy, not a prefill). Token ids,
        not different opening words: a small vocabulary can map those to one unknown id."""
        text = " ".join(["The quick brown fox jumps over the lazy dog."] * (long_tokens // 8 + 2))
        ids = tok.encode(text)[:long_tokens]
        ids[1] = (ids[1] + next(uses)) % vocab
        return ids

    def ttft_ms(timings) -> float:
        return 1000 * (timings.first_token - timings.submitted)

    one_token = SamplingParams(max_tokens=1)
    engine.generate(filler(), one_token, chat=False)  # warm-up
    stream_prompt = _prompts(engine, 1)[0]
    step_now = step_ms_now(engine, engine.config.slots, len(stream_prompt) + output_tokens // 2)
    alone, beside, worst, medians = [], [], [], []
    for _ in range(repeats):
        alone.append(ttft_ms(engine.generate(filler(), one_token, chat=False).timings))
        stamps: list[float] = []
        finished = threading.Event()

        def deliver(delta, stamps=stamps, finished=finished) -> None:
            stamps.extend([time.perf_counter()] * len(delta.choices))
            if delta.finish_reason is not None:
                finished.set()

        engine.submit(stream_prompt, SamplingParams(max_tokens=output_tokens, ignore_eos=True), deliver)
        deadline = time.perf_counter() + _WAIT_S
        while len(stamps) < 20 and time.perf_counter() < deadline:
            time.sleep(0.01)
        arrived = time.perf_counter()
        long = engine.generate(filler(), one_token, chat=False).timings
        if not finished.wait(_WAIT_S):
            raise TimeoutError("the streaming user did not finish")
        beside.append(ttft_ms(long))
        during = [b - a for a, b in zip(stamps, stamps[1:]) if b > arrived and a < long.first_token]
        worst.append(1000 * max(during, default=0.0))
        # gaps between events (several tokens of one event share a stamp)
        medians.append(1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]) if b > a))
    ratios = [b / a for a, b in zip(alone, beside)]
    from metronome.compile.fused import PREFILL_CHUNK

    # the plan's price of each step that runs the long prompt beside the one user decoding
    predicted = engine.plan.report.prefill_steps_ms(
        [(0, long_tokens)], 1, engine.config.prefill_chunk, PREFILL_CHUNK, len(stream_prompt) + output_tokens // 4
    )
    return {
        "repeats": repeats,
        "long_prompt_tokens": long_tokens,
        "stream_max_gap_during_prompt_ms": max(worst),
        "stream_max_gap_per_repeat_ms": [round(g, 1) for g in worst],
        "stream_median_gap_ms": statistics.median(medians),
        "predicted_max_gap_ms": max(predicted, default=float("nan")),
        "predicted_prompt_steps": len(predicted),
        "step_ms_all_slots": step_now,
        "step_ms_all_slots_calibrated": engine.plan.report.step_ms.get(engine.config.slots, float("nan")),
        "long_ttft_alone_ms": statistics.median(alone),
        "long_ttft_beside_stream_ms": statistics.median(beside),
        "ttft_beside_over_alone": statistics.median(ratios),
        "ttft_beside_over_alone_per_repeat": [round(r, 2) for r in ratios],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, extra: Sequence[str]) -> tuple[subprocess.Popen, str]:
    """`metronome serve` in a child process on a free loopback port; waits (bounded) until /health is ok."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--port", str(port), "--speech-model", "none", *extra]
    if model:
        cmd += ["--model", model]
    # Its stderr goes to a file, not a pipe: nobody reads a pipe while the levels run, and a server that
    # wrote more than the pipe holds (64 KiB: warnings, tracebacks) would block in that write, mid-level.
    with tempfile.TemporaryFile() as log:  # (closing it here leaves the child its own handle)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=30)
        raise TimeoutError(f"the server did not become ready within {_WAIT_S:.0f} s")


def median_level(runs: list[LevelResult]) -> LevelResult:
    """One level's rounds as one row: the median of each figure."""
    med = statistics.median
    return LevelResult(
        runs[0].where,
        runs[0].users,
        med(r.aggregate_tps for r in runs),
        med(r.per_user_tps for r in runs),
        med(r.predicted_tps for r in runs),
        med(r.compiled_tps for r in runs),
        med(r.ttft_ms for r in runs),
        med(r.predicted_ttft_ms for r in runs),
        _median_promise([r.promised_tps for r in runs]),
    )


def table(results: list[LevelResult], ratios: dict[int, list[float]] | None = None) -> str:
    """The levels as a markdown table; `ratios`: served ÷ in process per user, per round, by users."""
    lines = [
        "| where | users | aggregate tok/s | per user tok/s | plan's step timed before → tok/s | per user ÷ that "
        "| engine's promise → tok/s | per user ÷ promise "
        "| plan's calibration → tok/s | TTFT ms | predicted TTFT ms | served ÷ in process (rounds) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = ""
        if ratios and r.where == "served" and ratios.get(r.users):
            each = ratios[r.users]
            ratio = f"{statistics.median(each):.2f} ({', '.join(f'{x:.2f}' for x in each)})"
        # the engine predicts TTFT at submit; a served request's prediction stays in the server (NaN here)
        predicted_ttft = "-" if math.isnan(r.predicted_ttft_ms) else f"{r.predicted_ttft_ms:.0f}"
        # the speed the engine promised with each user's first token (none: an uncalibrated plan)
        promise, kept = (
            ("-", "-")
            if math.isnan(r.promised_tps)
            else (f"{r.promised_tps:.1f}", f"{r.per_user_tps / r.promised_tps:.2f}")
        )
        lines.append(
            f"| {r.where} | {r.users} | {r.aggregate_tps:.1f} | {r.per_user_tps:.1f} | {r.predicted_tps:.1f} | "
            f"{r.per_user_tps / r.predicted_tps:.2f} | {promise} | {kept} | {r.compiled_tps:.1f} | {r.ttft_ms:.0f} | "
            f"{predicted_ttft} | {ratio} |"
        )
    return "\n".join(lines)


def main(
    model: str | None,
    config: EngineConfig,
    levels: Sequence[int],
    output_tokens: int,
    served: bool,
    stall: bool,
    rounds: int = 1,
    freeze_heap: bool = False,
) -> int:
    """In process and served side by side: each round runs every level in process, then served (the
    engine idles while the server runs, and the other way round), so slow and fast minutes of a noisy
    machine fall on both; each row is the median over `rounds`, and served ÷ in process is taken per round.
    `freeze_heap`: once the engine is built, set this process's start-up objects aside from the collector,
    as `serve` does (engine/heap.py; the command's own process, not a caller's)."""
    from metronome.engine import Engine

    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    # checked before the model loads: each failed only after a level ran (a traceback, or "no median for
    # empty data")
    if max(levels, default=0) > config.slots:
        raise ValueError(
            f"--load {max(levels)}: more users than the engine's {config.slots} slots (--slots); each user "
            "holds a slot, so a level can be at most --slots"
        )
    if output_tokens < 2:
        raise ValueError(
            f"--output-tokens {output_tokens}: --load times per-user speed between tokens; ask for 2 or more"
        )
    engine = Engine.from_model(model, config=config, calibrate=True)
    if freeze_heap:  # a full collection here (94 ms once) held up the in-process engine and the client
        freeze_startup_heap()
    steps = ", ".join(f"{live}: {ms:.2f}" for live, ms in sorted(engine.plan.report.step_ms.items()))
    print(f"plan: ms per step by live slots {{{steps}}}; ", end="")
    print(
        f"prompt row beside decode {engine.plan.report.prompt_row_ms:.2f} ms, alone {engine.plan.report.prefill_row_ms:.2f} ms"
    )
    proc, url = None, ""
    if served:
        extra = [
            f"--slots={config.slots}",
            f"--spec-tokens={config.spec_tokens}",
            f"--kv-cache={config.kv_cache}",
        ]
        if config.prefill_chunk is not None:
            extra.append(f"--prefill-chunk={config.prefill_chunk}")
        if config.threads:
            extra.append(f"--threads={config.threads}")
        proc, url = start_server(model, extra)
    runs: dict[tuple[str, int], list[LevelResult]] = {}
    ratios: dict[int, list[float]] = {}
    engine.start()
    try:
        for round_ in range(rounds):
            for users in levels:
                salt = f"r{round_ + 1}.u{users}."  # each level's own prompts, the same in process and served
                result, profile = run_in_process(engine, users, output_tokens, salt)
                runs.setdefault(("in process", users), []).append(result)
                print(f"\nround {round_ + 1}, in process, {users} users: step profile\n{profile}")
                if proc is not None:
                    step_now = step_ms_now(engine, users, _mean_position(_prompts(engine, users), output_tokens))
                    level, profile = run_served(url, users, output_tokens, 1000.0 / step_now, result.compiled_tps, salt)
                    runs.setdefault(("served", users), []).append(level)
                    ratios.setdefault(users, []).append(level.per_user_tps / result.per_user_tps)
                    print(f"\nround {round_ + 1}, served, {users} users: the server's step profile and CPU by thread")
                    print(profile)
        if stall:
            print("\nstall:", json.dumps(measure_stall(engine, repeats=rounds), indent=1))
    finally:
        engine.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    results = [
        median_level(runs[(where, users)])
        for where in ("in process", "served")
        for users in levels
        if (where, users) in runs
    ]
    print(f"\nmedians over {rounds} round(s):")
    print(table(results, ratios))
    return 0
