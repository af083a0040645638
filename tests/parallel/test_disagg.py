"""Disaggregated prefill: prompts on a prefill worker process, their KV moved into the engine's decode
slots over gloo. Same tokens and logprobs as colocated; a killed worker fails its prompt and is replaced."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers.live_server import wait_until_healthy

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine, RequestError
from metronome.parallel.disagg import Backlog, PrefillJob
from metronome.parallel.group import free_port

GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=True, ignore_eos=True)
PROMPTS = ["w1 w2 w3 w4 w5", "w9 w8", "w3 w3 w3 w7 w1 w2 w5 w6 w9 w10 w11"]


def _engine(path: str, layout: str) -> Engine:
    config = EngineConfig(slots=2, ctx=128, weights="int8", kernels="cpp", spec_tokens=0, layout=layout, threads=2)
    return Engine.from_model(path, config, calibrate=False)


def _same(got, want) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [[x.logprob for x in c.choices] for c in got] == [[x.logprob for x in c.choices] for c in want]


@pytest.fixture(scope="module")
def colocated(tiny_hf):
    return _engine(str(tiny_hf("llama")), "colocated")


def test_disaggregated_gives_the_colocated_tokens(tiny_hf, colocated):
    engine = _engine(str(tiny_hf("llama")), "disaggregated")
    try:
        assert engine.prefiller is not None and engine.config.threads == 1  # the cores split between the two
        got = engine.generate(PROMPTS, GREEDY, chat=False)  # 3 prompts, 2 slots: a slot is reused
        _same(got, colocated.generate(PROMPTS, GREEDY, chat=False))
        lengths = [len(engine.encode_prompt(p, chat=False)) for p in PROMPTS]
        assert engine.prefiller.rows == sum(lengths)  # every prompt ran on the worker
        left = engine.prefiller.backlog()  # nothing is left on the worker (the plan is uncalibrated: no prices)
        assert left.prices == [] and left.running_s == 0.0 and left.slowdown == 1.0
        ids = engine.encode_prompt(PROMPTS[2], chat=False)
        engine.prefiller.submit(PrefillJob("priced", ids, price_ms=1e-3))  # a microsecond: a real trip is slower
        deadline = time.monotonic() + 30
        while not engine.prefiller.has_results and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [r.key for r in engine.prefiller.take()] == ["priced"]
        assert engine.prefiller.backlog().slowdown > 100
        with pytest.raises(RequestError, match="colocated") as refused:  # the worker returns no prompt logits
            engine.submit(ids, SamplingParams(max_tokens=1, prompt_logprobs=True))
        assert refused.value.param == "prompt_logprobs"
    finally:
        engine.prefiller.close()


def test_a_cached_beginning_goes_to_the_worker_as_kv_and_only_the_rest_runs_there(tiny_hf):
    """An agent's turns: each prompt begins with the last one. The engine's prefix cache copies the cached
    pages into the slot; the worker receives them as KV and runs only the rest. Same tokens and logprobs
    as colocated (a KV written at the wrong positions, or the rest run from the wrong place, changes them)."""
    path = str(tiny_hf("llama"))
    engine, colocated = _engine(path, "disaggregated"), _engine(path, "colocated")
    try:
        page = engine.prefix_cache.page
        base = [1] + [5 + (7 * i) % 100 for i in range(4 * page)]  # <s> and words of the tiny vocabulary
        turns = [base[: 2 * page + 5], base[: 3 * page + 1], base[: 3 * page + 1] + base[:2], base[: 2 * page]]
        got = [engine.generate(t, GREEDY) for t in turns]  # one after the other: each finds the last in cache
        _same(got, [colocated.generate(t, GREEDY) for t in turns])
        # turn 1: nothing cached; turn 2: its first 2 pages (turn 1's prompt); turn 3: 3 pages (turn 2's);
        # turn 4: a page, since a prompt's last token always runs
        assert [c.cached_tokens for c in got] == [0, 2 * page, 3 * page, page]
        assert engine.prefiller.rows == sum(len(t) - c.cached_tokens for t, c in zip(turns, got))
        with pytest.raises(ValueError, match="cached=16 needs the keys and values"):  # refused before the wire
            engine.prefiller.submit(PrefillJob(None, base[:20], 16))
        with pytest.raises(ValueError, match="last token"):
            engine.prefiller.submit(PrefillJob(None, base[:16], 16))

        # two at once: a prompt the worker ran is pooled as soon as it is installed, not when it ends
        other = [1] + [5 + (11 * i) % 100 for i in range(3 * page)]
        running = engine.submit(other[: 2 * page + 5], dataclasses.replace(GREEDY, max_tokens=40))
        deadline = time.monotonic() + 30
        while not running.output_ids and time.monotonic() < deadline:  # the worker's round trip
            engine.step()
            time.sleep(0.005)
        assert running.output_ids and running.finish_reason is None
        beside = engine.generate(other[: 2 * page + 3], GREEDY)
        assert beside.cached_tokens == 2 * page
        _same([beside], [colocated.generate(other[: 2 * page + 3], GREEDY)])
    finally:
        engine.prefiller.close()


def test_a_killed_prefill_worker_fails_its_prompt_and_is_replaced(tiny_hf, colocated):
    """Killed while it holds a prompt: that prompt fails, and a new worker serves the next one. Killed while
    idle: replaced before any prompt needs it (the next prompt failed on the dead worker)."""
    engine = _engine(str(tiny_hf("llama")), "disaggregated")
    worker = engine.prefiller
    want = colocated.generate(PROMPTS[0], GREEDY, chat=False).token_ids
    real_prefill = worker._prefill

    def killed_while_held(job):
        os.kill(worker._process.pid, signal.SIGKILL)
        worker._process.join(timeout=10)
        return real_prefill(job)

    try:
        engine.start()
        worker._prefill = killed_while_held
        events: queue.Queue = queue.Queue()
        t0 = time.monotonic()
        engine.submit(engine.encode_prompt(PROMPTS[0], chat=False), GREEDY, events.put)
        delta = events.get(timeout=10)
        assert delta.finish_reason == "error" and "prefill worker failed" in delta.error
        assert time.monotonic() - t0 < 5.0
        worker._prefill = real_prefill
        assert engine.generate(PROMPTS[0], GREEDY, chat=False).token_ids == want  # a new worker
        assert worker.restarts == 1
        os.kill(worker._process.pid, signal.SIGKILL)  # idle now
        worker._process.join(timeout=10)
        for _ in range(200):  # the transfer thread's poll notices it and starts another
            if worker.restarts == 2:
                break
            time.sleep(0.05)
        assert worker.restarts == 2
        assert engine.generate(PROMPTS[0], GREEDY, chat=False).token_ids == want  # no failure on the dead one
    finally:
        engine.stop()
        worker.close()


def test_a_disaggregated_ttft_prediction_prices_the_workers_queue(colocated):
    """Where prompts run on the worker, the prediction is the worker's queue: the rest of the job it runs,
    the jobs sent after it, the prompts waiting for a slot here, then this one, each a call of its own with
    nothing beside it, at the worker's share of threads and its measured slowdown; then a decode step's
    waits (one to send the prompt, one to install its KV). It had priced them as colocated chunks beside
    the engine's decode rows, which never run here."""
    # a 50-row job running for 20 ms, a 30-row job after it (priced at the worker's share: 2 of the engine's)
    backlog = Backlog([2 * (4 + 50), 2 * (4 + 30)], running_s=0.020, slowdown=1.5)

    class Worker:  # stands in for the prefill worker
        config = dataclasses.replace(colocated.config, threads=1)

        def backlog(self):
            return backlog

    report = colocated.plan.report
    colocated.plan.report = dataclasses.replace(
        report,
        step_ms={1: 4.0, 2: 6.0},
        step_ms_far={},
        prompt_row_ms=3.0,
        prefill_row_ms=1.0,
        prompt_row_ms_far=float("nan"),
    )
    colocated.prefiller = Worker()
    try:
        share = colocated.config.threads / 1 * 1.5  # the engine's plan was timed with 2 threads, the worker has 1
        want = share * ((4 + 50) + (4 + 30) + (4 + 100)) - 20
        assert colocated._predict_ttft_ms(0, 100) == pytest.approx(want)  # nobody decodes: no step to wait for
        assert colocated._predict_remote_ttft_ms(Worker(), [(0, 100)], decoding=2) == pytest.approx(want + 6)
        backlog = Backlog([2 * (4 + 50)], running_s=10.0, slowdown=1.0)  # running for longer than its price
        assert colocated._predict_ttft_ms(8, 100) == pytest.approx(2 * (4 + 100))
    finally:
        colocated.prefiller = None
        colocated.plan.report = report


