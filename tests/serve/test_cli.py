"""The command line, run as a user runs it: a subprocess, output piped (so no progress display)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from metronome.args import engine_config, sampling_params
from metronome.cli import build_parser
from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load


def _metronome(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metronome.cli", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def _in_process(args: tuple[str, ...]):
    """The engine and sampling params the CLI builds from `args`, built here in the test process."""
    ns = build_parser().parse_args(list(args))
    loaded = load(ns.model)
    return Engine.from_model(config=engine_config(ns), loaded=loaded), sampling_params(ns)


def test_generate_prints_the_engines_greedy_text_and_reports_speed(tiny_hf):
    args = (
        "generate",
        "a dog and a fish",
        "--model",
        str(tiny_hf("llama")),
        "--max-tokens",
        "6",
        "--raw",
        "--weights",
        "f32",
        "--temperature",
        "0",
    )
    out = _metronome(*args)
    assert out.returncode == 0, out.stderr
    engine, params = _in_process(args)
    expected = engine.generate("a dog and a fish", params, chat=False)
    # the tiny random model falls into loops for many prompts: this one's text depends on the prompt
    assert expected.text.strip() and engine.generate("sun moon star", params, chat=False).text != expected.text
    assert out.stdout == expected.text + "\n"  # bit-for-bit determinism: the same greedy text
    assert f"{len(expected.token_ids)} tokens" in out.stderr and "tokens/s" in out.stderr and "TTFT" in out.stderr
    assert "loading" not in out.stderr  # piped: quiet


def test_generate_with_max_tokens_zero_runs_the_prompt_and_times_only_that(tiny_hf):
    out = _metronome("generate", "a dog", "--model", str(tiny_hf("llama")), "--max-tokens", "0", "--raw")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "\n"
    assert "[0 tokens · " in out.stderr and " ms in all]" in out.stderr
    assert "TTFT" not in out.stderr and "nan" not in out.stderr  # no token, so no time to it and no rate


def test_chat_refuses_max_tokens_zero_before_loading(tmp_path):
    """Every reply of a chat with --max-tokens 0 was empty, for ever (chat completions refuse it too)."""
    out = _metronome("chat", "--model", str(tmp_path / "no-such-model"), "--max-tokens", "0", stdin="hi\n")
    assert out.returncode == 2 and "--max-tokens" in out.stderr and "at least 1 token" in out.stderr, out.stderr


def test_generate_says_what_the_plan_could_not_do(tiny_hf, tmp_path):
    """Piped, `generate` ran several times slower on torch ops when the C++ kernels could not build (a
    read-only HOME or cache) without a word: the reason went only to the loading spinner, not shown when
    piped. (A plan that cannot be saved is the other PlanReport.warnings; test_fused checks it is one.)"""
    import os

    blocked = tmp_path / "a-file"
    blocked.write_text("where the cache's folder would be")
    env = {**os.environ, "METRONOME_CACHE_DIR": str(blocked / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "metronome.cli",
        "generate",
        "hi",
        "--model",
        str(tiny_hf("llama")),
        "--max-tokens",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("metronome: warning: ")]
    assert len(warnings) == 1, out.stderr
    assert "C++ kernels unavailable" in warnings[0] and "torch ops" in warnings[0], warnings


def test_a_prompt_that_is_not_utf8_is_refused_by_name(tiny_hf):
    """Bytes that are not UTF-8 in an argument (Python keeps them as lone surrogates) reached the tokenizer:
    a TypeError traceback after the load, and in `chat` the conversation was lost with it."""
    model = str(tiny_hf("llama"))
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    out = _metronome("generate", bad, "--model", model, "--max-tokens", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "prompt is not valid UTF-8: byte 0xe9 at character 3" in out.stderr, out.stderr
    chat = subprocess.run(
        [sys.executable, "-m", "metronome.cli", "chat", "--model", model, "--max-tokens", "2"],
        input=b"caf\xe9\nhello\n",
        capture_output=True,
        timeout=300,
    )
    err = chat.stderr.decode("utf-8", "replace")
    assert chat.returncode == 0 and "Traceback" not in err, err
    assert "prompt[0].content is not valid UTF-8" in err and "(/reset starts" not in err, err
    assert "[2 tokens" in err, err  # the next line was answered


def test_generate_is_reproducible_with_a_seed(tiny_hf):
    args = (
        "generate",
        "the cat",
        "--model",
        str(tiny_hf("qwen3")),
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--seed",
        "5",
        "--raw",
        "--weights",
        "f32",
    )
    assert _metronome(*args).stdout == _metronome(*args).stdout


def test_chat_keeps_the_conversation(tiny_hf):
    args = ("chat", "--model", str(tiny_hf("llama")), "--max-tokens", "4", "--weights", "f32", "--temperature", "0")
    # a mistyped command is neither sent nor kept in the conversation
    out = _metronome(*args, stdin="hello world\n/rest\n/help\nthe cat is\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("tokens/s") == 2
    assert "unknown command /rest" in out.stderr and out.stderr.count("/reset clears") == 3
    # stdout: input()'s "> " prompt, then each reply on its own line
    # (a command's line leaves its prompt on the line the next reply is written on)
    replies = [re.sub(r"^(> )+", "", line) for line in out.stdout.splitlines()][:2]
    engine, params = _in_process(args)
    first = engine.generate([{"role": "user", "content": "hello world"}], params).text
    two_turns = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "the cat is"},
    ]
    second = engine.generate(two_turns, params).text
    forgetful = engine.generate([{"role": "user", "content": "the cat is"}], params).text
    assert second != forgetful  # so the comparison below tells a kept conversation from a dropped one
    assert replies == [first, second]
    assert len(engine.encode_prompt(two_turns)) > len(engine.encode_prompt(two_turns[:1])) + 4


def test_chat_refuses_a_max_tokens_no_reply_fits_and_offers_reset_only_with_turns_to_drop(tiny_hf):
    """--max-tokens near --ctx failed every line on the context, each error suggesting /reset, which could
    not help: it is refused at the start now, naming the most that fits. A first line too long for the
    context gets the error without the /reset hint; a later one, with turns behind it, gets the hint."""
    model = ("--model", str(tiny_hf("llama")), "--weights", "f32", "--temperature", "0", "--ctx", "64")
    out = _metronome("chat", *model, "--max-tokens", "63", stdin="hi\n")
    assert out.returncode == 2 and "--max-tokens" in out.stderr and "Traceback" not in out.stderr, out.stderr
    most = int(re.search(r"lower --max-tokens to (\d+)", out.stderr).group(1))
    fits = _metronome("chat", *model, "--max-tokens", str(most), stdin="/exit\n")
    assert fits.returncode == 0, fits.stderr
    long_line = " ".join(["cat"] * 70)
    out = _metronome("chat", *model, "--max-tokens", "8", stdin=f"{long_line}\nhi\n{long_line}\n")
    assert out.returncode == 0, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and out.stderr.count("/reset starts a new conversation") == 1, out.stderr
    assert out.stderr.rindex("/reset starts") > out.stderr.index("tokens/s")  # the hint came after a turn


def test_generate_on_a_base_model_says_the_prompt_goes_in_as_plain_text(gemma_path):
    """Without --raw, a model with no chat template continued the prompt as --raw does, without a word
    (chat and reflect refuse such a model)."""
    args = ("generate", "The sky is", "--model", str(gemma_path), "--max-tokens", "2", "--temperature", "0")
    out = _metronome(*args)
    assert out.returncode == 0 and "has no chat template" in out.stderr and "as with --raw" in out.stderr, out.stderr
    raw = _metronome(*args, "--raw")
    assert raw.returncode == 0 and "chat template" not in raw.stderr, raw.stderr
    assert raw.stdout == out.stdout  # the same answer: the note says what happened, it changes nothing


def test_info_describes_the_default_model():
    out = _metronome("info")
    assert out.returncode == 0, out.stderr
    for expected in ("llama", "Q4_1", "49152", "8192", "30", "chat template"):
        assert expected in out.stdout


def test_compile_prints_the_plan(tiny_hf):
    out = _metronome("compile", str(tiny_hf("gemma3")), "--slots", "2", "--ctx", "64", "--weights", "f32")
    assert out.returncode == 0, out.stderr
    assert "decode shape" in out.stdout and "memory bound" in out.stdout and "KV cache" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]) == 2  # one row per occupancy


def test_errors_are_one_line_for_people(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    out = _metronome("generate", "hi", "--model", str(bad))
    assert out.returncode == 2 and "not a GGUF file" in out.stderr and "Traceback" not in out.stderr
    out = _metronome("generate", "hi", "--ctx", "99999")
    assert out.returncode == 2 and "ctx=99999" in out.stderr and "Traceback" not in out.stderr
    # each of these was a traceback (or, for --stop '', an empty answer and exit 0)
    for args, words in (
        (("generate", "hi", "--device", "tpu"), "check --device"),
        (("generate", "hi", "--seed", str(2**64)), "check --seed"),
        (("generate", "hi", "--stop", ""), "check --stop"),
        (("serve", "--port", "99999"), "--port 99999"),
        (("serve", "--max-queue", "-1"), "--max-queue -1"),
        # these too: torch's allocator, the thread pool, the current folder read as a model, a host blamed
        # on the port, a positional model silently preferred to --model
        (("generate", "hi", "--slots", "100000"), "check --slots"),
        (("generate", "hi", "--threads", "10000"), "check --threads"),
        (("generate", "hi", "--model", ""), "model is empty"),
        (("generate", "hi", "--draft", "nope.gguf", "--spec-tokens", "0"), "check --draft"),
        (("serve", "--host", "999.1.1.1", "--port", "18999"), "check --host"),
        (("info", "smollm2-135m", "--model", "gemma3-270m"), "the model is given twice"),
    ):
        out = _metronome(*args, timeout=120)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_the_ready_line_gives_a_tiny_cache_its_size_not_zero():
    from metronome.serve.cli import megabytes

    assert megabytes(262_144) == "0.26 MB"  # a tiny model's KV cache printed as "0 MB" before
    assert megabytes(1_500_000) == "1.5 MB"
    assert megabytes(377_500_000) == "378 MB"


# Sampled, so that it does not fall into a loop that ends early, and long: the server ends what still runs
# STREAMS_END_S (3.5 s) after the signal, so a generation that could finish by then would pass the stop by.
# 1,900 tokens took 9 s here until sampling a row got cheap (2026-12-07), then 4 s; and a reflection of 3
# turns of up to 500 tokens ended in 4.3 s. With 8,192 tokens of context (2 slots), 8,000 tokens and 3 turns
# of up to 2,400 take well over a minute; the test still ends 3.5 s after its signal.
_LONG = {"stream": True, "temperature": 1.0, "seed": 1}
_STORY = "Tell me a long story."


@pytest.mark.parametrize(
    "path, body",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": _STORY}], "ignore_eos": True, "max_tokens": 8000, **_LONG},
        ),
        # a reflection's thread was left to uvicorn's cut
        ("/v1/reflections", {"task": _STORY, "rounds": 1, "max_tokens": 2400, **_LONG}),
    ],
)
def test_a_stopped_server_ends_its_streams_cleanly(smollm_path, path, body):
    """SIGTERM while a long stream runs: uvicorn waited its 5 s of grace, then cancelled the handler: the
    stream was cut without [DONE] and the log had CancelledError tracebacks. The server now ends running
    generations (and reflections) itself part-way through the grace: the stream's last events are a 503
    server_shutting_down error and [DONE], and the process exits 0 within the grace, with nothing in its log
    but its own lines."""
    import json
    import signal
    import time

    import httpx
    from helpers.live_server import wait_until_healthy

    from metronome.parallel.group import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", str(smollm_path), "--port", str(port)]
    argv = [*cmd, "--spec-tokens", "0", "--slots", "2", "--ctx", "8192"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        wait_until_healthy(url, proc)
        with httpx.stream("POST", url + path, json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 8:  # streaming: now stop the server
                    stopped = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
        ended = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    error = json.loads(data[-2])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable", error
    assert ended < 5.0  # within the grace: the server ended it, uvicorn did not cut it
    assert proc.returncode == 0 and "metronome: stopped" in log, log
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_a_plan_larger_than_the_memory_left_is_refused_naming_it(tiny_hf, monkeypatch):
    """A KV cache past the machine's memory was torch's allocator traceback (100,000 slots: 2.4 TB), or a
    size just within overcommit, filled until the system killed the process."""
    from metronome.compile import stages
    from metronome.compile.plan import PlanError

    loaded = load(tiny_hf("llama"))
    monkeypatch.setattr(stages, "available_memory", lambda: 100_000)  # bytes
    with pytest.raises(PlanError, match="need more than the 0.0 GB of memory left") as err:
        Engine.from_model(config=EngineConfig(slots=64, ctx=512, spec_tokens=0), loaded=loaded)
    assert err.value.param == "slots"


def test_the_memory_check_counts_what_the_plan_allocates(tiny_hf, monkeypatch):
    """The check sized an int8 KV cache at one byte a value (its rows' float32 scales are 20 % more: a size
    that just passed could exhaust memory), and counted a prefix pool the torch kernels never allocate."""
    import torch

    from metronome.compile import stages
    from metronome.compile.plan import PlanError
    from metronome.model.transformer import KVCache

    cfg = load(tiny_hf("llama")).config
    config = EngineConfig(slots=4, ctx=256, kv_cache="int8", prefix_cache_tokens=0)
    allocated = KVCache.allocate(cfg, 4, 256, torch.int8, "cpu").nbytes()
    monkeypatch.setattr(stages, "available_memory", lambda: allocated - 1)
    with pytest.raises(PlanError, match="need more than"):
        stages.check_memory(cfg, config, torch.int8, pooled=True)
    monkeypatch.setattr(stages, "available_memory", lambda: allocated)
    stages.check_memory(cfg, config, torch.int8, pooled=True)
    big_pool = EngineConfig(slots=4, ctx=256, prefix_cache_tokens=1 << 20)
    monkeypatch.setattr(stages, "available_memory", lambda: KVCache.token_bytes(cfg, torch.float32) * 4 * 256)
    stages.check_memory(cfg, big_pool, torch.float32, pooled=False)  # no pool is allocated: it fits
    with pytest.raises(PlanError, match="prefix cache") as err:
        stages.check_memory(cfg, big_pool, torch.float32, pooled=True)
    assert err.value.param == "prefix_cache_tokens"


def test_the_smallest_context_compiles_with_every_slot(tiny_hf):
    """ctx 16 (the least allowed) with 8 slots: the invariance probe put slot s at position 3 + 2s, past the
    context (IndexError: index 17 is out of bounds)."""
    engine = Engine.from_model(config=EngineConfig(slots=8, ctx=16, spec_tokens=0), loaded=load(tiny_hf("llama")))
    assert engine.generate("a b", SamplingParams(max_tokens=3, ignore_eos=True)).token_ids


def test_plan_output_into_a_closed_pipe_ends_quietly():
    """`metronome plan --validate | head -1` said 'error: [Errno 32] Broken pipe' and exited 2."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "metronome.cli", "plan", "--validate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader leaves before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"error" not in err, err[-2000:]


