"""A request's output text, in one place: token ids -> text pieces a client may see.

`TextStream` owns every rule between a sampled token and emitted text:
- detokenization without broken UTF-8 or lost spaces (the tokenizer's `StreamDecoder`);
- EOS and stop-token filtering: those tokens end the request and are not text;
- stop strings: emitted text is cut at the first stop string, and text that could be the start of one is
  held back until it cannot (so a stop string is never half-emitted);
- the first-sentence stamp: when the emitted text first ends a sentence (punctuation then whitespace, a
  line of text ended, or the end of a non-empty output: sentences.py), the time a voice pipeline could
  start speaking.
"""

from __future__ import annotations

from dataclasses import dataclass

from metronome.model.tokenizer import StreamDecoder
from metronome.sentences import carried, sentence_end


@dataclass(frozen=True)
class Piece:
    """What one token made final: `text` to emit now, and whether a stop string ended the output."""

    text: str
    stopped: bool = False


class TextStream:
    def __init__(
        self, decoder: StreamDecoder, stop: tuple[str, ...] = (), stop_ids: frozenset[int] = frozenset()
    ) -> None:
        self.decoder = decoder
        self.stop = stop
        self.stop_ids = stop_ids  # EOS (unless ignore_eos) and the request's stop_token_ids
        self.text = ""  # emitted so far
        self.held = ""  # decoded but held back (could start a stop string)
        self.first_sentence_at: float | None = None

    def is_stop_token(self, token: int) -> bool:
        return token in self.stop_ids

    def push(self, token: int, now: float, final: bool = False, stops: bool = True) -> Piece:
        """Take one sampled token (`final`: the request ends with it). A stop token adds no text. `stops`
        False: the stop strings do not apply to this token's text (output a grammar shapes: Constraint.stops_apply)."""
        if not self.is_stop_token(token):
            self.held += self.decoder.push(token)
        out, stopped = self._release(final, stops)
        if self.first_sentence_at is None and (
            sentence_end(carried(self.text) + out) is not None or ((final or stopped) and (self.text + out).strip())
        ):
            self.first_sentence_at = now
        self.text += out
        return Piece(out, stopped)

    def _release(self, final: bool, stops: bool = True) -> tuple[str, bool]:
        """Text safe to emit now: cut at a stop string (True), else hold back a possible stop prefix.
        Emitted text never ends with the start of a stop string, so a stop can only begin in `held`.
        Without `stops`, all of it (the stop strings are off here)."""
        if final:
            self.held += self.decoder.flush()
        if not stops:
            out, self.held = self.held, ""
            return out, False
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held = self.held[:cut], ""
            return out, True
        keep = 0 if final else max((_held_prefix(self.held, s) for s in self.stop), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, False


def _held_prefix(held: str, stop: str) -> int:
    """The longest proper prefix of `stop` that `held` ends with (0: none). Only prefixes no longer than
    `held` can match: trying every prefix of a long stop string on every token made a request with a
    200,000-character stop string hold the engine for seconds (every user's step waits on it)."""
    for k in range(min(len(stop) - 1, len(held)), 0, -1):
        if held.endswith(stop[:k]):
            return k
    return 0
