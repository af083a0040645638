"""Speculative decoding: guess a request's next few tokens cheaply, check them all in one step.

A drafter proposes up to k tokens that may follow a request's text. The plan runs the last sampled
token and the k drafts as k+1 rows of the request's slot in one step. Rows are independent (the fused
decoder's contract), so row j's logits are bitwise those plain decoding would compute once drafts
0..j-1 are the text. The engine samples from row 0 as usual; while the sampled token equals the draft,
it goes on to the next row. The first mismatch, or the row after the last draft, gives one more token
and ends the request's step.

Exact: every emitted token is sampled from the same logits, with the same per-request RNG draw, as
plain decoding would use. Greedy output is identical, and so is sampled output (the sampler draws
once per emitted token). For a deterministic drafter (prompt lookup; a draft model decoded greedily)
this is the standard speculative rejection rule with a point-mass draft distribution, so it preserves
the target distribution: a token is accepted with probability p(draft), and on rejection the emitted
token follows p restricted to the other tokens.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from metronome.compile import Plan


class Drafter(Protocol):
    def reset(self, slot: int) -> None:
        """A new request took `slot`: forget what was drafted there."""

    def propose(self, slot: int, ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `ids` (prompt + output so far) in `slot`."""


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the text's last n tokens (n from `max_n` down
    to `min_n`) and propose the tokens that followed it. Free when nothing matches; wins when the output
    quotes or edits its input (code edits, summaries with quotes, "repeat after me")."""

    def __init__(self, max_n: int = 3, min_n: int = 2, window: int = 4096) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.window = max_n, min_n, window

    def reset(self, slot: int) -> None:
        pass

    def propose(self, slot: int, ids: Sequence[int], k: int) -> list[int]:
        a = np.asarray(ids[-self.window :], dtype=np.int64)
        N = len(a)
        for n in range(min(self.max_n, N - 1), self.min_n - 1, -1):
            # starts i < N - n (not the tail itself) where a[i:i+n] equals the last n tokens
            hit = np.ones(N - n, dtype=bool)
            for j in range(n):
                hit &= a[j : N - n + j] == a[N - n + j]
            starts = np.flatnonzero(hit)
            if len(starts):  # the latest one; what followed it is never empty (i + n < N)
                i = int(starts[-1])
                return a[i + n : i + n + k].tolist()
        return []


class ModelDrafter:
    """A smaller model with the same vocabulary, decoded greedily in its own fused plan (its own KV cache,
    one slot per engine slot). Keeps each slot's cache in step with the accepted text: only the tokens
    not yet in its cache are run before drafting."""

    def __init__(self, plan: Plan, vocab_size: int) -> None:
        if not plan.runner.any_rows:
            raise ValueError("the draft model needs a fused plan (int4/int8 weights with the C++ kernels on CPU)")
        if plan.cfg.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({plan.cfg.vocab_size} tokens) differs from the model's "
                f"({vocab_size}); a draft model must share the tokenizer"
            )
        self.plan = plan
        self.valid = [0] * plan.config.slots  # tokens of the slot's text whose keys/values are in the cache
        self.fed: list[list[int]] = [[] for _ in range(plan.config.slots)]  # drafts written after them

    def reset(self, slot: int) -> None:
        self.valid[slot], self.fed[slot] = 0, []

    def propose(self, slot: int, ids: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        done = self.valid[slot]
        for d in self.fed[slot]:  # drafts that turned out right are valid cache entries
            if done < len(ids) and ids[done] == d:
                done += 1
            else:
                break
        n = len(ids)
        if n - done < 1:  # keep at least the last token to run (its logits give the first draft)
            done = n - 1
        ctx = self.plan.config.ctx
        k = min(k, ctx - n)
        if k <= 0:
            return []
        new = list(ids[done:])
        logits = self.plan.decode([slot] * len(new), new, list(range(done, n)))  # (len(new), V)
        drafts = [int(torch.argmax(logits[-1]))]
        for j in range(1, k):
            drafts.append(int(torch.argmax(self.plan.decode([slot], [drafts[-1]], [n + j - 1])[0])))
        self.valid[slot], self.fed[slot] = n, drafts[:-1]  # the last draft was never run
        return drafts
