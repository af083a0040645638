"""What the chat page's answers get when a browser on the server's own machine reads them, beside the same
questions with no browser. Starts `metronome serve` (bench/load.py's `start_server`), then, `--rounds` times
in turn: one conversation of `--questions` questions typed into the page in Debian's chromium (headless,
driven by playwright; never `playwright install`), and the same conversation sent by a plain client. Each
answer's speed is the server's own (usage: completion tokens after the first over completion_time), as the
page shows it; chromium's CPU by process type is read from /proc around each answer.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_chat_page.py [--rounds 3] \
        [--max-tokens 120] [--spec-tokens 0] [--threads N]

Each conversation's first answer pays the page's (or the server's) start and is left out of the medians.
docs/performance.md ("The chat page on the server's machine") has figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

QUESTIONS = (
    "Tell me a short story about a lighthouse.",
    "Now one about a cat.",
    "And a poem about rain.",
    "Summarize all three.",
    "Write a limerick.",
    "Explain photosynthesis briefly.",
)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 120_000  # the longest one answer may take on the page


def chromium_cpu_s() -> dict[str, float]:
    """CPU seconds so far of each chromium process type (browser, renderer, gpu-process, ...), from /proc."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:  # gone meanwhile
            continue
        if "chrom" not in stat[stat.index("(") : stat.rindex(")")]:
            continue
        kind = cmd.split("--type=")[1].split()[0] if "--type=" in cmd else "browser"
        fields = stat[stat.rindex(")") + 2 :].split()
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def speed(usage: dict) -> float:
    return (usage["completion_tokens"] - 1) / usage["completion_time"]


def on_page(browser, url: str, max_tokens: int) -> list[tuple[float, float, str]]:
    """The conversation on the page: (tok/s, chromium CPU s, the page's timing line) per answer."""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    answers: list[tuple[float, float, str]] = []
    try:
        page.goto(url)
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=WAIT_MS)
        page.fill("#max-tokens", str(max_tokens))
        for question in QUESTIONS:
            before = sum(chromium_cpu_s().values())
            with page.expect_response("**/v1/chat/completions", timeout=WAIT_MS) as response:
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=WAIT_MS)
            cpu = sum(chromium_cpu_s().values()) - before
            usage = next(u for u in reversed(events(response.value.text())) if u.get("usage"))["usage"]
            answers.append((speed(usage), cpu, page.locator(".turn .timing").first.text_content()))
    finally:
        page.close()
    return answers


def events(body: str) -> list[dict]:
    """The JSON events of a whole SSE body."""
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


def plain(url: str, max_tokens: int) -> list[float]:
    """The same conversation from a plain client (no browser): tok/s per answer."""
    import httpx

    messages, speeds = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=WAIT_MS / 1000).json()
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        speeds.append(speed(answer["usage"]))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="conversations on the page and without it, in turn")
    parser.add_argument("--max-tokens", type=int, default=120, help="the page's max tokens per answer")
    parser.add_argument("--spec-tokens", type=int, default=0, help="`serve --spec-tokens` (default 0: off)")
    parser.add_argument("--threads", type=int, default=None, help="`serve --threads` (default: every core)")
    parser.add_argument("--model", default=None, help="`serve --model` (default: the embedded SmolLM2)")
    args = parser.parse_args()

    from playwright import sync_api

    from metronome.bench.load import start_server

    extra = ["--spec-tokens", str(args.spec_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
    server, url = start_server(args.model, extra)
    page_speeds: list[float] = []
    page_cpu: list[float] = []
    plain_speeds: list[float] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                for r in range(args.rounds):
                    answers = on_page(browser, url, args.max_tokens)
                    for _tps, cpu, line in answers:
                        print(f"round {r + 1}, page:  {line}  (chromium {cpu:.2f} s of CPU)", flush=True)
                    page_speeds += [tps for tps, _cpu, _line in answers[1:]]
                    page_cpu += [cpu for _tps, cpu, _line in answers[1:]]
                    speeds = plain(url, args.max_tokens)
                    print(f"round {r + 1}, no browser: " + ", ".join(f"{s:.1f}" for s in speeds) + " tok/s", flush=True)
                    plain_speeds += speeds[1:]
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(
        f"median of answers 2-{len(QUESTIONS)}: on the page {statistics.median(page_speeds):.1f} tok/s "
        f"(chromium {statistics.median(page_cpu):.2f} s of CPU an answer), no browser "
        f"{statistics.median(plain_speeds):.1f} tok/s"
    )


if __name__ == "__main__":
    main()
