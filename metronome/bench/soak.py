"""`metronome bench --soak DURATION`: a server under mixed, misbehaving load for a while, and what it must keep.

Users (2 x the server's slots unless --concurrency) send requests back to back for DURATION: chat and text
completions, streamed and whole, prompts of 10 to 1,500 tokens (log-uniform: many short, some long),
1 to --output-tokens tokens each; some streams are dropped by their client after a few chunks, some requests
are cancelled by their client after a random wait. Every client wait has a timeout.

Pass:
- no request lost or hung: each completes (200, a finish reason, and `[DONE]` when streamed), is cancelled
  by its own client, or gets a clean error (OpenAI's error shape);
- the server's resident memory at the end is within 5 % of what it was at the end of the warm-up (the
  first 20 % of the run), when the server's process is known (started here, or --server-pid);
- /metrics adds up once the clients are done: generation requests received = completed + cancelled + failed
  + rejected, nothing in flight; engine requests submitted = finished;
- the server still answers a plain request afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from metronome.bench.workloads import CharEstimate, PromptBuilder, TokenCounter, load_corpus

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
OUTCOMES = ("completed", "cancelled", "failed", "rejected")  # serve/prometheus.py's


def parse_duration(text: str) -> float:
    """Seconds of '90', '45s', '10m', '1.5h'. ValueError names the value."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--soak {text!r}: want a positive duration like 45s, 10m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float
    users: int
    min_prompt_tokens: int = 10
    max_prompt_tokens: int = 1500
    max_output_tokens: int = 64
    stream_share: float = 0.5  # requests streamed (the rest ask for the whole answer)
    disconnect_share: float = 0.15  # streamed requests whose client drops the connection after a few chunks
    cancel_share: float = 0.1  # requests their client cancels after a random wait of up to `cancel_within_s`
    cancel_within_s: float = 3.0
    request_timeout_s: float = 300.0  # a request still open after this is "hung"
    warmup_share: float = 0.2  # the first part of the run, before the memory baseline is taken
    rss_tolerance: float = 0.05
    settle_s: float = 60.0  # after the clients stop: time for cancelled requests to leave the engine
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.users < 1:
            raise ValueError(
                f"a soak needs a positive duration and at least 1 user (got {self.duration_s}, {self.users})"
            )
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens or self.max_output_tokens < 1:
            raise ValueError("prompt lengths need 1 <= min <= max, and at least 1 output token")


@dataclass
class Tally:
    """What the clients saw."""

    outcomes: Counter = field(default_factory=Counter)  # completed / cancelled / error / lost / hung
    kinds: Counter = field(default_factory=Counter)  # streamed / whole, chat / completions, disconnect / cancel
    errors: Counter = field(default_factory=Counter)  # clean errors by HTTP status and code
    problems: list[str] = field(default_factory=list)  # the first lost and hung requests, described
    prompt_tokens: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # completed requests, sent to last byte

    def add(self, outcome: str, detail: str) -> None:
        self.outcomes[outcome] += 1
        if outcome in ("lost", "hung") and len(self.problems) < 20:
            self.problems.append(f"{outcome}: {detail}")
        if outcome == "error":
            self.errors[detail] += 1


@dataclass
class Check:
    name: str
    ok: bool
    text: str


@dataclass
class SoakResult:
    config: SoakConfig
    url: str
    tally: Tally
    checks: list[Check]
    elapsed_s: float

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        t, o = self.tally, self.tally.outcomes
        sent = sum(o.values())
        lines = [
            f"soak: {self.elapsed_s:.0f} s, {self.config.users} users, {self.url}",
            f"requests: {sent} sent: {o['completed']} completed, {o['cancelled']} cancelled by their client "
            f"({t.kinds['disconnect']} dropped mid-stream, {t.kinds['cancel']} cancelled), {o['error']} clean "
            f"errors{_errors(t.errors)}, {o['lost']} lost, {o['hung']} hung",
            f"  streamed {t.kinds['streamed']}, whole {t.kinds['whole']}; chat {t.kinds['chat']}, completions "
            f"{t.kinds['completions']}; prompts {_spread(t.prompt_tokens)} tokens (estimated)",
        ]
        if t.latencies_s:
            lat = sorted(t.latencies_s)
            lines.append(
                f"  completed requests: median {statistics.median(lat):.2f} s, p99 {lat[int(0.99 * (len(lat) - 1))]:.2f} s"
            )
        lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.text}" for c in self.checks]
        lines += [f"  {p}" for p in t.problems]
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _errors(errors: Counter) -> str:
    return f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})" if errors else ""


