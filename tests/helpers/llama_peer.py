"""llama.cpp (llama-cpp-python) as an independent reference for a GGUF file: open it, and compare its greedy
choices and logits with a metronome plan's on the same token ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# ggml's type id for float32 (ggml.h GGML_TYPE_F32): a KV cache of this type holds what the model computed
GGML_F32 = 0


def open_llama(path: Path, f32_cache: bool = False, ctx: int = 128):
    """llama.cpp on `path` with one thread and every row's logits kept, or a skip where llama-cpp-python is
    not installed (CI); `f32_cache` keeps its KV cache in float32 instead of float16."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    cache = {"type_k": GGML_F32, "type_v": GGML_F32} if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=ctx, n_batch=ctx, n_threads=1, logits_all=True, verbose=False, **cache
    )


@dataclass(frozen=True)
class Agreement:
    """metronome's greedy continuation of one prompt, with llama.cpp fed the same tokens."""

    tokens: list[int]  # metronome's greedy tokens
    parted: list[tuple[int, float]]  # (step, metronome's top-two gap there) where llama.cpp's argmax differs
    row_diffs: list[float]  # largest |logit difference| of each row: the prompt's rows, then each step's
    span: float  # the logit range over those rows (metronome's)

    @property
    def agreed(self) -> int:
        return len(self.tokens) - len(self.parted)

    @property
    def max_diff(self) -> float:
        return max(self.row_diffs)

    def rows_within(self, fraction: float) -> int:
        """How many rows' logits all lie within `fraction` of the logit range of llama.cpp's."""
        return sum(d <= fraction * self.span for d in self.row_diffs)


def greedy_against_llama_cpp(plan, llm, prompt: list[int], tokens: int, slot: int = 0) -> Agreement:
    """Greedy decode of `tokens` tokens after `prompt` on metronome's `plan` (one slot), llama.cpp evaluating
    the same ids (metronome's tokens, so that both always condition on one history and every step's logits
    compare). Where both choose the same token at every step, their greedy continuations are identical."""
    ours = plan.prefill(prompt, slot, all_logits=True).float()
    llm.reset()
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    rows_ours, rows_theirs = [ours], [theirs]
    out: list[int] = []
    parted: list[tuple[int, float]] = []
    last_ours, last_theirs = ours[-1], theirs[-1]
    for step in range(tokens):
        token = int(last_ours.argmax())
        if int(last_theirs.argmax()) != token:
            top = last_ours.topk(2).values
            parted.append((step, float(top[0] - top[1])))
        out.append(token)
        if step == tokens - 1:
            break
        last_ours = plan.decode([slot], [token], [len(prompt) + step])[0].float()
        llm.eval([token])
        last_theirs = torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        rows_ours.append(last_ours[None])
        rows_theirs.append(last_theirs[None])
    a, b = torch.cat(rows_ours), torch.cat(rows_theirs)
    return Agreement(out, parted, (a - b).abs().amax(dim=1).tolist(), float(a.max() - a.min()))


def assert_near(
    results: list[Agreement], what: str, within: float = 0.03, rows: float = 0.85, agree: float = 0.85
) -> str:
    """For an engine that rounds differently from llama.cpp (int8 activations, a bf16 cache): at least `rows`
    of all rows have every logit within `within` of the logit range of llama.cpp's, and at least `agree` of
    all greedy steps choose llama.cpp's token. Not every row: where a row's router logits nearly tie, the
    two engines' rounding can send it to different experts, and that row (and the rows attending to it)
    then differ by more; a token where they part is one whose top two logits differ by less than twice
    that row's difference. Returns a summary line for the test's output."""
    steps, chosen = sum(len(a.tokens) for a in results), sum(a.agreed for a in results)
    total, close = sum(len(a.row_diffs) for a in results), sum(a.rows_within(within) for a in results)
    summary = (
        f"{what}: {chosen}/{steps} greedy tokens agree, {close}/{total} rows within {within:.0%} of the logit "
        f"range, max |logit diff| {max(a.max_diff for a in results):.3g} (range {max(a.span for a in results):.3g})"
    )
    assert close >= rows * total and chosen >= agree * steps, summary
    return summary