@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
def test_tensor_parallel_ranks_take_their_kv_heads_from_the_prefill_worker(wide_llama, kv_cache):
    """tp=2 with a prefill worker (its own gloo pair beside the ranks' default group; the worker runs the
    ranks' 4 chunks in one process, and each rank takes its KV heads) gives the tokens and logprobs of tp=1
    colocated over the same chunks, three prompts of different lengths side by side; with an int8 KV cache
    too (its rows, bytes and scales, travel as they are)."""
    runs = {}
    for tp, layout in ((1, "colocated"), (2, "disaggregated")):
        config = EngineConfig(
            slots=2,
            ctx=128,
            weights="int8",
            spec_tokens=0,
            tp=tp,
            tp_shards=4,
            layout=layout,
            threads=2,
            kv_cache=kv_cache,
        )
        engine = Engine.from_model(wide_llama, config, calibrate=False)
        try:
            assert (engine.prefiller is not None) == (layout == "disaggregated")
            assert engine.plan.cache.k.dtype == (torch.int8 if kv_cache == "int8" else torch.bfloat16)
            runs[layout] = engine.generate(PROMPTS, GREEDY, chat=False)
            if engine.prefiller is not None:
                assert engine.prefiller.rows == sum(len(engine.encode_prompt(p, chat=False)) for p in PROMPTS)
        finally:
            if engine.prefiller is not None:
                engine.prefiller.close()
            engine.plan.runner.close()  # the ranks (a TPRunner, tp=1 too: the chunked plan)
    _same(runs["disaggregated"], runs["colocated"])


