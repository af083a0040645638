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
