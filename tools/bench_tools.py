"""Tool-call validity: generated function schemas, real requests, every call's arguments validated.

    python tools/bench_tools.py [--model smollm2-135m] [--cases 240] [--seed 0] [--json out.json]

Builds `--cases` requests from seeded random function tools (strings with enums, lengths, patterns and
date formats; bounded integers and numbers; booleans; nullable fields; arrays with item bounds; nested
objects; anyOf; $defs references; optional properties), one to three tools a request, and sends each to
a metronome server started here on a loopback port (tool_choice cycling through required, a named function
and auto; parallel calls on and off; greedy and sampled with a seed). Every call that comes back is
checked with `jsonschema` (Draft 2020-12, formats checked) against the ORIGINAL schema of the function it
names. Prints the number of calls, the share that validate (the goal is 100 %), how the requests ended,
and the wall time; docs/tools.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import uvicorn

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.model.registry import resolve
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

WORDS = ["city", "name", "query", "count", "limit", "price", "email", "label", "color", "size", "tags", "date"]
TOPICS = ["a flight", "the weather", "a recipe", "a meeting", "an order", "a book", "a song", "a bug report"]


def leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "enum", "bounded", "pattern", "date", "integer", "number", "boolean", "nullable"])
    if kind == "string":
        return {"type": "string", "description": rng.choice(WORDS)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no", "maybe"], 3)}
    if kind == "bounded":
        return {"type": "string", "minLength": 2, "maxLength": rng.choice([5, 12, 30])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[A-Z]{3}$", "^[a-z]+-[0-9]{2}$", "^\\d{4}$"])}
    if kind == "date":
        return {"type": "string", "format": "date"}
    if kind == "integer":
        low = rng.randint(-10, 5)
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice([3, 50, 1000])}
    if kind == "number":
        return {"type": "number", "minimum": 0, "exclusiveMaximum": rng.choice([1, 100])}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"type": ["string", "null"]}


def node(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return obj(rng, depth + 1, rng.randint(1, 3))
    if depth < 2 and roll < 0.3:
        items = leaf(rng) if rng.random() < 0.7 else obj(rng, depth + 1, 2)
        return {"type": "array", "items": items, "minItems": rng.choice([0, 1]), "maxItems": rng.choice([2, 3, 5])}
    if roll < 0.38:
        return {"anyOf": [leaf(rng), leaf(rng)]}
    return leaf(rng)


def obj(rng: random.Random, depth: int, size: int) -> dict[str, Any]:
    names = rng.sample(WORDS, size)
    props = {n: node(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required}


def function(rng: random.Random, index: int) -> dict[str, Any]:
    parameters = obj(rng, 0, rng.randint(0, 4))
    if rng.random() < 0.15:  # a shared definition, referenced
        parameters["$defs"] = {
            "Point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            }
        }
        parameters["properties"]["where"] = {"$ref": "#/$defs/Point"}
    name = f"{rng.choice(['get', 'find', 'make', 'set', 'list'])}_{rng.choice(WORDS)}_{index}"
    return {
        "type": "function",
        "function": {"name": name, "description": f"Works on {rng.choice(TOPICS)}.", "parameters": parameters},
    }


def case(rng: random.Random, i: int) -> dict[str, Any]:
    tools = [function(rng, i * 10 + k) for k in range(rng.randint(1, 3))]
    mode = ["required", "named", "auto"][i % 3]
    choice: Any = (
        mode if mode != "named" else {"type": "function", "function": {"name": rng.choice(tools)["function"]["name"]}}
    )
    sampled = i % 2 == 1
    return {
        "messages": [{"role": "user", "content": f"Please help me with {rng.choice(TOPICS)}. Use the tools."}],
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": rng.random() < 0.5,
        "temperature": 0.8 if sampled else 0,
        "seed": i,
        "max_tokens": 200,
    }


class Server:
    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a registered name or a path (default: SmolLM2-135M)")
    ap.add_argument("--cases", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--json", default=None, help="write every case and its calls here")
    args = ap.parse_args()

    loaded = load(resolve(args.model))
    engine = Engine.from_model(config=EngineConfig(slots=args.slots, ctx=2048), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    rng = random.Random(args.seed)
    bodies = [case(rng, i) for i in range(args.cases)]
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    with Server(app) as url, httpx.Client(timeout=600) as client:

        def run(body: dict[str, Any]) -> dict[str, Any]:
            r = client.post(f"{url}/v1/chat/completions", json=body)
            return {"request": body, "status": r.status_code, "answer": r.json()}

        with ThreadPoolExecutor(args.slots) as pool:
            records = list(pool.map(run, bodies))
    wall = time.perf_counter() - start
    engine.stop()

    calls = valid = 0
    finishes: Counter[str] = Counter()
    failures = []
    for rec in records:
        if rec["status"] != 200:
            finishes[f"http {rec['status']}"] += 1
            failures.append(rec)
            continue
        choice = rec["answer"]["choices"][0]
        finishes[choice["finish_reason"]] += 1
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in rec["request"]["tools"]}
        for call in choice["message"].get("tool_calls") or []:
            calls += 1
            try:
                schema = schemas[call["function"]["name"]]
                validator = jsonschema.Draft202012Validator(
                    schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                )
                validator.validate(json.loads(call["function"]["arguments"]))
                valid += 1
            except (KeyError, ValueError, jsonschema.ValidationError) as exc:
                failures.append({**rec, "error": str(exc)})
    print(f"model: {loaded.path.name}   requests: {len(records)}   wall: {wall:.1f} s")
    print(f"finish reasons: {dict(finishes)}")
    print(f"tool calls: {calls}   valid: {valid} ({100 * valid / max(calls, 1):.1f} %)")
    for f in failures[:5]:
        print("FAILED:", json.dumps(f)[:600])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"records": records, "calls": calls, "valid": valid, "wall_s": wall}, fh)


if __name__ == "__main__":
    main()
