"""Perplexity through the served API, the way lm-evaluation-harness scores text, beside the same windows in process.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/echo_perplexity.py [--model NAME] [--windows 4] [--ctx 512]

tools/perplexity.py's windows of its held-out text (the second half of each scored) go to a `metronome serve`
started here on 127.0.0.1 as token ids, with `echo: true, logprobs: 0, max_tokens: 0` (the prompt only, as lm-evaluation-harness's GPT-3 model
asked): the answer's `token_logprobs` hold every prompt token's log-probability (the first null). The same windows' negative
log-likelihoods from the plan's whole-prompt logits (perplexity.py's `metronome_nll`, float64 log-softmax)
come first, in this process, and then the server's (float32), so the two figures differ by rounding only.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from perplexity import heldout_text, metronome_nll, windows  # tools/

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load

HEALTH_WAIT_S = 300


def served_nll(url: str, wins: list[list[int]]) -> list[float]:
    out: list[float] = []
    for ids in wins:
        body = {"prompt": ids, "max_tokens": 0, "temperature": 0, "logprobs": 0, "echo": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"the server scored {len(logprobs)} tokens of a {len(ids)}-token window")
        out += [-x for x in logprobs[len(ids) // 2 :]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a registered model's name or a path (default: SmolLM2)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--port", type=int, default=8765)
    a = p.parse_args()
    loaded = load(a.model)
    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=a.ctx, threads=2), loaded=loaded)
    ids = engine.tokenizer.encode(heldout_text())
    bos = loaded.tokenizer.bos_id if loaded.tokenizer.add_bos else None
    wins = windows(ids, a.ctx, a.windows, bos)
    started = time.perf_counter()
    inproc = metronome_nll(engine, wins, loaded.config.vocab_size)
    inproc_s = time.perf_counter() - started
    del engine
    exe = Path(sys.executable).with_name("metronome")
    model = ["--model", a.model] if a.model else []
    # a window of ctx tokens plus the one token asked for: twice the context
    cmd = [str(exe), "serve", *model, "--host", "127.0.0.1", "--port", str(a.port), "--ctx", str(2 * a.ctx)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{a.port}"
    try:
        deadline = time.monotonic() + HEALTH_WAIT_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the server did not come up within {HEALTH_WAIT_S} s: {' '.join(cmd)}")
            time.sleep(0.5)
        started = time.perf_counter()
        served = served_nll(url, wins)
        served_s = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
    worst = max(abs(x - y) for x, y in zip(inproc, served))
    print(f"{a.model or 'smollm2-135m'}: {len(wins)} windows of {a.ctx} tokens, {len(served)} scored tokens")
    print(
        f"in process (plan.prefill, float64 log-softmax): perplexity {math.exp(np.mean(inproc)):.4f}, {inproc_s:.1f} s"
    )
    print(
        f"served (echo + logprobs, float32):               perplexity {math.exp(np.mean(served)):.4f}, {served_s:.1f} s"
    )
    print(f"largest per-token difference in negative log-likelihood: {worst:.2e}")


if __name__ == "__main__":
    main()
