"""A Transcript in OpenAI's response formats: the `openai` client's own types read the JSON ones, and
the subtitle formats are checked against their grammar (SRT cue numbering, VTT header, clock syntax)."""

from __future__ import annotations

import re

import pytest
from openai.types.audio import Transcription, TranscriptionVerbose

from metronome.audio.formats import LANGUAGE_NAMES, ResponseFormat, language_name, render
from metronome.audio.types import Segment, Transcript, TranscriptTimings


def _transcript() -> Transcript:
    segments = (
        Segment(0, 0.0, 2.5, " Ever tried.", (1, 2, 3), -0.25, 0.01, 0.0, 1.1),
        Segment(1, 2.5, 2.5, " ", (), -1.0, 0.9, 0.2, 1.0),  # an empty segment: no cue
        Segment(2, 2.5, 3725.0016, " Fail better.", (4, 5), -0.5, 0.02, 0.2, 1.3),
    )
    timings = TranscriptTimings(3725.2, 1.0, 2.0, 3.0, 6.5)
    return Transcript(" Ever tried. Fail better.", "en", 3725.2, segments, timings)


def test_json_is_openais_transcription_with_usage():
    usage = {"type": "duration", "seconds": 3725.2, "total_time": 0.5}
    body = render(_transcript(), ResponseFormat.JSON, usage)
    parsed = Transcription.model_validate(body)
    assert parsed.text == "Ever tried. Fail better."
    assert parsed.usage.type == "duration" and parsed.usage.seconds == 3725.2
    assert render(_transcript(), ResponseFormat.JSON) == {"text": "Ever tried. Fail better."}


def test_verbose_json_is_openais_verbose_transcription():
    body = render(_transcript(), ResponseFormat.VERBOSE_JSON)
    parsed = TranscriptionVerbose.model_validate(body)  # strict enough: every segment field is required there
    assert parsed.language == "english" and parsed.duration == 3725.2
    assert [s.id for s in parsed.segments] == [0, 1, 2]
    assert parsed.segments[2].start == 2.5 and parsed.segments[2].end == 3725.002
    assert parsed.segments[0].tokens == [1, 2, 3] and parsed.segments[2].temperature == 0.2
    assert body["task"] == "transcribe"


def test_text_is_the_stripped_transcript_and_a_newline():
    assert render(_transcript(), ResponseFormat.TEXT) == "Ever tried. Fail better.\n"


def test_srt_cues_are_numbered_with_comma_clocks_and_skip_empty_segments():
    srt = render(_transcript(), ResponseFormat.SRT)
    assert srt == (
        "1\n00:00:00,000 --> 00:00:02,500\nEver tried.\n\n2\n00:00:02,500 --> 01:02:05,002\nFail better.\n\n"
    )
    clock = r"\d\d:\d\d:\d\d,\d\d\d"
    for i, cue in enumerate(srt.strip().split("\n\n"), start=1):
        number, times, text = cue.split("\n")
        assert number == str(i) and re.fullmatch(f"{clock} --> {clock}", times) and text


def test_vtt_has_its_header_and_dot_clocks():
    vtt = render(_transcript(), ResponseFormat.VTT)
    assert vtt == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nEver tried.\n\n00:00:02.500 --> 01:02:05.002\nFail better.\n\n"
    )


def test_language_names_and_formats():
    assert language_name("de") == "german" and language_name("yue") == "cantonese" and language_name("xx") == "xx"
    assert len(LANGUAGE_NAMES) == 100  # Whisper's 99 languages and Cantonese (large-v3)
    assert ResponseFormat.choices() == ("json", "text", "srt", "vtt", "verbose_json")
    assert ResponseFormat("vtt").media_type == "text/vtt" and ResponseFormat("srt").media_type == "text/plain"
    with pytest.raises(ValueError):
        ResponseFormat("csv")


def test_verbose_json_carries_each_segments_own_fields_rounded_and_usage():
    """Each segment's seek, scores and text as they are (text unstripped, as OpenAI's), times and the
    duration rounded to the millisecond, `usage` when given, served as JSON."""
    seg = Segment(0, 1.23456, 2.5, " Hi.", (1,), -0.25, 0.125, 0.4, 1.5, seek=3000)
    t = Transcript(" Hi.", "en", 12.34567, (seg,), TranscriptTimings(12.3, 1.0, 2.0, 3.0, 6.5))
    body = render(t, ResponseFormat.VERBOSE_JSON, {"type": "duration", "seconds": 12.3})
    assert body["duration"] == 12.346 and body["usage"] == {"type": "duration", "seconds": 12.3}
    s = body["segments"][0]
    assert (s["seek"], s["start"], s["text"]) == (3000, 1.235, " Hi.")
    assert (s["avg_logprob"], s["no_speech_prob"], s["temperature"], s["compression_ratio"]) == (-0.25, 0.125, 0.4, 1.5)
    assert ResponseFormat.VERBOSE_JSON.media_type == "application/json"


def test_a_clock_never_goes_negative():
    """A segment start a rounding below zero prints as 00:00:00, not a negative clock."""
    seg = Segment(0, -0.004, 1.0, " Hi.", (1,), -0.25, 0.1, 0.0, 1.0)
    t = Transcript(" Hi.", "en", 1.0, (seg,), TranscriptTimings(1.0, 1.0, 2.0, 3.0, 6.5))
    assert render(t, ResponseFormat.SRT) == "1\n00:00:00,000 --> 00:00:01,000\nHi.\n\n"
