"""Where the first sentence of an output ends: the rule the engine stamps `time_to_first_sentence` by and
`metronome bench` measures a stream by, in one place (a light module: the bench imports no engine).

A sentence has ended once its mark (. ! ? or the CJK full-width ones) is followed by whitespace, since
before the whitespace arrives "3." may still become "3.14"; once a line that holds text ends ("Here is the
function:\n", a heading, a list item, a line of verse: what a text-to-speech voice would speak as one unit,
where the marks alone waited for a mark in the code or list below, or for the end of the answer); or when the
output ends with text in it.
"""

from __future__ import annotations

import re

# a mark and the whitespace after it, or text and the line break that ends its line (spaces or tabs between)
SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f](\s)|\S[ \t]*(\n)")


def sentence_end(text: str) -> int | None:
    """Index in `text` of the character that shows its first sentence has ended (the whitespace after the
    mark, or the line break), or None while none has."""
    match = SENTENCE_END.search(text)
    if match is None:
        return None
    return match.start(1) if match.start(1) >= 0 else match.start(2)


def carried(text: str) -> str:
    """The end of `text` that `sentence_end` must see again with the text that follows it, to find an end
    the two make together: the last non-blank character and the spaces or tabs after it ("string:" then
    "\\n", "Yes." then " ", "done: " then "\\n")."""
    i = len(text)
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    return text[max(0, i - 1) :]
