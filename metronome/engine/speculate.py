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

import collections
import statistics
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np
import torch

from metronome.compile import Plan
from metronome.engine.sampler import argmax_row

if TYPE_CHECKING:
    from metronome.model.tokenizer import Tokenizer


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


def check_draft_tokenizer(draft: str, drafts: Tokenizer, target: Tokenizer) -> None:
    """A draft model's ids mean the model's tokens only when both tokenizers have the same vocabulary: a
    vocabulary of the same size but other tokens drafted nothing right (checked before either compile)."""
    mine, theirs = drafts.vocabulary(), target.vocabulary()
    if mine != theirs:
        differ = sum(theirs.get(text) != i for text, i in mine.items()) + max(0, len(theirs) - len(mine))
        raise ValueError(
            f"draft={draft!r}: its tokenizer differs from the model's ({len(mine)} tokens against {len(theirs)}, "
            f"{differ} of them not the same); a draft model must share the model's tokenizer"
        )


class ModelDrafter:
    """A smaller model with the same vocabulary, decoded greedily in its own fused plan (its own KV cache,
    one slot per engine slot). Keeps each slot's cache in step with the accepted text: only the tokens
    not yet in its cache are run before drafting.

    Greedy drafting is sequential, one draft-model step per token, unless `lookup` (prompt lookup) guesses
    the continuation: then the guess rides as extra rows in the call that catches the cache up (rows are
    independent, so the row of guess j gives the logits sequential decoding would after guesses 0..j-1),
    and the guessed tokens the draft model agrees with are taken in that one call. The drafts are the same
    tokens as without `lookup`, only cheaper where the answer copies its prompt (a code edit): one
    draft-model call a step where the whole guess agrees, instead of one per token.

    A catch-up runs at most `catch_up` tokens. Where more are missing (the first call after a long prompt,
    after prompt lookup drafted a long copied stretch, after a long pause) the slot's cache is started
    again with the text's first `sink` tokens and its last `catch_up`, at positions 0.. (rotary positions
    are relative: the window reads as a text of its own). Drafts then see less context, which can only
    change how many are accepted, not the output; the catch-up costs a fixed few draft steps instead of a
    pass over the whole text (docs/models.md has the figures). The first tokens are kept because
    attention leans on them whatever follows (StreamingLLM's "attention sinks"). None: no limit."""

    def __init__(
        self,
        plan: Plan,
        vocab_size: int,
        lookup: Drafter | None = None,
        catch_up: int | None = 64,
        sink: int = 4,
    ) -> None:
        if (catch_up is not None and catch_up < 1) or sink < 0:
            raise ValueError(f"need catch_up >= 1 (or None) and sink >= 0 (got catch_up={catch_up}, sink={sink})")
        if not plan.runner.any_rows:
            raise ValueError(
                "the draft model needs a fused plan (int4/int8 weights with the C++ kernels on CPU), and this "
                "run's settings give the torch path (it takes the model's --kernels, --weights and --device)"
            )
        if plan.cfg.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({plan.cfg.vocab_size} tokens) differs from the model's "
                f"({vocab_size}); a draft model must share the tokenizer"
            )
        self.plan, self.lookup, self.catch_up, self.sink = plan, lookup, catch_up, sink
        slots = plan.config.slots
        # what the slot's cache holds is a view of its text: text[:sink] + text[cut:] once a catch-up was cut
        # (cut 0: the whole text), token i of the view at position i
        self.cut = [0] * slots
        self.valid = [0] * slots  # tokens of the view whose keys/values are in the cache
        self.fed: list[list[int]] = [[] for _ in range(slots)]  # drafts written after them
        self.calls = 0  # draft-model decode calls (for tests and measurements)
        self.cuts = 0  # catch-ups cut to the window (for tests and measurements)

    def reset(self, slot: int) -> None:
        self.valid[slot], self.fed[slot], self.cut[slot] = 0, [], 0
        if self.lookup is not None:
            self.lookup.reset(slot)

    def _view(self, slot: int, ids: Sequence[int]) -> Sequence[int]:
        cut = self.cut[slot]
        return ids if cut == 0 else [*ids[: self.sink], *ids[cut:]]

    def _decode(self, slot: int, tokens: list[int], first: int, logits_from: int = 0) -> torch.Tensor:
        """Run `tokens` at positions first.. into the slot's cache; logits of rows logits_from.. only (the
        head reads a vocabulary-wide matrix per row: most of a long catch-up's time if every row had it)."""
        self.calls += 1
        positions = list(range(first, first + len(tokens)))
        return self.plan.decode([slot] * len(tokens), tokens, positions, list(range(logits_from, len(tokens))))

    def propose(self, slot: int, ids: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        view = self._view(slot, ids)  # the text as the cache holds it: positions below are the view's
        done = self.valid[slot]
        for d in self.fed[slot]:  # drafts that turned out right are valid cache entries
            if done < len(view) and view[done] == d:
                done += 1
            else:
                break
        if self.catch_up is not None and len(view) - done > self.catch_up and len(ids) - self.catch_up > self.sink:
            # too far behind: keep the first tokens (the same at positions 0..sink-1 in every view) and
            # start the rest again from the window
            self.cut[slot], self.cuts = len(ids) - self.catch_up, self.cuts + 1
            view, done = self._view(slot, ids), min(done, self.sink)
        n = len(view)
        if n - done < 1:  # keep at least the last token to run (its logits give the first draft)
            done = n - 1
        ctx = self.plan.config.ctx
        k = min(k, ctx - n)
        if k <= 0:
            return []
        # the tokens not yet in the cache (positions done..n-1), then the lookup's guess of the next ones
        # (positions n..): the row of position n-1+i predicts the token at n+i, as sequential decoding
        # would while guesses 0..i-1 equal the drafts before it
        guess = self.lookup.propose(slot, ids, k - 1) if self.lookup is not None and k > 1 else []
        last = n - 1 - done  # the row of the text's last token: the rows before it only fill the cache
        logits = self._decode(slot, [*view[done:], *guess], done, logits_from=last)  # (1 + len(guess), V)
        drafts = [argmax_row(logits[0])]
        for i, g in enumerate(guess):
            if drafts[i] != g or len(drafts) == k:
                break  # guess i is not what the model drafts: the rows after it are of another text
            drafts.append(argmax_row(logits[1 + i]))
        # positions n.. of the cache now hold guesses; the ones that differ from the drafts are rewritten
        # below, by the sequential steps, before anything reads them
        for j in range(len(drafts), k):
            drafts.append(argmax_row(self._decode(slot, [drafts[-1]], n + j - 1)[0]))
        self.valid[slot], self.fed[slot] = n, drafts[:-1]  # the last draft was never run
        return drafts


class PayingDrafter:
    """Drafts only while drafting pays. Every draft costs: a row of the step that checks it (close to free
    where a one-row step is bound by memory, up to half of that step on an AVX2 CPU bound by its arithmetic
    at a few rows, docs/models.md), and for a draft model its own time as well.

    It times itself: `propose` is called once per engine step while one request runs, so the time from the
    end of one call to the start of the next is the rest of that step (verification, sampling, emitting),
    and the call itself is the drafting. Drafting pays when the tokens it emits come faster than plain
    steps would: over a window of `window` drafting steps, the sum of (1 + accepted) * plain exceeds the sum
    of draft + step times, with `plain` the step time measured while not drafting (until one is measured:
    the step itself, speculation's premise being that extra rows of a memory-bound step are nearly free;
    a short plain probe after `probe_after` drafting steps measures it early, and another after every
    `reprobe_after` drafting steps without a plain one, so that a plain step timed while the caches were
    cold, or minutes ago, cannot keep drafting on). When a window does not pay,
    drafting pauses for `pause` steps (doubling while it keeps losing, up to `max_pause`), then tries again;
    the first step after a pause (the draft model catching up on the paused tokens) is not judged.
    Drafts never change the output (see above), only its speed: timing noise can cost speed, never
    correctness."""

    def __init__(
        self,
        inner: Drafter,
        window: int = 8,
        pause: int = 8,
        max_pause: int = 256,
        probe_after: int = 4,
        probe: int = 2,
        reprobe_after: int = 128,
        plain_steps: int = 15,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not (window >= 1 and 1 <= pause <= max_pause and probe >= 1 and plain_steps >= 1 and reprobe_after >= 1):
            raise ValueError(
                "need window >= 1, 1 <= pause <= max_pause, probe >= 1, reprobe_after >= 1 and plain_steps >= 1 "
                f"(got window={window}, pause={pause}, max_pause={max_pause}, probe={probe}, "
                f"reprobe_after={reprobe_after}, plain_steps={plain_steps})"
            )
        self.reprobe_after = reprobe_after
        self._since_plain = 0  # judged drafting steps since the last plain step was timed
        self.inner, self.clock, self.window = inner, clock, window
        self.min_pause, self.max_pause, self.probe_after, self.probe = pause, max_pause, probe_after, probe
        # the last plain steps' times, kept across requests; their median is the plain step (a mean was
        # dragged for hundreds of steps by one step that a collection or another process stretched)
        self.plain_times: collections.deque[float] = collections.deque(maxlen=plain_steps)
        self.pause = pause  # the next pause's length
        self.paused = 0  # steps left without drafting
        self.drafting_steps = 0  # judged drafting steps, all requests
        self.pauses = 0  # pauses for not paying (not counting the probe)
        self._gain = self._cost = 0.0  # this window: (1 + accepted) * plain, and draft + step seconds
        self._judged = 0  # steps in this window
        self._resumed = False  # the next drafting step follows a pause (not judged)
        self._last: tuple[int, int, int, float, float] | None = None  # slot, len(ids), drafts, end, draft s

    def reset(self, slot: int) -> None:
        self.inner.reset(slot)
        self._last = None

    @property
    def plain_s(self) -> float | None:
        """Seconds per step without drafts: the median of the last `plain_steps` (None before one ran)."""
        return statistics.median(self.plain_times) if self.plain_times else None

    def propose(self, slot: int, ids: Sequence[int], k: int) -> list[int]:
        start = self.clock()
        self._observe(slot, len(ids), start)
        if self.paused > 0:
            self.paused -= 1
            self._resumed = True
            self._last = (slot, len(ids), 0, self.clock(), 0.0)
            return []
        drafts = self.inner.propose(slot, ids, k)
        end = self.clock()
        self._last = (slot, len(ids), len(drafts), end, end - start)
        return drafts

    def _observe(self, slot: int, n: int, now: float) -> None:
        """Learn from the step that ran since the last call (only when exactly one step of `slot` ran)."""
        if self._last is None:
            return
        last_slot, last_n, drafted, end, draft_s = self._last
        emitted = n - last_n  # 1 + the drafts accepted
        if last_slot != slot or not 1 <= emitted <= drafted + 1:
            return
        step_s = now - end
        if drafted == 0:
            self.plain_times.append(step_s)
            self._since_plain = 0
            return
        if self._resumed:
            self._resumed = False
            return
        self._gain += emitted * (self.plain_s if self.plain_s is not None else step_s)
        self._cost += draft_s + step_s
        self._judged += 1
        self.drafting_steps += 1
        self._since_plain += 1
        if self._since_plain >= (self.probe_after if self.plain_s is None else self.reprobe_after):
            self.paused = self.probe  # time plain steps: early, then now and then
        elif self._judged >= self.window:
            if self._gain < self._cost:
                self.paused, self.pause = self.pause, min(self.max_pause, 2 * self.pause)
                self.pauses += 1
            else:
                self.pause = self.min_pause  # paying again: the next pause (if any) starts short
            self._gain = self._cost = 0.0
            self._judged = 0


class LookupOrModel:
    """Prompt lookup while the text copies, the draft model where it stops copying.

    Where the answer copies its prompt (a code edit) prompt lookup's guesses are free and nearly as good as
    the draft model's, while each draft-model step costs a call that reads all its weights, and its first
    call a catch-up on the text so far (docs/models.md has the figures). So a slot starts with lookup alone
    and calls the draft model only after `misses` steps in a row in which lookup's guess was not taken
    whole (or there was none); it goes back to lookup alone after `hits` steps in a row in which lookup's
    guess, computed beside the draft model's, agreed with every token the step emitted. The draft model
    catches up on the tokens it did not see at its next call, as rows of that one call. Drafts differ with
    the mode; the output does not (verification is exact)."""

    def __init__(self, lookup: Drafter, model: PayingDrafter, slots: int, misses: int = 6, hits: int = 4) -> None:
        if not (slots >= 1 and misses >= 1 and hits >= 1):
            raise ValueError(f"need slots, misses and hits >= 1 (got slots={slots}, misses={misses}, hits={hits})")
        self.lookup, self.model, self.misses, self.hits = lookup, model, misses, hits
        self.modelled = [False] * slots  # whether the slot drafts with the model now
        self.streak = [0] * slots  # lookup's misses in a row (lookup mode) or its agreements (model mode)
        self.guessed: list[tuple[int, list[int]] | None] = [None] * slots  # (len(ids), lookup's last guess)
        self.switches = 0  # changes of mode (for measurements)

    def reset(self, slot: int) -> None:
        self.lookup.reset(slot)
        self.model.reset(slot)
        self.modelled[slot], self.streak[slot], self.guessed[slot] = False, 0, None

    def propose(self, slot: int, ids: Sequence[int], k: int) -> list[int]:
        # did the text go on as lookup's previous guess said (every guessed token emitted by that step)?
        last = self.guessed[slot]
        whole = last is not None and len(last[1]) > 0 and list(ids[last[0] : last[0] + len(last[1])]) == last[1]
        guess = self.lookup.propose(slot, ids, k)
        self.guessed[slot] = (len(ids), guess)
        if self.modelled[slot]:
            self.streak[slot] = self.streak[slot] + 1 if whole else 0
            if self.streak[slot] >= self.hits:
                self.modelled[slot], self.streak[slot] = False, 0
                self.switches += 1
                return guess
            return self.model.propose(slot, ids, k)
        self.streak[slot] = 0 if whole else self.streak[slot] + 1
        if self.streak[slot] >= self.misses:
            self.modelled[slot], self.streak[slot] = True, 0
            self.switches += 1
            return self.model.propose(slot, ids, k)
        return guess
