"""Perplexity of a model on held-out real text: metronome's plans beside llama.cpp on the same GGUF and token ids.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/perplexity.py --model qwen2.5-coder-0.5b \
        [--weights auto f32] [--kv-cache auto int8] [--windows 8] [--ctx 512] [--threads 2] [--no-llama-cpp]

The text is CPython's own help topics (`pydoc_data.topics`: the language reference's prose, shipped with
every Python, never used to tune anything here), tokenized once by metronome and given to both engines as
the same ids. As llama.cpp's perplexity tool does, it is cut into windows of --ctx tokens (the model's BOS
first when it adds one) and only the second half of each window is scored, so every scored token has at
least ctx/2 tokens of context. llama.cpp runs in process through llama-cpp-python (`make bench-peers`).
Each --weights runs with each --kv-cache format its plan allows (int8 only on the fused decoder).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from metronome.compile.plan import PlanError
from metronome.config import EngineConfig, KvCache
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.model.tokenizer import Tokenizer


def heldout_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(ids: list[int], ctx: int, n: int, bos: int | None) -> list[list[int]]:
    """`n` windows of `ctx` tokens, each opening with `bos` where given. `ids` may already open with it
    (the tokenizer adds it for such models): the first window had it twice, Gemma's perplexity 3.5 % higher."""
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    body = ctx - (bos is not None)
    out = []
    for w in range(n):
        chunk = ids[w * body : (w + 1) * body]
        if len(chunk) < body:
            break
        out.append(([bos] if bos is not None else []) + chunk)
    return out


def nll(logits: np.ndarray, ids: list[int], start: int) -> list[float]:
    """-log p(ids[t+1] | ids[:t+1]) for t from start-1, from logits (T, >=V) float."""
    x = torch.from_numpy(np.asarray(logits[start - 1 : len(ids) - 1], dtype=np.float64))
    logp = torch.log_softmax(x, dim=-1)
    target = torch.tensor(ids[start:])
    return (-logp[torch.arange(len(target)), target]).tolist()


def metronome_nll(engine: Engine, wins: list[list[int]], vocab: int) -> list[float]:
    out: list[float] = []
    for ids in wins:
        logits = engine.plan.prefill(ids, 0, all_logits=True)[:, :vocab].float().numpy()
        out += nll(logits, ids, len(ids) // 2)
    return out


def llama_cpp_nll(path: str, wins: list[list[int]], ctx: int, threads: int, vocab: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_threads=threads, logits_all=True, verbose=False)
    out: list[float] = []
    for ids in wins:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids), :vocab])
        out += nll(logits, ids, len(ids) // 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--weights", nargs="+", default=["auto", "f32"])
    p.add_argument("--kv-cache", nargs="+", default=["auto"], choices=KvCache.choices())
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-llama-cpp", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    loaded = load(a.model)
    ids = Tokenizer(loaded.tokenizer).encode(heldout_text())
    bos = loaded.tokenizer.bos_id if loaded.tokenizer.add_bos else None
    wins = windows(ids, a.ctx, a.windows, bos)
    rows = []
    for weights in a.weights:
        for kv in a.kv_cache:
            config = EngineConfig(slots=1, ctx=a.ctx, threads=a.threads, weights=weights, kv_cache=kv)
            try:
                engine = Engine.from_model(config=config, loaded=loaded)
            except PlanError as exc:  # int8 KV with weights that do not run on the fused decoder
                print(f"skipped weights={weights} kv_cache={kv}: {exc}")
                continue
            started = time.perf_counter()
            scores = metronome_nll(engine, wins, loaded.config.vocab_size)
            rows.append((f"metronome {engine.plan.weights}, KV {kv}", scores, time.perf_counter() - started))
            del engine
    if not a.no_llama_cpp:
        started = time.perf_counter()
        scores = llama_cpp_nll(str(loaded.path), wins, a.ctx, a.threads, loaded.config.vocab_size)
        rows.append(("llama.cpp", scores, time.perf_counter() - started))
    if not rows:
        raise SystemExit("nothing to score: every weights/kv-cache pair was skipped, and --no-llama-cpp")
    ref, first = (math.exp(float(np.mean(rows[i][1]))) for i in (-1, 0))
    print(
        f"{a.model}: {len(wins)} windows of {a.ctx} tokens, {len(rows[0][1])} scored tokens "
        f"(pydoc_data.topics, {len(ids)} tokens in all)"
    )
    print("| engine | perplexity | vs first row | vs last row | seconds |\n|---|---:|---:|---:|---:|")
    for name, scores, seconds in rows:
        ppl = math.exp(float(np.mean(scores)))
        print(f"| {name} | {ppl:.4f} | {ppl / first:.4f}x | {ppl / ref:.4f}x | {seconds:.1f} |")


if __name__ == "__main__":
    main()
