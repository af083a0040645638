"""Transcription time, metronome's Whisper vs faster-whisper (int8 and f32), side by side in one process.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_whisper.py [--rounds 5] [--threads 2]

Runners: metronome with Q8_0 decoder matrices (the default where the C++ kernels build) and in float32,
faster-whisper int8 and float32. Clips: the Beckett sample (10 s, from useful-moonshine-onnx) and a 40-s clip built from it (5 s silence,
Beckett, 10 s silence, Beckett, 5 s silence). Each round runs every runner on every clip in turn, so machine
load hits all alike; the report gives the median seconds over the rounds, the ratio to faster-whisper int8,
and the word error rate of each transcript against the text Beckett wrote (Worstward Ho). faster-whisper runs
as the tests run it: greedy (beam_size=1), no VAD, Whisper's default temperature fallback.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
import wave
from importlib import util
from pathlib import Path

import numpy as np
import torch

TRUE_TEXT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def wer(ref: str, hyp: str) -> float:
    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)] / max(1, len(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from faster_whisper import WhisperModel

    from metronome.audio.transcribe import Transcriber, resolve_model_dir

    wav = Path(util.find_spec("moonshine_onnx").origin).parent / "assets" / "beckett.wav"
    with wave.open(str(wav)) as w:
        beckett = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    z = lambda s: np.zeros(int(s * 16000), np.float32)  # noqa: E731
    clips = {"beckett 10 s": beckett, "40-s clip": np.concatenate([z(5), beckett, z(10), beckett, z(5)])}
    truth = {"beckett 10 s": TRUE_TEXT, "40-s clip": TRUE_TEXT + " " + TRUE_TEXT}

    folder = str(resolve_model_dir(None))
    ours = {w: Transcriber.load(folder, threads=args.threads, weights=w) for w in ("q8", "f32")}
    ours["q8"].model.decoder.projection.ops.set_threads(args.threads)  # the C++ kernels' pool, same threads
    fw = {
        ct: WhisperModel(folder, device="cpu", compute_type=ct, cpu_threads=args.threads) for ct in ("int8", "float32")
    }

    def run_fw(model: WhisperModel, audio: np.ndarray) -> str:
        segments, _ = model.transcribe(audio, beam_size=1, vad_filter=False)
        return "".join(s.text for s in segments).strip()

    runners = {
        "metronome q8": lambda a: ours["q8"].transcribe(a).text,
        "metronome f32": lambda a: ours["f32"].transcribe(a).text,
        "faster-whisper int8": lambda a: run_fw(fw["int8"], a),
        "faster-whisper f32": lambda a: run_fw(fw["float32"], a),
    }
    for fn in runners.values():  # warm-up: first-call allocations, thread pools
        fn(beckett)
    times: dict[tuple[str, str], list[float]] = {(r, c): [] for r in runners for c in clips}
    texts: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):
        for clip, audio in clips.items():
            for name, fn in runners.items():
                t = time.perf_counter()
                texts[name, clip] = fn(audio)
                times[name, clip].append(time.perf_counter() - t)

    print(f"threads={args.threads} rounds={args.rounds} torch={torch.__version__}")
    print("| clip | runner | median s | x int8 time | WER vs Beckett | same text as f32 faster-whisper |")
    print("|---|---|---|---|---|---|")
    for clip in clips:
        base = statistics.median(times["faster-whisper int8", clip])
        for name in runners:
            med = statistics.median(times[name, clip])
            same = texts[name, clip] == texts["faster-whisper f32", clip]
            print(
                f"| {clip} | {name} | {med:.3f} | {med / base:.2f} | {wer(truth[clip], texts[name, clip]):.3f} | "
                f"{'yes' if same else 'no'} |"
            )
    for clip in clips:
        for name in runners:
            print(f"{clip} / {name}: {texts[name, clip]!r}")
    for tr in ours.values():
        tr.close()


if __name__ == "__main__":
    main()