@pytest.mark.parametrize("module", ["metronome.cli generate hello", "metronome.serve.cli", "metronome.cli --help"])
def test_a_closed_stdout_is_said_at_once(module):
    """`metronome generate hi >&-` loaded the model, then ended in an AttributeError traceback (torch's build
    flushes sys.stdout, which Python sets to None); `serve >&-` failed in uvicorn's log formatter."""
    proc = subprocess.run(
        [sys.executable, "-m", *module.split()],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 2 and "standard output is closed" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_server_on_another_loopback_address_answers_there(tiny_hf):
    """On 127.0.0.2 (or a hostname resolving to Debian's 127.0.1.1) every request was a 403, /health too:
    only 127.0.0.1, localhost and ::1 were this server's names. Another name is still refused."""
    import httpx
    from helpers.live_server import wait_until_healthy

    from metronome.parallel.group import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", str(tiny_hf("llama")), "--host", "127.0.0.2"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.2:{port}"
    try:
        wait_until_healthy(url, proc)
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"}, timeout=30).status_code == 403
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_a_server_sets_its_start_up_heap_aside_from_the_collector(tiny_hf):
    """A full collection scanned everything start-up made (about 217,000 objects with SmolLM2) and held the
    GIL for 60-90 ms, while every stream waited for its next token: once the model is attached the server
    freezes them (engine/heap.py), and /metrics says how many and how often each generation was collected."""
    import httpx
    from helpers.live_server import wait_until_healthy

    from metronome.parallel.group import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", str(tiny_hf("llama")), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    frozen = re.search(r"^metronome_gc_frozen_objects (\S+)$", metrics, re.M)
    assert frozen and float(frozen.group(1)) > 10_000, metrics[-3000:]  # the modules, the model, the tokenizer
    assert re.search(r'^python_gc_collections_total\{generation="2"\} \S+$', metrics, re.M)


def test_serve_says_what_its_compile_says(tiny_hf, tmp_path):
    """serve dropped the compile's messages: a plan cache it could not write (or C++ kernels it could not
    build) left a server that compiled at every start, or ran slow, without a word."""
    import os

    import httpx
    from helpers.live_server import wait_until_healthy

    from metronome.parallel.group import free_port

    blocked = tmp_path / "a-file"
    blocked.write_text("where the plan cache's folder would be")
    port = free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", str(tiny_hf("llama")), "--port", str(port)]
    env = {**os.environ, "METRONOME_PLAN_CACHE": str(blocked / "plans")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=60)
    assert "could not save the plan in the plan cache" in log and "kernels " in log, log


def test_a_second_ctrl_c_ends_the_streams_cleanly_then_quits(smollm_path):
    """A second Ctrl-C made uvicorn quit without waiting, by cancelling every handler: streams cut without
    an end, text/plain 500s, a traceback each. Now the generations end first (a 503 error event, [DONE])
    and the quit follows at once."""
    import json
    import signal
    import time

    import httpx
    from helpers.live_server import wait_until_healthy

    from metronome.parallel.group import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", str(smollm_path), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--spec-tokens", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    body = {"messages": [{"role": "user", "content": _STORY}], "ignore_eos": True, **_LONG, "stream": True}
    lines: list[str] = []
    try:
        wait_until_healthy(url, proc)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 8:
                    stopped = time.monotonic()
                    proc.send_signal(signal.SIGINT)
                    time.sleep(0.3)
                    proc.send_signal(signal.SIGINT)  # the impatient operator's second Ctrl-C
        ended = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        log, _ = proc.communicate(timeout=60)
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "server_shutting_down", data[-3:]
    assert ended < 2.0  # not the first Ctrl-C's 3.5 s
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_a_second_ctrl_c_while_the_compile_runs_quits_at_once(smollm_path, tmp_path):
    """serve waits for a compile it cannot cut short; a second Ctrl-C there was a KeyboardInterrupt
    traceback, then 'terminate called without an active exception' and a core dump (exit -6)."""
    import os
    import signal
    import time

    from metronome.parallel.group import free_port

    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", str(smollm_path), "--port", str(free_port())]
    env = {**os.environ, "METRONOME_PLAN_CACHE": str(tmp_path / "plans")}  # a cold compile: seconds of it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert "loading the model" in proc.stdout.readline()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "stopped during the compile" in log, (proc.returncode, log)
    assert "Traceback" not in log and "terminate called" not in log, log


def test_the_model_is_taken_from_one_place():
    """`info` and `compile` take the model as MODEL or --model: either, or both when they agree."""
    import argparse

    from metronome.cli import _positional_model
    from metronome.config import ParamError

    def given(path, flag):
        return _positional_model(argparse.Namespace(model_path=path, model=flag))

    assert given("a.gguf", None) == "a.gguf" and given(None, "b.gguf") == "b.gguf" and given(None, None) is None
    assert given("a.gguf", "a.gguf") == "a.gguf"
    with pytest.raises(ParamError, match="given twice") as err:
        given("a.gguf", "b.gguf")
    assert err.value.param == "model"


def test_the_stats_line_says_what_was_timed():
    from metronome.cli import _stats

    timed = {"time_to_first_token": 0.0, "completion_time": 0.5, "total_time": 0.5}
    assert _stats(3, timed) == "[3 tokens · TTFT 0 ms · 4.0 tokens/s]"  # a TTFT of 0 ms is still a TTFT
    assert _stats(1, timed) == "[1 tokens · TTFT 0 ms]"  # no rate from one token
    prompt_only = {"time_to_first_token": None, "completion_time": None, "total_time": 0.25}
    assert _stats(0, prompt_only) == "[0 tokens · 250 ms in all]"


@pytest.mark.parametrize(
    ("raised", "code"), [(ValueError("bad file"), 2), (KeyboardInterrupt(), 130), (BrokenPipeError(), 141)]
)
def test_main_ends_each_failure_with_its_exit_code(monkeypatch, capsys, raised, code):
    """Ends in-process: a ValueError (a bad model file, a plan error) is one line and 2, Ctrl-C 130, a reader
    that left the pipe 141 (what a shell reports for SIGPIPE)."""
    from metronome import cli

    def fail(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_generate", fail)
    monkeypatch.setattr(cli, "reader_left", lambda: 141)  # the real one redirects this process's stdout
    assert cli.main(["generate", "hi"]) == code
    assert "Traceback" not in capsys.readouterr().err


def test_engine_flags_are_checked_before_the_model_loads(monkeypatch):
    """A --slots 0 was found only after the model had loaded (seconds to minutes for a large one)."""
    import metronome.model.loader
    from metronome.cli import load_engine
    from metronome.config import ParamError

    def no_load(path):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(metronome.model.loader, "load", no_load)
    with pytest.raises(ParamError) as err:
        load_engine(build_parser().parse_args(["generate", "hi", "--slots", "0"]))
    assert err.value.param == "slots"
