"""A reflection loop timed turn by turn, against each turn's prompt uncached and one generation of equal length.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_reflect.py [--repeats 3] [--task TEXT] \
        [--rounds 3] [--max-tokens 256] [engine flags: --slots, --ctx, ...]

Two engines on the same model and flags, stepping on their own threads as `metronome serve` runs them:
one with the prefix cache (the flags' --prefix-cache-tokens), one without. Each repeat:
- the loop: `run_reflection` on the cached engine, its pool emptied first (a fresh engine per repeat), so
  only the loop's own turns fill it;
- uncached: every turn's prompt (the very ids the loop sent) run alone on the uncached engine for one
  token: that turn's TTFT had nothing been cached;
- equal tokens: the task alone, generating as many tokens as the whole loop did (ignore_eos), on the
  uncached engine.
Prints per turn the median TTFT in the loop and uncached and their ratio, decode time and tokens/s, and
the loop's wall time, its share outside decoding, against the single generation's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from metronome.agents.reflect import ReflectionDone, ReflectSettings, run_reflection
from metronome.args import add_engine_args, add_model_arg, add_reflect_args, engine_config, reflect_settings
from metronome.config import SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load

TASK = "Explain how a hash table works and when to use one."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=TASK)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=SamplingParams().max_tokens, help="per turn")
    add_model_arg(p)
    add_engine_args(p)
    add_reflect_args(p)
    args = p.parse_args()
    config, settings = engine_config(args), reflect_settings(args)
    params = SamplingParams(max_tokens=args.max_tokens)
    loaded = load(args.model)
    plain = Engine.from_model(config=dataclasses.replace(config, prefix_cache_tokens=0), loaded=loaded)
    plain.start()
    loops: list[ReflectionDone] = []
    uncached: list[list[float]] = []
    single: list[tuple[float, float, float, int]] = []
    for _ in range(args.repeats):
        engine = Engine.from_model(config=config, loaded=loaded)  # plan from the disk cache; an empty pool
        engine.start()
        prompts = _record_prompts(engine)
        done = run_reflection(engine, args.task, settings, params)
        engine.stop()
        loops.append(done)
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        uncached.append([_ms(plain.generate(ids, one).timings, "ttft") for ids in prompts])
        long = plain.generate(args.task, SamplingParams(max_tokens=done.totals.completion_tokens, ignore_eos=True))
        t = long.timings
        single.append((_ms(t, "wall"), _ms(t, "ttft"), _ms(t, "decode"), len(long.token_ids)))
    plain.stop()
    _report(loops, uncached, single, settings, params)


def _record_prompts(engine: Engine) -> list[list[int]]:
    """The prompt ids of every request submitted to `engine` from now on."""
    prompts: list[list[int]] = []
    submit = engine.submit

    def recording(ids, *rest, **kw):
        prompts.append(list(ids))
        return submit(ids, *rest, **kw)

    engine.submit = recording
    return prompts


def _ms(t, what: str) -> float:
    start = {"ttft": t.submitted, "wall": t.submitted, "decode": t.first_token}[what]
    end = {"ttft": t.first_token, "wall": t.finished, "decode": t.finished}[what]
    return (end - start) * 1000


def _report(loops, uncached, single, settings: ReflectSettings, params: SamplingParams) -> None:
    med = statistics.median
    print(
        f"reflection: {settings.rounds} rounds ({settings.turns} turns), max_tokens {params.max_tokens} per turn, "
        f"{len(loops)} repeats (medians)"
    )
    print("| turn | kind | prompt tokens | cached | TTFT ms | uncached TTFT ms | ratio | decode ms | tokens | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(loops[0].turns):
        ttft = med(d.turns[i].ttft_ms for d in loops)
        cold = med(u[i] for u in uncached)
        print(
            f"| {i} | {s.round}·{s.kind} | {s.prompt_tokens} | {s.cached_tokens} | {ttft:.1f} | {cold:.1f} | "
            f"{ttft / cold:.0%} | {med(d.turns[i].decode_ms for d in loops):.0f} | {s.completion_tokens} | "
            f"{med(d.turns[i].tokens_per_s for d in loops):.0f} |"
        )
    wall = med(d.totals.wall_ms for d in loops)
    share = med(d.totals.outside_share for d in loops)
    outside = med(d.totals.outside_ms for d in loops)
    tokens = loops[0].totals.completion_tokens
    same = all(d.texts == loops[0].texts for d in loops)
    print(
        f"loop: {tokens} tokens in {wall:.0f} ms ({tokens / wall * 1000:.0f} tok/s end to end); outside decoding "
        f"{outside:.0f} ms = {share:.1%}; every repeat gave the same texts: {same}"
    )
    w, ttft, dec, n = (med(x[i] for x in single) for i in range(4))
    print(
        f"one generation of {n:.0f} tokens: {w:.0f} ms (TTFT {ttft:.0f} ms, decode {dec:.0f} ms, "
        f"{(n - 1) / dec * 1000:.0f} tok/s); loop / single wall: {wall / w:.2f}"
    )


if __name__ == "__main__":
    main()
