"""Stream one chat request of 200 tokens three times from a running server; print chunks/s and TTFT.

python tools/stream_probe.py PORT
"""

import argparse
import json
import time

import httpx

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("port", type=int, help="the server's port on 127.0.0.1")
port = parser.parse_args().port
rates = []
for _ in range(3):
    body = {
        "model": "metronome",
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    t0, first, n = time.perf_counter(), None, 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                if d["choices"] and d["choices"][0]["delta"].get("content"):
                    n += 1
                    if first is None:
                        first = time.perf_counter()
    rates.append((n - 1) / (time.perf_counter() - first))
print("chunks/s per run:", [round(r, 1) for r in rates], "ttft(last) ms", round((first - t0) * 1000))
