"""TextStream, model-free: a fake decoder maps token ids to fixed strings."""

from __future__ import annotations

from metronome.engine.text import TextStream

PIECES = {1: "Hello", 2: " wor", 3: "ld", 4: ".", 5: " Next", 6: " END", 7: "E", 8: "ND", 9: "!", 10: "\n", 0: ""}
PIECES |= {11: ":", 12: " "}
EOS = 99


class FakeDecoder:
    """Each token decodes to PIECES[token]; token 0 holds its text back until flush (half a character)."""

    def __init__(self) -> None:
        self.pending = ""

    def push(self, token: int) -> str:
        if token == 0:
            self.pending += "é"
            return ""
        out, self.pending = self.pending + PIECES[token], ""
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def run(
    tokens: list[int], stop: tuple[str, ...] = (), final_at: int | None = None
) -> tuple[list[str], TextStream, bool]:
    ts = TextStream(FakeDecoder(), stop, frozenset({EOS}))
    out, stopped = [], False
    for i, t in enumerate(tokens):
        piece = ts.push(t, now=float(i), final=(i == final_at) or ts.is_stop_token(t))
        out.append(piece.text)
        if piece.stopped:
            stopped = True
            break
    return out, ts, stopped


def test_text_is_emitted_as_decoded_and_eos_is_not_text():
    out, ts, stopped = run([1, 2, 3, EOS])
    assert out == ["Hello", " wor", "ld", ""] and ts.text == "Hello world" and not stopped


def test_a_stop_string_is_cut_and_never_half_emitted():
    # "END" arrives split as "E" + "ND" after " Next": the held "E" could start the stop string
    out, ts, stopped = run([1, 5, 7, 8, 1], stop=("END",))
    assert stopped and ts.text == "Hello Next" and "".join(out) == "Hello Next"
    assert out[2] == ""  # "E" held back: it could begin the stop string


def test_of_several_stop_strings_the_earliest_cuts_and_the_longest_possible_start_is_held():
    # "o" is held (it may begin "o wor"); then " wor" completes both stops: the cut is at the first to begin
    out, ts, stopped = run([1, 2], stop=(" w", "o wor"))
    assert stopped and ts.text == "Hell" and out == ["Hell", ""]
    # a stop that cannot begin here must not release what another stop may begin with
    out, ts, stopped = run([5, 7, 8, 1], stop=("ZZZ", "END"))
    assert stopped and ts.text == " Next" and out[1] == ""


def test_held_prefix_is_released_when_it_cannot_be_a_stop():
    out, ts, stopped = run([5, 7, 9], stop=("END",))
    assert not stopped and out == [" Next", "", "E!"] and ts.text == " NextE!"


def test_held_text_comes_out_at_the_end():
    out, ts, _ = run([5, 7], stop=("END",), final_at=1)
    assert ts.text == " NextE" and out[-1] == "E"
    out, ts, _ = run([1, 0], final_at=1)  # a pending half character is flushed on the last token
    assert ts.text == "Helloé"


def test_first_sentence_is_stamped_when_punctuation_meets_whitespace():
    _, ts, _ = run([1, 4, 5, 9])
    assert ts.first_sentence_at == 2.0  # "." at step 1 is only an end once " Next" follows at step 2
    _, ts, _ = run([1, 2, 3], final_at=2)
    assert ts.first_sentence_at == 2.0  # the end of a non-empty output ends its sentence
    _, ts, _ = run([EOS])
    assert ts.first_sentence_at is None  # nothing was said


def test_a_long_stop_string_costs_what_the_held_text_can_match():
    """Every token tried every prefix of every stop string: a 200,000-character stop held the engine (and so
    every user) for seconds. Only prefixes as long as the held text can match; longer stops are refused."""
    import pytest

    from metronome.config import MAX_STOP_CHARS, ParamError, SamplingParams

    class Watched(str):
        """A stop string that records the prefixes taken of it."""

        def __getitem__(self, key):
            self.taken.append(key.stop if isinstance(key, slice) else 1)
            return str.__getitem__(self, key)

    stop = Watched("x" * 5000)
    stop.taken = []
    out, ts, stopped = run([1, 2, 3, 5], stop=(stop,))
    assert not stopped and ts.text == "Hello world Next"
    assert 0 < max(stop.taken) <= len(" Next")  # never past what is held (it tried 4,999 down to 1 each time)
    with pytest.raises(ParamError) as err:
        SamplingParams(stop=("x" * (MAX_STOP_CHARS + 1),))
    assert err.value.param == "stop"
    assert SamplingParams(stop=("x" * MAX_STOP_CHARS,)).stop


def test_the_longest_possible_start_of_one_stop_string_is_held():
    """Held "EE" may begin "EEND" as "E" and as "EE": the longer is held, else the first "E" goes out and the
    stop string, completed by "ND", was half emitted and never matched."""
    out, ts, stopped = run([5, 7, 7, 8, 1], stop=("EEND",))
    assert stopped and ts.text == " Next" and out == [" Next", "", "", ""]


def test_the_first_sentence_stamp_at_a_stop_whitespace_and_a_second_sentence():
    """Output cut by a stop string ends its sentence there; whitespace alone is not a sentence; the stamp is
    the first end's and a later sentence does not move it."""
    _, ts, stopped = run([1, 5, 7, 8], stop=("END",))
    assert stopped and ts.first_sentence_at == 3.0
    _, ts, _ = run([10, EOS])
    assert ts.first_sentence_at is None
    _, ts, _ = run([1, 4, 5, 9, 10, 1])
    assert ts.first_sentence_at == 2.0 and ts.text == "Hello. Next!\nHello"


def test_a_line_of_text_ended_by_a_later_token_stamps_the_first_sentence():
    """Hello, ":" then a space then a line break, four tokens: the line ends (and the stamp is taken) at the
    line break's token, though the text before it ended in a space."""
    _, ts, _ = run([1, 11, 12, 10, 1])
    assert ts.first_sentence_at == 3.0
    _, ts, _ = run([10, 10, 1, 10])
    assert ts.first_sentence_at == 3.0  # blank lines first are no sentence; the line after them is