def _spread(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{min(values)}-{max(values)} (median {statistics.median(values):.0f})"


# -- one request --------------------------------------------------------------------------------------


def clean_error(response: httpx.Response) -> str | None:
    """'STATUS code' when the body is OpenAI's error shape, else None (a malformed error counts as lost)."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return None
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return None
    return f"{response.status_code} {error['code'] or error['type']}"


class Client:
    """One soak user's requests against `base` (an http://host:port), all through one connection pool."""

    def __init__(self, http: httpx.AsyncClient, model: str, config: SoakConfig, prompts: PromptBuilder) -> None:
        self.http, self.model, self.config, self.prompts = http, model, config, prompts

    def body(self, rng: random.Random, key: str, chat: bool, stream: bool) -> tuple[dict, int]:
        c = self.config
        tokens = round(math.exp(rng.uniform(math.log(c.min_prompt_tokens), math.log(c.max_prompt_tokens))))
        prompt = self.prompts.build(key, tokens)
        body: dict = {
            "model": self.model,
            "max_tokens": rng.randint(1, c.max_output_tokens),
            "temperature": rng.choice((0.0, 0.7)),
            "stream": stream,
        }
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(1 << 31)
        if chat:
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        return body, prompt.input_tokens

    async def request(self, rng: random.Random, key: str, tally: Tally) -> None:
        c = self.config
        chat, stream = rng.random() < 0.5, rng.random() < c.stream_share
        body, tokens = self.body(rng, key, chat, stream)
        drop_after = rng.randint(1, 8) if stream and rng.random() < c.disconnect_share else None
        cancel_after = rng.uniform(0.0, c.cancel_within_s) if rng.random() < c.cancel_share else None
        tally.kinds.update(("streamed" if stream else "whole", "chat" if chat else "completions"))
        tally.prompt_tokens.append(tokens)
        path = ENDPOINTS[0] if chat else ENDPOINTS[1]
        started = time.perf_counter()
        talk = asyncio.ensure_future(self._talk(path, body, drop_after))
        try:
            if cancel_after is not None:
                done, _ = await asyncio.wait({talk}, timeout=cancel_after)
                if not done:
                    talk.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await talk
                    tally.kinds["cancel"] += 1
                    tally.add("cancelled", "cancelled by its client")
                    return
            outcome, detail = await asyncio.wait_for(talk, timeout=c.request_timeout_s)
        except asyncio.TimeoutError:
            tally.add("hung", f"{key} {path} stream={stream}: no end after {c.request_timeout_s:g} s")
            return
        except httpx.HTTPError as exc:
            tally.add("lost", f"{key} {path} stream={stream}: {type(exc).__name__}: {exc}")
            return
        if outcome == "cancelled":
            tally.kinds["disconnect"] += 1
        if outcome == "completed":
            tally.latencies_s.append(time.perf_counter() - started)
        tally.add(outcome, detail if outcome == "error" else f"{key} {path} stream={stream}: {detail}")

    async def _talk(self, path: str, body: dict, drop_after: int | None) -> tuple[str, str]:
        if not body["stream"]:
            r = await self.http.post(path, json=body)
            if r.status_code != 200:
                return self._refused(r)
            try:
                finish = r.json()["choices"][0]["finish_reason"]
            except (ValueError, KeyError, IndexError, TypeError):
                return "lost", f"a 200 without choices: {r.text[:200]!r}"
            return ("completed", "") if finish in ("stop", "length") else ("lost", f"finish_reason {finish!r}")
        async with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return self._refused(r)
            chunks, finished = 0, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return ("completed", "") if finished else ("lost", "[DONE] without a finish reason")
                try:
                    event = json.loads(line[6:])
                except ValueError:
                    return "lost", f"a malformed event: {line[:200]!r}"
                if not isinstance(event, dict):  # valid JSON, but not an event (it ended the whole soak)
                    return "lost", f"an event that is not an object: {line[:200]!r}"
                if "error" in event:
                    fake = httpx.Response(500, json=event)
                    shape = clean_error(fake)
                    return ("error", f"streamed {shape}") if shape else ("lost", f"a malformed error: {line[:200]!r}")
                finished |= any(ch.get("finish_reason") for ch in event.get("choices") or ())
                chunks += 1
                if drop_after is not None and chunks >= drop_after and not finished:
                    return "cancelled", "dropped mid-stream by its client"
            return "lost", f"the stream ended after {chunks} events without [DONE]"

    @staticmethod
    def _refused(r: httpx.Response) -> tuple[str, str]:
        shape = clean_error(r)
        return (
            ("error", shape)
            if shape
            else ("lost", f"HTTP {r.status_code} not in OpenAI's error shape: {r.text[:200]!r}")
        )


# -- the server's side --------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    r = await http.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


def rss_of(pid: int) -> Callable[[], int | None]:
    """The resident memory of process `pid` in bytes (Linux /proc), None once it is gone."""
    path = Path(f"/proc/{pid}/status")

    def read() -> int | None:
        try:
            for line in path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    return read


def account_checks(before: dict[str, float], after: dict[str, float], tally: Tally) -> list[Check]:
    """/metrics over the soak (after - before): each account adds up, nothing is left in flight, and the
    server counted the requests the clients sent (all of them, but for those their client cancelled, which
    may have gone before the server read them)."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    checks = []
    parts, received, ended = [], 0.0, 0.0
    for endpoint in ENDPOINTS:
        received += delta(f'metronome_api_requests_received_total{{endpoint="{endpoint}"}}')
    sent, cancelled = sum(tally.outcomes.values()), tally.kinds["cancel"]
    checks.append(
        Check(
            "/metrics counted the requests sent",
            sent - cancelled <= received <= sent,
            f"received {received:.0f} of {sent} sent ({cancelled} cancelled by their client, perhaps before sending)",
        )
    )
    for outcome in OUTCOMES:
        n = sum(delta(f'metronome_api_requests_ended_total{{endpoint="{e}",outcome="{outcome}"}}') for e in ENDPOINTS)
        ended += n
        parts.append(f"{outcome} {n:.0f}")
    flying = after.get("metronome_api_requests_in_flight", float("nan"))
    checks.append(
        Check(
            "/metrics requests add up",
            received == ended and flying == 0,
            f"received {received:.0f} = {' + '.join(parts)} (+ {flying:.0f} in flight)",
        )
    )
    submitted = delta("metronome_engine_requests_submitted_total")
    finished = {
        k.split('reason="')[1].rstrip('"}'): delta(k)
        for k in after
        if k.startswith("metronome_engine_requests_finished_total{")
    }
    engine_flying = after.get("metronome_engine_requests_in_flight", float("nan"))
    checks.append(
        Check(
            "/metrics engine requests add up",
            submitted == sum(finished.values()) and engine_flying == 0,
            f"submitted {submitted:.0f} = "
            + " + ".join(f"{reason} {n:.0f}" for reason, n in sorted(finished.items()))
            + f" (+ {engine_flying:.0f} in flight)",
        )
    )
    return checks


def memory_check(samples: list[tuple[float, int]], warmup_end: float, tolerance: float) -> Check:
    """Resident memory at the end (median of the last tenth of the samples) against the end of the warm-up
    (median of the samples in the tenth after it)."""
    after = [(t, rss) for t, rss in samples if t >= warmup_end]
    if len(after) < 4:
        return Check("server memory flat", False, f"only {len(after)} memory samples after the warm-up")
    tenth = max(2, len(after) // 10)
    base = statistics.median(rss for _, rss in after[:tenth])
    end = statistics.median(rss for _, rss in after[-tenth:])
    peak = max(rss for _, rss in after)
    growth = end / base - 1
    mb = 1 / 2**20
    return Check(
        "server memory flat",
        end - base <= tolerance * base,  # not growth: 105 / 100 - 1 rounds to just over 0.05
        f"{base * mb:.1f} MiB after the warm-up ({warmup_end:.0f} s), {end * mb:.1f} MiB at the end "
        f"({growth:+.1%}, limit {tolerance:+.0%}), peak {peak * mb:.1f} MiB",
    )


# -- the run ------------------------------------------------------------------------------------------


async def soak(
    url: str,
    config: SoakConfig,
    rss: Callable[[], int | None] | None = None,
    counter: TokenCounter | None = None,
    notify: Callable[[str], None] = lambda _msg: None,
) -> SoakResult:
    """Run the soak against `url` (http://host:port of an OpenAI-compatible metronome server). `rss`: reads
    the server's resident memory (None: the memory check is skipped and said so)."""
    prompts = PromptBuilder(load_corpus(), config.seed, counter or CharEstimate())
    tally = Tally()
    limits = httpx.Limits(max_connections=config.users + 4, max_keepalive_connections=config.users + 4)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        try:
            models = (await http.get("/v1/models")).json()["data"]
            before = await scrape(http)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ConnectionError(f"cannot reach a metronome server at {url}: {type(exc).__name__}: {exc}") from None
        model = models[0]["id"]
        started = time.monotonic()
        deadline = started + config.duration_s
        samples: list[tuple[float, int]] = []

        async def sample_memory() -> None:
            while True:
                value = rss() if rss is not None else None
                if value is not None:
                    samples.append((time.monotonic() - started, value))
                await asyncio.sleep(1.0)

        async def user(u: int) -> None:
            rng = random.Random(f"{config.seed}|user{u}")
            client = Client(http, model, config, prompts)
            n = 0
            while time.monotonic() < deadline:
                await client.request(rng, f"u{u}r{n}", tally)
                n += 1

        async def progress() -> None:
            while True:
                await asyncio.sleep(30.0)
                o = tally.outcomes
                notify(
                    f"{time.monotonic() - started:.0f} s: {sum(o.values())} requests ({o['completed']} completed, "
                    f"{o['cancelled']} cancelled, {o['error']} errors, {o['lost']} lost, {o['hung']} hung)"
                )

        watchers = [asyncio.create_task(sample_memory()), asyncio.create_task(progress())]
        try:
            await asyncio.gather(*(user(u) for u in range(config.users)))
        finally:
            for w in watchers:
                w.cancel()
        elapsed = time.monotonic() - started
        # a server that died or stopped answering is the soak's verdict, not the bench's crash
        try:
            after: dict[str, float] | str = await _settled(http, config.settle_s)
        except httpx.HTTPError as exc:
            after = f"/metrics did not answer after the soak: {type(exc).__name__}: {exc}"
        try:
            final = await http.post(
                ENDPOINTS[1], json={"model": model, "prompt": "One, two, three,", "max_tokens": 4}, timeout=120.0
            )
            served = (final.status_code == 200, f"a plain request answered HTTP {final.status_code}")
        except httpx.HTTPError as exc:
            served = (False, f"a plain request got no answer: {type(exc).__name__}: {exc}")
    o = tally.outcomes
    checks = [
        Check("no request lost or hung", o["lost"] == 0 and o["hung"] == 0, f"{o['lost']} lost, {o['hung']} hung"),
        Check("some requests completed", o["completed"] > 0, f"{o['completed']} completed"),
        *(
            account_checks(before, after, tally)
            if isinstance(after, dict)
            else [Check("/metrics add up", False, after)]
        ),
        Check("serves after the soak", *served),
    ]
    if rss is not None:
        checks.append(memory_check(samples, config.warmup_share * config.duration_s, config.rss_tolerance))
    return SoakResult(config, url, tally, checks, elapsed)


async def _settled(http: httpx.AsyncClient, settle_s: float) -> dict[str, float]:
    """/metrics once nothing is in flight, or after `settle_s` (the checks then report what is left)."""
    deadline = time.monotonic() + settle_s
    while True:
        m = await scrape(http)
        idle = m.get("metronome_api_requests_in_flight") == 0 and m.get("metronome_engine_requests_in_flight") == 0
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.2)


def server_slots(url: str) -> int:
    """The server's slot count, from /metrics (`metronome_slots`)."""
    try:
        with httpx.Client(base_url=url, timeout=30.0) as http:
            value = parse_metrics(http.get("/metrics").text).get("metronome_slots")
    except httpx.HTTPError as exc:
        raise ConnectionError(
            f"cannot reach {url}/metrics ({type(exc).__name__}: {exc}); check that the server is running and --url is right"
        ) from exc
    if not value:
        raise ValueError(f"{url}/metrics has no metronome_slots: not a metronome server? give --concurrency")
    return int(value)
