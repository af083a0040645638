"""A Transcript in the response formats of OpenAI's transcription API: json, text, srt, vtt, verbose_json.

json and verbose_json are dicts (the caller serializes them), the others text. Field names and shapes are
OpenAI's, so that the `openai` client's types read them; `usage` carries the timings besides OpenAI's
`{"type": "duration", "seconds": ...}`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from metronome.audio.types import Segment, Transcript

# Whisper's language codes and the names OpenAI's verbose_json reports ("en" -> "english").
_LANGUAGES = (
    "en english,zh chinese,de german,es spanish,ru russian,ko korean,fr french,ja japanese,pt portuguese,"
    "tr turkish,pl polish,ca catalan,nl dutch,ar arabic,sv swedish,it italian,id indonesian,hi hindi,"
    "fi finnish,vi vietnamese,he hebrew,uk ukrainian,el greek,ms malay,cs czech,ro romanian,da danish,"
    "hu hungarian,ta tamil,no norwegian,th thai,ur urdu,hr croatian,bg bulgarian,lt lithuanian,la latin,"
    "mi maori,ml malayalam,cy welsh,sk slovak,te telugu,fa persian,lv latvian,bn bengali,sr serbian,"
    "az azerbaijani,sl slovenian,kn kannada,et estonian,mk macedonian,br breton,eu basque,is icelandic,"
    "hy armenian,ne nepali,mn mongolian,bs bosnian,kk kazakh,sq albanian,sw swahili,gl galician,mr marathi,"
    "pa punjabi,si sinhala,km khmer,sn shona,yo yoruba,so somali,af afrikaans,oc occitan,ka georgian,"
    "be belarusian,tg tajik,sd sindhi,gu gujarati,am amharic,yi yiddish,lo lao,uz uzbek,fo faroese,"
    "ht haitian creole,ps pashto,tk turkmen,nn nynorsk,mt maltese,sa sanskrit,lb luxembourgish,my myanmar,"
    "bo tibetan,tl tagalog,mg malagasy,as assamese,tt tatar,haw hawaiian,ln lingala,ha hausa,ba bashkir,"
    "jw javanese,su sundanese,yue cantonese"
)
LANGUAGE_NAMES: dict[str, str] = dict(entry.split(" ", 1) for entry in _LANGUAGES.split(","))


class ResponseFormat(str, Enum):
    JSON = "json"
    TEXT = "text"
    SRT = "srt"
    VTT = "vtt"
    VERBOSE_JSON = "verbose_json"

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(f.value for f in cls)

    @property
    def media_type(self) -> str:
        return {"json": "application/json", "verbose_json": "application/json", "vtt": "text/vtt"}.get(
            self.value, "text/plain"
        )


def language_name(code: str) -> str:
    """OpenAI's name of a language ("en" -> "english"); an unknown code is returned as is."""
    return LANGUAGE_NAMES.get(code, code)


def render(transcript: Transcript, fmt: ResponseFormat, usage: dict[str, Any] | None = None) -> dict[str, Any] | str:
    """The response body of `transcript` in `fmt`: a dict for json and verbose_json, else text."""
    text = transcript.text.strip()
    if fmt is ResponseFormat.JSON:
        return {"text": text, **({"usage": usage} if usage is not None else {})}
    if fmt is ResponseFormat.VERBOSE_JSON:
        body: dict[str, Any] = {
            "task": transcript.task,
            "language": language_name(transcript.language),
            "duration": round(transcript.duration, 3),
            "text": text,
            "segments": [_segment(s) for s in transcript.segments],
        }
        if usage is not None:
            body["usage"] = usage
        return body
    if fmt is ResponseFormat.TEXT:
        return text + "\n"
    if fmt is ResponseFormat.SRT:
        return "".join(
            f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
            for i, s in enumerate(_cues(transcript), start=1)
        )
    return "WEBVTT\n\n" + "".join(
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n" for s in _cues(transcript)
    )


def _cues(transcript: Transcript) -> list[Segment]:
    """Segments with text: an empty cue is not valid in SRT and says nothing in VTT."""
    return [s for s in transcript.segments if s.text.strip()]


def _segment(s: Segment) -> dict[str, Any]:
    return {
        "id": s.id,
        "seek": s.seek,  # the window's offset in 10-ms frames, as OpenAI's and faster-whisper's
        "start": round(s.start, 3),
        "end": round(s.end, 3),
        "text": s.text,
        "tokens": list(s.tokens),
        "temperature": s.temperature,
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
    }


def _clock(seconds: float, decimal: str) -> str:
    """hh:mm:ss,mmm (SRT) or hh:mm:ss.mmm (VTT)."""
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"
