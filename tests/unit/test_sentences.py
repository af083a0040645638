"""The first-sentence rule (metronome/sentences.py) the engine stamps and the bench measures by."""

import pytest

from metronome.bench.metrics import first_sentence_chunk
from metronome.sentences import sentence_end


@pytest.mark.parametrize("mark", [".", "!", "?", "\u3002", "\uff01", "\uff1f"])
def test_every_sentence_mark_ends_a_sentence_once_whitespace_follows(mark):
    assert sentence_end(f"Yes{mark} Then") == 4
    assert sentence_end(f"Yes{mark}") is None  # the mark alone may still become "3.14"


def test_the_end_is_the_whitespace_after_the_mark_not_the_character_after_it():
    assert sentence_end("It rained. Then") == 10
    # the chunk holding the whitespace shows the end, not the chunk after it
    assert first_sentence_chunk(["It rained.", " ", "Then"]) == 1


def test_a_sentence_ending_after_the_start_of_the_text_is_found():
    assert sentence_end("pi is 3.14 and so on. More") == 21


def test_a_newline_after_the_mark_ends_a_sentence_as_a_space_does():
    assert sentence_end("Done.\nNext") == 5
    assert sentence_end("Done.\tNext") == 5
    assert first_sentence_chunk(["Done.", "\n", "Next"]) == 1


def test_a_line_of_text_ends_at_its_line_break():
    """A colon before code or a list, a heading, a list item: the line break ends the first sentence where no
    mark did (before, "Here is the function:" waited for a mark in the code below, or for the answer's end)."""
    assert sentence_end("Here is the function:\n```python") == 21
    assert sentence_end("## Colors\n- red") == 9
    assert sentence_end("done: \t\nNext") == 7  # spaces or tabs between the text and the break
    assert sentence_end("a: b. c") == 5  # the earlier end wins
    assert sentence_end("a: b\n c. d") == 4
    assert first_sentence_chunk(["The numbers are:", "\n\n", "1, 2"]) == 1


def test_blank_lines_end_no_sentence():
    assert sentence_end("\n\n  \n\t\n") is None
    assert sentence_end("\n\nHi") is None  # the text after the blank lines has not ended yet
    assert sentence_end("\n\nHi\n") == 4


@pytest.mark.parametrize(
    ("before", "after", "ends"),
    [("string:", "\n", True), ("done: ", "\n", True), ("done:\t ", "\n", True), ("Yes.", " ", True), ("", "\n", False)],
)
def test_what_is_carried_finds_an_end_that_two_pieces_make(before, after, ends):
    """The engine checks each new piece with the end of the text before it: enough of it to see an end the
    two make together, whatever spaces the earlier piece ended with."""
    from metronome.sentences import carried

    assert (sentence_end(carried(before) + after) is not None) is ends
    assert (sentence_end(before + after) is not None) is ends
    assert len(carried("x" * 10_000 + "ab  ")) == 3  # the last character and its spaces, not the whole text


def test_the_chat_page_stamps_its_first_sentence_by_the_same_rule():
    """The chat page (serve/static/chat.html) times "first sentence" in the browser with its own copy of the
    rule, in JavaScript: the same pattern, less the groups that say where the end is."""
    import re
    from pathlib import Path

    import metronome.serve
    from metronome.sentences import SENTENCE_END

    page = (Path(metronome.serve.__file__).parent / "static" / "chat.html").read_text()
    (js,) = re.findall(r"firstSentence === null && /(.+?)/\.test\(text\)", page)
    assert js == SENTENCE_END.pattern.replace("(", "").replace(")", "")
