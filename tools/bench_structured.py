"""Structured outputs: what a JSON schema costs per token, and whether every output validates.

    flock /tmp/metronome-bench.lock python tools/bench_structured.py overhead [--tokens 96] [--rounds 5]
    flock /tmp/metronome-bench.lock python tools/bench_structured.py validity [--cases 240] [--json out.json]

`overhead`: one engine (SmolLM2 by default, greedy, speculation off so every step gives one token), the
same prompt decoded unconstrained, under a json_schema with the mask computed on the side thread (the
default), and under the same schema with the mask computed on the engine thread, for 1 user and for 4 at
once, rounds interleaved. Each request's inter-token gaps (its events' arrival times) are pooled per
variant; the medians are printed side by side with their ratio to unconstrained (the goal: <= 1.10), and
the engine's step profile per variant (where the time goes).

`validity`: `--cases` requests with seeded random schemas (nested objects, arrays with item bounds, enums,
bounded integers and numbers, optional properties, strings with patterns, lengths and formats, anyOf,
$defs references, nullable fields) and varied prompts, sent as response_format json_schema to a metronome
server started here on a loopback port, greedy and sampled. Every reply is checked with `jsonschema`
(Draft 2020-12, formats checked) against the schema the request sent. Prints how the requests ended, how
many replies validate, and those that hit max_tokens; docs/structured-outputs.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Delta, Engine
from metronome.engine.grammar import Grammars
from metronome.model.loader import load
from metronome.model.registry import resolve
from metronome.serve.server import ModelIdentity, ServerSettings, create_app
from metronome.serve.tools import closed

# -- schemas -------------------------------------------------------------------------------------------

NAMES = ["name", "title", "city", "country", "age", "year", "score", "price", "tags", "email", "status", "notes"]
SUBJECTS = ["a cat", "a city", "a recipe", "a movie", "a book", "a planet", "a car", "a person", "a song", "a team"]


def leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "short", "enum", "int", "number", "bool", "pattern", "date", "email", "null", "const"])
    if kind == "string":
        return {"type": "string", "maxLength": 40}
    if kind == "short":
        return {"type": "string", "minLength": 1, "maxLength": rng.choice([3, 8, 16])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", 1, 2, True, None], 3)}
    if kind == "int":
        low = rng.randint(-100, 10)
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice([5, 100, 10_000])}
    if kind == "number":
        return {"type": "number", "exclusiveMinimum": 0, "maximum": rng.choice([1, 10, 1000])}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[A-Z]{2}-[0-9]{3}$", "^[a-z]+$", "^\\+?[0-9]{6,10}$"])}
    if kind == "date":
        return {"type": "string", "format": rng.choice(["date", "time", "date-time"])}
    if kind == "email":
        return {"type": "string", "format": "email"}
    if kind == "null":
        return {"type": ["integer", "null"], "maximum": 99}
    return {"const": rng.choice(["v1", 3, False])}


def node(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return obj(rng, depth + 1)
    if depth < 3 and roll < 0.32:
        items = leaf(rng) if rng.random() < 0.6 else obj(rng, depth + 1)
        return {"type": "array", "items": items, "minItems": rng.choice([0, 1, 2]), "maxItems": rng.choice([2, 3, 4])}
    if roll < 0.4:
        return {"anyOf": [leaf(rng), leaf(rng)]}
    return leaf(rng)


def obj(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(NAMES, rng.randint(1, 4))
    props = {n: node(rng, depth) for n in names}
    return {"type": "object", "properties": props, "required": [n for n in names if rng.random() < 0.7]}


def schema(rng: random.Random) -> dict[str, Any]:
    root = obj(rng, 0)
    if rng.random() < 0.15:  # a definition used twice, by reference
        root["$defs"] = {
            "Money": {
                "type": "object",
                "properties": {"amount": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD"]}},
                "required": ["amount", "currency"],
            }
        }
        root["properties"]["cost"] = {"$ref": "#/$defs/Money"}
        root["properties"]["budget"] = {"type": "array", "items": {"$ref": "#/$defs/Money"}, "maxItems": 2}
    if rng.random() < 0.3:  # OpenAI's strict shape: every object closed and every property required
        root = closed(root)
        root["required"] = list(root["properties"])
    return root


def case(rng: random.Random, i: int) -> dict[str, Any]:
    s = schema(rng)
    prompt = rng.choice(
        [
            f"Describe {rng.choice(SUBJECTS)} as JSON.",
            f"Give me the facts about {rng.choice(SUBJECTS)}. Answer in JSON with the fields {', '.join(s['properties'])}.",
            f"Make up {rng.choice(SUBJECTS)} and fill this JSON schema: {json.dumps(s)}",
        ]
    )
    return {
        "messages": [{"role": "user", "content": prompt}],
        "response_format": {"type": "json_schema", "json_schema": {"name": f"case_{i}", "schema": s, "strict": True}},
        "temperature": 0.8 if i % 2 else 0,
        "seed": i,
        "max_tokens": 256,
    }


# -- validity ------------------------------------------------------------------------------------------


def validity(args: argparse.Namespace) -> None:
    import socket

    import uvicorn

    loaded = load(resolve(args.model))
    engine = Engine.from_model(config=EngineConfig(slots=args.slots, ctx=2048), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start within 60 s")
        time.sleep(0.05)
    rng = random.Random(args.seed)
    bodies = [case(rng, i) for i in range(args.cases)]
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client:

        def run(body: dict[str, Any]) -> dict[str, Any]:
            r = client.post(f"{url}/v1/chat/completions", json=body)
            return {"request": body, "status": r.status_code, "answer": r.json()}

        with ThreadPoolExecutor(args.slots) as pool:
            records = list(pool.map(run, bodies))
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()

    finishes: Counter[str] = Counter()
    valid = 0
    failures, cut = [], []
    for rec in records:
        if rec["status"] != 200:
            finishes[f"http {rec['status']}"] += 1
            failures.append(rec)
            continue
        choice = rec["answer"]["choices"][0]
        finishes[choice["finish_reason"]] += 1
        if choice["finish_reason"] == "length":
            cut.append(rec)
            continue
        s = rec["request"]["response_format"]["json_schema"]["schema"]
        try:
            validator = jsonschema.Draft202012Validator(
                s, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
            )
            validator.validate(json.loads(choice["message"]["content"]))
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append({**rec, "error": str(exc)})
    ended = len(records) - len(cut) - sum(v for k, v in finishes.items() if k.startswith("http"))
    print(f"model: {loaded.path.name}   requests: {len(records)}   wall: {wall:.1f} s")
    print(f"finish reasons: {dict(finishes)}")
    print(f"replies that ended: {ended}   valid: {valid} ({100 * valid / max(ended, 1):.1f} %)")
    print(f"cut by max_tokens ({bodies[0]['max_tokens']}): {len(cut)}")
    for f in failures[:5]:
        print("FAILED:", json.dumps(f)[:800])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"records": records, "valid": valid, "ended": ended, "wall_s": wall}, fh)


# -- overhead ------------------------------------------------------------------------------------------

OVERHEAD_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "horror"]}, "maxItems": 3},
        "cast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "role": {"type": "string", "maxLength": 40},
                },
                "required": ["name", "role"],
            },
            "minItems": 4,
            "maxItems": 12,
        },
        "summary": {"type": "string"},
    },
    "required": ["title", "year", "genres", "cast", "summary"],
}
PROMPTS = [
    "Describe the film Casablanca as JSON: title, year, genres, the cast with their roles, and a summary.",
    "Describe the film Jaws as JSON: title, year, genres, the cast with their roles, and a summary.",
    "Describe the film Alien as JSON: title, year, genres, the cast with their roles, and a summary.",
    "Describe the film Amelie as JSON: title, year, genres, the cast with their roles, and a summary.",
]


def _run(engine: Engine, grammars: Grammars | None, users: int, tokens: int) -> tuple[list[float], int]:
    """`users` requests at once; their inter-token gaps (seconds) and how many tokens they made."""
    grammar = grammars.json_schema(closed(OVERHEAD_SCHEMA), "schema", "film") if grammars is not None else None
    done = threading.Semaphore(0)
    stamps: list[list[float]] = [[] for _ in range(users)]

    def on_event(i: int):
        def f(d: Delta) -> None:
            stamps[i].append(time.perf_counter())
            if d.finish_reason is not None:
                done.release()

        return f

    # unconstrained: ignore_eos so it runs the whole budget; constrained: the grammar may end it first
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=grammars is None)
    reqs = []
    for i in range(users):
        ids = engine.encode_prompt(PROMPTS[i % len(PROMPTS)])
        constraint = grammars.constraint(grammar) if grammars is not None else None
        reqs.append(engine.submit(ids, params, on_event(i), constraint))
    for _ in range(users):
        if not done.acquire(timeout=600):
            raise TimeoutError("a request did not finish within 600 s")
    gaps = [b - a for s in stamps for a, b in zip(s[1:], s[2:])]  # from the second token (after the prompt)
    return gaps, sum(len(r.output_ids) for r in reqs)


def overhead(args: argparse.Namespace) -> None:
    loaded = load(resolve(args.model))
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=1024, spec_tokens=0), loaded=loaded)
    engine.start()
    variants: dict[str, Grammars | None] = {
        "unconstrained": None,
        "json_schema (mask thread)": Grammars(engine.tokenizer),
        "json_schema (mask inline)": Grammars(engine.tokenizer, mask_thread=False),
    }
    for g in variants.values():  # warm-up: first steps, first masks, the schema's lexer
        _run(engine, g, 1, 16)
    print(f"model: {loaded.path.name}   threads: {engine.config.threads}   tokens <= {args.tokens}")
    for users in (1, 4):
        gaps: dict[str, list[float]] = {n: [] for n in variants}
        made: Counter[str] = Counter()
        profiles: dict[str, list[float]] = {n: [0.0] * 3 for n in variants}
        for _ in range(args.rounds):
            for name, g in variants.items():
                engine.profile.reset()
                got, n = _run(engine, g, users, args.tokens)
                p = engine.profile.snapshot()
                gaps[name] += got
                made[name] += n
                for k, phase in enumerate(("plan", "sample", "emit")):
                    profiles[name][k] += 1e6 * p.seconds[phase] / max(1, p.tokens)
        base = statistics.median(gaps["unconstrained"])
        print(f"\n{users} user(s), {args.rounds} rounds, greedy")
        print(f"{'variant':<28} {'median ms/token':>16} {'ratio':>6} {'tokens':>7}   µs/token: plan sample emit")
        for name in variants:
            med = statistics.median(gaps[name])
            prof = " ".join(f"{v / args.rounds:.0f}" for v in profiles[name])
            print(f"{name:<28} {1000 * med:16.3f} {med / base:6.3f} {made[name]:7d}   {prof}")
    engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["overhead", "validity"])
    ap.add_argument("--model", default=None, help="a registered name or a path (default: SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=96, help="overhead: tokens per request (at most)")
    ap.add_argument("--rounds", type=int, default=5, help="overhead: interleaved rounds")
    ap.add_argument("--cases", type=int, default=240, help="validity: requests")
    ap.add_argument("--seed", type=int, default=0, help="validity: the random schemas' seed")
    ap.add_argument("--slots", type=int, default=4, help="validity: engine slots (requests at once)")
    ap.add_argument("--json", default=None, help="validity: write every case and its reply here")
    args = ap.parse_args()
    if args.what == "overhead" and (args.slots, args.seed) != (4, 0):
        ap.error("--slots and --seed are validity's: overhead runs 1 and 4 users on 4 slots, greedy")
    overhead(args) if args.what == "overhead" else validity(args)


if __name__ == "__main__":
    main()
