"""Speculation with a draft model on code editing (the answer quotes most of its prompt) and free writing.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/spec_draft.py \
        --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b [--drafters lookup+model,model] [--rounds 3]

Runs `metronome.bench.decode.measure_speculation` (plain and speculative engines side by side in each round,
greedy and seeded sampling, outputs compared token for token) on the workloads below and prints its table.
With --draft the engine drafts with prompt lookup while the text copies and with the draft model where it
does not, paused where it does not pay (`LookupOrModel`, `PayingDrafter`); --drafters measures that and the
alternatives in one process (the models compile once).
"""

from __future__ import annotations

import argparse
import os

import torch

from metronome.bench.decode import measure_speculation, speculation_markdown
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.engine.speculate import LookupOrModel, NgramDrafter, PayingDrafter
from metronome.model.loader import load

FUNCTION = """def summarize(values):
    x = 0
    total = 0.0
    smallest = None
    largest = None
    for value in values:
        if value is None:
            continue
        x += 1
        total += value
        if smallest is None or value < smallest:
            smallest = value
        if largest is None or value > largest:
            largest = value
    if x == 0:
        return {"count": 0, "mean": None, "min": None, "max": None}
    mean = total / x
    print(f"summarized {x} values, mean {mean:.3f}")
    return {"count": x, "mean": mean, "min": smallest, "max": largest}
"""

CLASS = """class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, qty):
        if qty <= 0:
            raise ValueError("qty must be positive")
        self.items[name] = self.items.get(name, 0) + qty

    def remove(self, name, qty):
        have = self.items.get(name, 0)
        if qty > have:
            raise ValueError(f"only {have} of {name} left")
        self.items[name] = have - qty
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())
"""

WORKLOADS: tuple[tuple[str, str, bool], ...] = (
    (
        "code edit: rename a variable",
        "Rename the variable `x` to `count` in this function. Reply with the whole function only.\n\n"
        f"```python\n{FUNCTION}```",
        True,
    ),
    (
        "code edit: add a method",
        "Add a method `__len__` returning the number of distinct items to this class. Reply with the whole "
        f"class only.\n\n```python\n{CLASS}```",
        True,
    ),
    ("free writing: a story", "Write a short story (about 200 words) about a lighthouse keeper.", False),
    ("free writing: explain", "Explain in two paragraphs how a hash table works.", False),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument(
        "--drafters",
        default="lookup+model",
        help="comma-separated, each measured against plain decoding in turn: lookup+model (what --draft builds: "
        "lookup while the text copies, the draft model where it does not, all of it paused where it does not "
        "pay), lookup+model-unjudged (only the draft model's steps judged, as before 2026-12-05), model (the "
        "draft model every step, paused where it does not pay), model-always (never paused), lookup (prompt "
        "lookup alone, paused where it does not pay: what an engine without --draft builds), lookup-always",
    )
    p.add_argument(
        "--catch-ups",
        default=None,
        help="comma-separated values of the draft model's catch_up (the most tokens one catch-up runs; none: no "
        "limit), each measured with every drafter; default: what --draft builds",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=320, help="max_tokens (outputs end on EOS before it)")
    p.add_argument("--spec-tokens", type=int, default=4)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--only", default=None, help="run only the workloads whose name contains this")
    a = p.parse_args()
    workloads = tuple(w for w in WORKLOADS if a.only is None or a.only in w[0])
    torch.set_num_threads(a.threads)
    loaded = load(a.model)
    engines = {
        k: Engine.from_model(
            config=EngineConfig(slots=1, ctx=a.ctx, threads=a.threads, spec_tokens=k, draft=a.draft if k else None),
            loaded=loaded,
        )
        for k in (0, a.spec_tokens)
    }
    spec = engines[a.spec_tokens]
    built = spec.drafter
    if not (isinstance(built, PayingDrafter) and isinstance(built.inner, LookupOrModel)):
        raise SystemExit(
            f"expected PayingDrafter(LookupOrModel(lookup, PayingDrafter(ModelDrafter))) from --draft, got {built!r}"
        )
    model = built.inner.model.inner
    catch_ups = (
        [model.catch_up]
        if a.catch_ups is None
        else [None if c.strip() == "none" else int(c) for c in a.catch_ups.split(",")]
    )
    for catch_up, name in ((c, n) for c in catch_ups for n in a.drafters.split(",")):
        model.catch_up = catch_up
        paying = PayingDrafter(model)
        both = LookupOrModel(NgramDrafter(), paying, slots=1)
        spec.drafter = {
            "model": paying,
            "model-always": model,
            "lookup": PayingDrafter(NgramDrafter()),
            "lookup-always": NgramDrafter(),
            "lookup+model": PayingDrafter(both),
            "lookup+model-unjudged": both,
        }[name]
        results = measure_speculation(
            None, a.threads, a.tokens, a.rounds, a.ctx, a.spec_tokens, workloads=workloads, engines=engines
        )
        print(speculation_markdown(results, a.spec_tokens, f"{name}, draft model {a.draft}, catch_up {catch_up}"))
        if name.startswith("lookup+model"):
            print(f"\nLookupOrModel: {both.switches} switches between lookup and the draft model")
        if isinstance(spec.drafter, PayingDrafter) and spec.drafter is not paying:
            judge = spec.drafter
            print(f"\nPayingDrafter (all drafts): {judge.pauses} pauses, {judge.drafting_steps} judged drafting steps")
        if name in ("model", "lookup+model", "lookup+model-unjudged"):
            print(
                f"\nPayingDrafter: {paying.pauses} pauses, {paying.drafting_steps} judged drafting steps, plain "
                f"step {(paying.plain_s or float('nan')) * 1000:.1f} ms; the draft model's catch-ups cut to the "
                f"window so far: {model.cuts}"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