@pytest.mark.parametrize("weights", ["f32", "int8"])  # the torch runner, the fused decoder
def test_a_runner_installs_kv_as_its_own_prefill_wrote_it(tiny_hf, weights):
    """KV taken from one slot and installed into another (from position 0, and past a beginning already
    there) gives that slot the next decode step's logits of the slot that ran the prompt (both in one step:
    the torch runner's fixed-shape step runs every slot)."""
    config = EngineConfig(slots=2, ctx=64, weights=weights, spec_tokens=0, prefix_cache_tokens=0)
    plan = Engine.from_model(str(tiny_hf("llama")), config, calibrate=False).plan
    ids = [1, 7, 12, 30, 5, 9]
    plan.prefill(ids, 0)
    k, v = plan.cache.k[:, 0, :, : len(ids)].clone(), plan.cache.v[:, 0, :, : len(ids)].clone()
    plan.runner.install_kv(1, k[:, :, :2], v[:, :, :2])
    plan.runner.install_kv(1, k[:, :, 2:], v[:, :, 2:], start=2)
    both = plan.decode([0, 1], [44, 44], [len(ids)] * 2)
    assert torch.equal(both[1], both[0])
    plan.runner.install_kv(1, torch.zeros_like(k[:, :, :1]), torch.zeros_like(v[:, :, :1]), start=3)
    both = plan.decode([0, 1], [44, 44], [len(ids)] * 2)
    assert not torch.equal(both[1], both[0])  # the KV installed is what the step reads


def test_a_new_prefill_worker_measures_its_slowdown_before_any_request(tiny_hf):
    """A calibrated plan's worker runs one prompt before the engine serves: its time over the plan's price
    is the first slowdown (it was 1.0 until a job finished; the first burst was predicted 1.3-4x off).
    The probe is not counted in the worker's rows. The price is the worker's share of the threads the plan
    was timed with: the engine's threads on each of its tp ranks."""
    config = EngineConfig(slots=2, ctx=128, weights="int8", spec_tokens=0, layout="disaggregated", threads=2)
    engine = Engine.from_model(str(tiny_hf("llama")), config, calibrate=True)
    try:
        # the configured cores are shared: half for the worker, the rest for the decode engine
        assert (engine.config.threads, engine.prefiller.config.threads) == (1, 1)
        backlog = engine.prefiller.backlog()
        assert backlog.prices == [] and engine.prefiller.rows == 0
        assert backlog.slowdown != 1.0 and 0 < backlog.slowdown < 100
        price = engine._worker_price_ms(engine.prefiller, 0, 100)
        engine.config = dataclasses.replace(engine.config, tp=2)
        assert engine._worker_price_ms(engine.prefiller, 0, 100) == pytest.approx(2 * price)
    finally:
        engine.prefiller.close()


