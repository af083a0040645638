"""Where the first sentence of an output ends: the rule the engine stamps `time_to_first_sentence` by and
`metronome bench` measures a stream by, in one place (a light module: the bench imports no engine).

A sentence has ended once its mark (. ! ? or the CJK full-width ones) is followed by whitespace, since
before the whitespace arrives "3." may still become "3.14"; or when the output ends with text in it.
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f](\s)")


def sentence_end(text: str) -> int | None:
    """Index in `text` of the character that shows its first sentence has ended (the whitespace after the
    mark), or None while none has."""
    match = SENTENCE_END.search(text)
    return match.start(1) if match else None
