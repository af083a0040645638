"""Whisper's decoding rules on one row of logits, in CTranslate2's order (the reference runner's): suppressed
tokens, the start-of-window suppression, then the timestamp rules. Disabled tokens get -inf.

numpy, single-threaded: a row is 51864 floats, and torch's intra-op threads cost more than they save on it
(docs/speech.md)."""

from __future__ import annotations

import numpy as np

from metronome.audio.tokens import WhisperTokens

_NEG_INF = float("-inf")


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def apply_rules(
    logits: np.ndarray, generated: list[int], tok: WhisperTokens, *, timestamps: bool, max_initial_timestamp: int
) -> np.ndarray:
    """logits [V] (not modified) -> the logits decoding samples from. `generated` are the tokens sampled so far
    in this window; `max_initial_timestamp` is the latest first timestamp, as an index (0.02 s steps)."""
    x = logits.copy()
    x[tok.suppressed_array] = _NEG_INF
    step = len(generated)
    if step == 0:
        x[list(tok.suppressed_at_start)] = _NEG_INF
    if not timestamps:
        return x
    begin = tok.timestamp_begin
    x[tok.no_timestamps] = _NEG_INF
    if step == 0:
        # The window opens with a timestamp, no later than max_initial_timestamp.
        x[:begin] = _NEG_INF
        x[begin + max_initial_timestamp + 1 :] = _NEG_INF
        return x
    last = generated[-1]
    check = True
    if last >= begin:
        penultimate = generated[-2] if step > 1 else last
        if penultimate >= begin:
            # A closed pair (or the opening timestamp): text or the end must follow.
            x[begin:] = _NEG_INF
            check = False
        else:
            # An open segment's end timestamp: another timestamp (not earlier) or the end.
            x[: tok.eot] = _NEG_INF
            x[begin:last] = _NEG_INF
    else:
        # Timestamps never go back: forbid those up to the last one seen.
        for t in reversed(generated):
            if t >= begin:
                x[begin : t + 1] = _NEG_INF
                break
    if check:
        logprobs = log_softmax(x)
        # When all timestamps together outweigh the likeliest text token, a timestamp comes next.
        if logsumexp(logprobs[begin:]) > logprobs[:begin].max():
            x[:begin] = _NEG_INF
    return x