def _children(pid: int) -> set[int]:
    """The processes `pid` started (Linux /proc)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(k) for k in (task / "children").read_text().split()}
    return kids


def test_a_server_stopped_with_sigterm_stops_its_ranks_and_worker_and_leaks_nothing(wide_llama):
    """SIGTERM (what a supervisor or container runtime sends) stops `metronome serve --tp 2 --layout
    disaggregated` as Ctrl-C does: exit code 0, its rank and worker processes gone, no semaphore left for
    multiprocessing's resource tracker to report. uvicorn re-raised SIGTERM with its default action, which
    ended the process before its cleanup (the children were left to their own timeouts)."""
    port = free_port()
    cmd = [sys.executable, "-m", "metronome.serve.cli", "--model", wide_llama, "--port", str(port), "--slots", "2"]
    cmd += ["--ctx", "128", "--weights", "int8", "--tp", "2", "--tp-shards", "4", "--layout", "disaggregated"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        body = {"prompt": "w1 w2 w3", "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        children = _children(proc.pid)
        assert len(children) >= 2  # rank 1 and the prefill worker (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "metronome: stopped" in out, out
    assert "leaked" not in out and "Traceback" not in out, out
    deadline = time.monotonic() + 5  # the resource tracker ends once it has read its pipe to the end
    while (alive := [_command(pid) for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, alive


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return f"{pid} (ended)"


@pytest.mark.parametrize("tp", [1, 2])
def test_a_layout_without_the_fused_decoder_is_refused_before_the_weights_are_built(tiny_hf, monkeypatch, tp):
    """f32 or bf16 weights run on the torch path, whose rows a prefill worker cannot reproduce: refused when the
    worker was attached, after the whole compile (20-50 s on the real models, ranks spawned first)."""
    from metronome.compile import stages
    from metronome.compile.plan import PlanError
    from metronome.parallel import plan as tp_plan

    def no_build(*_args, **_kwargs):
        raise AssertionError("the weights were built before the refusal")

    monkeypatch.setattr(stages, "build", no_build)
    monkeypatch.setattr(tp_plan, "rank_weights", no_build)
    config = EngineConfig(slots=2, ctx=128, weights="f32", layout="disaggregated", tp=tp, tp_shards=2 * tp)
    with pytest.raises(PlanError, match="layout='disaggregated' needs the fused CPU decoder") as err:
        Engine.from_model(str(tiny_hf("llama")), config, calibrate=False)
    assert err.value.param == "layout"


_KILL_THE_WORKER = """
import os, signal, sys, time
from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine

if __name__ == "__main__":
    config = EngineConfig(slots=2, ctx=128, weights="int8", kernels="cpp", spec_tokens=0, layout="disaggregated",
                          tp_shards=2, threads=1)
    engine = Engine.from_model(sys.argv[1], config, calibrate=False)
    worker = engine.prefiller
    os.kill(worker._process.pid, signal.SIGKILL)
    worker._process.join(timeout=10)
    for _ in range(600):
        if worker.restarts == 1:
            break
        time.sleep(0.05)
    print("restarts", worker.restarts, flush=True)
    engine.close()
    worker.close()
"""


def test_a_chunked_prefill_worker_killed_and_replaced_leaks_no_semaphore(tiny_hf, tmp_path):
    """A prefill worker running a chunked plan (tp_shards, as beside --tp 2) made a multiprocessing Event for a
    group of one: its 5 semaphores, registered with the resource tracker the process tree shares, were never
    unregistered by a worker killed with SIGKILL, and the server reported them leaked when it stopped."""
    script = tmp_path / "kill_the_worker.py"
    script.write_text(_KILL_THE_WORKER)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_hf("llama"))], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "restarts 1" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "leaked" not in done.stderr, done.stderr[-3000:]


def test_a_job_whose_kv_is_not_its_cached_length_is_refused_before_the_wire():
    """The worker receives exactly `cached` positions of keys and values: KV of another length would wait out
    the pair's timeout on a receive of the wrong size and fail the worker. `submit` checks it first (on no
    worker: the check needs none)."""
    from metronome.parallel.disagg import PrefillWorker

    ids = list(range(1, 21))
    k = torch.zeros(2, 2, 8, 16)
    worker = object.__new__(PrefillWorker)
    with pytest.raises(ValueError, match="cached=16 needs the keys and values of that many positions"):
        worker.submit(PrefillJob(None, ids, 16, k=k, v=k.clone()))
    with pytest.raises(ValueError, match="cached=16 needs"):
        worker.submit(PrefillJob(None, ids, 16, k=torch.zeros(2, 2, 16, 16), v=k))


def test_a_context_shorter_than_the_probe_gets_a_probe_that_fits_it(tiny_hf):
    """The new worker's probe prompt is PROBE_ROWS rows, or ctx - 1 where the context is shorter: a 64-token
    engine starts, measures its worker's slowdown, and serves."""
    config = EngineConfig(slots=2, ctx=64, weights="int8", spec_tokens=0, layout="disaggregated", threads=2)
    engine = Engine.from_model(str(tiny_hf("llama")), config, calibrate=True)
    try:
        assert engine.prefiller.backlog().slowdown != 1.0
        assert engine.generate([1, 5, 9], SamplingParams(max_tokens=3, ignore_eos=True)).finish_reason == "length"
    finally:
        engine.prefiller.close()
