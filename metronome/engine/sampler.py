"""Choosing the next token of one request: penalties, temperature, top-k/top-p/min-p, a per-request
seeded generator, and logprobs. Each request is sampled on its own row, so its choice depends only on
its own logits, history and generator, never on its batch neighbours.

On CPU with the C++ kernels a sampled row is drawn by `DrawRows` (csrc/sample.cpp): the engine draws the
rows of a step's plainly sampled requests in one call (`Engine._picks`), and `RequestSampler.choose` sends
every other sampled row of the same requests through the same kernel, one row at a time, so a request's
tokens never depend on which way its row went. Elsewhere (torch ops, a GPU) `_truncated` and `draw` below
do it in torch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from metronome.config import SamplingParams
from metronome.kernels.ops import DrawRows


@dataclass(frozen=True)
class Choice:
    token: int
    # log-probability of `token`: the log-softmax of the logits with logit_bias and penalties applied, before
    # temperature and top-k/top-p/min-p (the model's own view of the token, whatever the sampling); None unless
    # asked
    logprob: float | None
    top: tuple[tuple[int, float], ...]  # the top_logprobs alternatives, best first


def scored(logits: torch.Tensor, tokens: list[int], top_logprobs: int) -> list[Choice]:
    """Tokens that were not sampled (a prompt's), token i scored under row i of raw logits (n, V): its
    log-probability and the top_logprobs alternatives, one log_softmax over the rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if top_logprobs:
        values, ids = torch.topk(logprobs, top_logprobs, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [Choice(t, lp, top) for t, lp, top in zip(tokens, picked, tops)]


class RequestSampler:
    """Sampling state of one request: its generator and the counts its penalties need. `draw_rows`: the
    kernel that draws its sampled CPU rows (None: torch draws them)."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, draw_rows: DrawRows | None = None
    ) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(self.seed)
        self.vocab_size = vocab_size
        self.draw_rows = draw_rows
        # _kernel_draw's (rows, inv_temp, top_k, top_p, min_p), built for the request's first such row
        self._row_settings: tuple[torch.Tensor, ...] | None = None
        self._penalized = bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)
        # nothing to apply to the row but the choice itself (no penalties, bias or logprobs): the step may choose
        # it with the other rows' (Engine._picks), greedy in one batched argmax, sampled in one kernel call
        # when draw_rows is set; params are frozen, so decided once
        bare = not (params.logprobs or params.top_logprobs or self._penalized or params.logit_bias)
        self.plain_greedy = bare and params.temperature == 0.0
        self.plain_sampled = bare and params.temperature > 0.0 and draw_rows is not None
        # logit_bias as two small tensors, built once: added to a row's few entries, not a vocabulary-wide add
        self._bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        self._bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        # the penalties' state as the few tokens it names, not vocabulary-wide tensors: a penalty then touches
        # those entries only (a penalized row took ~150 us of whole-row ops over a 49k vocabulary, and
        # observing a token ~45 us of tensor writes)
        self._counts: dict[int, int] = {}  # generated tokens only
        self._seen: set[int] = set()  # prompt + generated (repetition penalty)
        if params.repetition_penalty != 1.0:
            self._seen.update(t for t in prompt_ids if t < vocab_size)

    def observe(self, token: int) -> None:
        """Record a token that was emitted (for penalties)."""
        if not self._penalized:
            return
        self._counts[token] = self._counts.get(token, 0) + 1
        self._seen.add(token)

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (V,) float32 after logit_bias, then repetition/presence/frequency penalties (OpenAI and HF
        semantics; the bias first, as llama.cpp's sampler chain adds it). Never writes into `logits`. Each
        penalty is the same elementwise formula as over the whole row, on the entries it changes only:
        repetition x / r where x > 0, else x * r, on the tokens seen; x - f * count - p on the generated
        ones (the others' x - f * 0 - p * 0 is x)."""
        p = self.params
        if p.logit_bias:
            logits = logits.index_add(0, self._bias_ids, self._bias)
        if not self._penalized:
            return logits
        logits = logits.clone()
        if p.repetition_penalty != 1.0 and self._seen:
            ids = torch.tensor(sorted(self._seen), dtype=torch.long)
            x = logits[ids]
            logits[ids] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._counts:
            ids = torch.tensor(list(self._counts), dtype=torch.long)
            counts = torch.tensor(list(self._counts.values()), dtype=torch.float32)
            x = logits[ids]
            logits[ids] = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        return logits

    def choose(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> Choice:
        """Pick the next token from one row of logits (V,). `allowed` (bool, V) restricts the choice
        (constrained decoding); logprobs are reported from the unrestricted distribution."""
        p = self.params
        logits = self.penalize(logits[: self.vocab_size].float())
        logprobs = torch.log_softmax(logits, dim=-1) if p.logprobs or p.top_logprobs else None
        if allowed is not None:
            allowed = allowed[: self.vocab_size]  # a padded row's mask (the padding is never allowed)
        if p.temperature == 0.0:
            token = argmax_row(logits)
            # masked greedy: the row's argmax when the mask allows it (the masked argmax is then the same
            # token, ties included), so the full-size masked row is built only when the model strays
            if allowed is not None and not bool(allowed[token]):
                token = argmax_row(logits.masked_fill(~allowed, float("-inf")))
        else:
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            if self.draw_rows is not None and logits.device.type == "cpu":
                token = self._kernel_draw(logits)
            else:
                kept, weights = self._truncated(logits)
                token = draw(weights, self.generator)
                token = token if kept is None else int(kept[token])
        if logprobs is None:
            return Choice(token, None, ())
        top: tuple[tuple[int, float], ...] = ()
        if p.top_logprobs:
            values, ids = torch.topk(logprobs, p.top_logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return Choice(token, float(logprobs[token]), top)

    def uniform(self) -> float:
        """The request's next uniform number in [0, 1): one per sampled row, whichever way the row is drawn."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def _kernel_draw(self, logits: torch.Tensor) -> int:
        """One row (V,) drawn by the kernel (`draw_rows`, set), as the step draws a plain row (temperature,
        top-k, top-p, min-p)."""
        assert self.draw_rows is not None  # choose() calls it only then
        row = logits.float().contiguous()[None]
        if self._row_settings is None:  # a request's settings do not change: built for its first row alone
            self._row_settings = (torch.zeros(1, dtype=torch.long), *draw_settings([self]))
        token = self.draw_rows(row, self._row_settings[0], row.shape[1], *self._row_settings[1:], uniforms([self]))[0]
        if token < 0:
            raise ValueError("cannot sample from these logits: they hold a NaN or +inf, or every token is -inf")
        return token

    def _truncated(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tokens a sampled row may draw and their probabilities: (ids, probs), ids None for the whole
        vocabulary (probs then the full row), else the top-p nucleus alone, most likely first (sorting and
        drawing a few hundred tokens, not the vocabulary)."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        ids = None
        # top-p, then min-p, as transformers, vLLM and llama.cpp order them: top-p's mass is the whole
        # distribution's, not what min-p left (min-p's bound, a share of the top token's, is the same after:
        # the nucleus always holds the top token)
        if p.top_p < 1.0:
            ids, probs = nucleus(probs, p.top_p)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return ids, probs


def draw_settings(samplers: list[RequestSampler]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `DrawRows` takes for these requests' rows, one each, but the uniform numbers (`uniforms`):
    (inv_temp, top_k, top_p, min_p)."""
    inv_temp = torch.tensor([1.0 / s.params.temperature for s in samplers], dtype=torch.float32)
    top_k = torch.tensor([s.params.top_k for s in samplers], dtype=torch.long)
    top_p = torch.tensor([s.params.top_p for s in samplers], dtype=torch.float32)
    min_p = torch.tensor([s.params.min_p for s in samplers], dtype=torch.float32)
    return inv_temp, top_k, top_p, min_p


def uniforms(samplers: list[RequestSampler]) -> torch.Tensor:
    """Each request's next uniform number, from its own generator: the u of its row's draw."""
    return torch.tensor([s.uniform() for s in samplers], dtype=torch.float64)


def argmax_row(row: torch.Tensor) -> int:
    """The first index of the row's maximum. On a CPU float32 row, numpy's (SIMD) argmax: over a 49k
    vocabulary it takes microseconds where torch's one-row argmax takes tens (docs/structured-outputs.md)."""
    if row.device.type == "cpu" and row.dtype == torch.float32 and not row.requires_grad:
        return int(row.numpy().argmax())
    return int(torch.argmax(row))


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's first maximum index, as `argmax_row` picks it: numpy's over a CPU float32 (rows, V) block,
    where torch's batched argmax took 95 us for one 49k row and 460 us for eight here (2026-12-01)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose mass reaches top_p (of the total), most likely first,
    ties in the order of their ids: (ids, their probs).

    Sorting the whole vocabulary is the slow part (topk of 1,024 candidates took 0.2 ms a row over 49k
    tokens here). The tokens at or above a bound are the first ones in the descending order, ties and all,
    so when they hold the mass already every token below it is dropped anyway: only they are sorted, and the
    result is the full sort's. The bound is the top probability over 2^10, then 2^20, then none (a flat
    distribution's nucleus may be most of the vocabulary)."""
    goal = top_p * probs.sum()
    top = probs.max()
    for shift in (10, 20, None):
        ids = torch.nonzero(probs >= top * 2.0**-shift).squeeze(1) if shift is not None else None
        if ids is None or probs[ids].sum() >= goal:
            break
    candidates = probs if ids is None else probs[ids]
    sorted_probs, order = torch.sort(candidates, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
    n = int((before < goal).sum())  # before only grows: the kept tokens are the first n
    order = order[:n] if ids is None else ids[order[:n]]
    return order, sorted_probs[:n]


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from `probs` (V,), weights >= 0 with a positive sum, by the request's generator: the first
    token whose cumulative weight passes one uniform number times the total (a token of weight 0 is never
    drawn). torch.multinomial drew the same distribution in about 0.9 ms a row over a 49k vocabulary, with
    or without replacement, a quarter of SmolLM2's one-user step; this takes about 60 us."""
    cumulative = torch.cumsum(probs, 0, dtype=torch.float64)
    total = float(cumulative[-1]) if len(cumulative) else 0.0
    if not math.isfinite(total) or total <= 0.0:
        raise ValueError(f"cannot sample from these token weights: their sum is {total}")
    # the uniform number as a Python float: the generator is the request's own (a CPU one) whatever device the
    # row is on, where torch.multinomial wanted a generator on the row's device
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return int(torch.searchsorted(cumulative, u * total, right=True))
