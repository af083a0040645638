"""Tensor parallelism over gloo: tp=1, 2 and 4 give the same logits bit for bit (the fixed-chunk sums of
parallel/tp.py), and close to the unsplit model."""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_moe

from metronome.compile.quant import dense
from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.model.transformer import KVCache, Rows, build_model
from metronome.parallel.check import greedy_trace
from metronome.parallel.group import GroupError, free_port, run_ranks
from metronome.parallel.plan import tp_settings
from metronome.parallel.tp import ShardingError, Solo, TPLayout, check_shards, default_shards

PROMPT = [1, 7, 12, 30, 5, 9, 44, 3]
STEPS = 6


def _check_degrees(path: str) -> None:
    """tp=1, 2 and 4 over 4 chunks give the same logits bit for bit (every rank holds the whole logits), and
    the cut model is the model: close to the unsplit float32 forward."""
    assert default_shards(load(path).config) == 4
    one = greedy_trace(Solo(), path, 4, PROMPT, STEPS)["logits"]
    two, _ = run_ranks(2, greedy_trace, (path, 4, PROMPT, STEPS), timeout_s=240)
    four = run_ranks(4, greedy_trace, (path, 4, PROMPT, STEPS), timeout_s=240)
    assert torch.equal(two["logits"], one)
    assert all(torch.equal(r["logits"], one) for r in four)
    loaded = load(path)
    model = build_model(loaded.config, {k: dense(v) for k, v in loaded.weights.items()}, 64, torch.float32)
    cache = KVCache.allocate(loaded.config, 1, 64, torch.float32, "cpu")
    whole = model(
        torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], cache, Rows((0,), (0,), (0,)), torch.tensor([0])
    )
    torch.testing.assert_close(one[0], whole[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp_degrees_are_bit_identical(tiny_hf, arch):
    path = str(tiny_hf(arch))  # 4 heads, 2 KV heads (copied across chunks at 4 shards), MLP 128
    _check_degrees(path)


def test_the_checks_trace_is_the_greedy_continuation_and_its_logits_are_the_models(tiny_hf):
    """greedy_trace (what the tp check compares between degrees, so a fault of its own would pass unseen):
    row 0 is the prompt's last position, each later row the decode step that feeds the previous row's argmax
    at the next position; a whole-prompt run of the prompt and those tokens gives the same logits."""
    path = str(tiny_hf("llama"))
    trace = greedy_trace(Solo(), path, None, PROMPT, STEPS)
    assert trace["logits"].shape[0] == STEPS + 1 and trace["transport"] == "none (one rank)"
    tokens = [int(row.argmax()) for row in trace["logits"]]
    loaded = load(path)
    model = build_model(loaded.config, {k: dense(v) for k, v in loaded.weights.items()}, 64, torch.float32)
    cache = KVCache.allocate(loaded.config, 1, 64, torch.float32, "cpu")
    ids = PROMPT + tokens[:STEPS]
    whole = model(
        torch.tensor([ids]),
        torch.arange(len(ids))[None],
        cache,
        Rows((0,), (0,), (0,)),
        torch.tensor([0]),
        all_logits=True,
    )[0]
    torch.testing.assert_close(trace["logits"], whole[len(PROMPT) - 1 :], rtol=1e-4, atol=1e-4)


def test_the_check_command_reports_each_degree_against_the_first(monkeypatch, capsys):
    """`python -m metronome.parallel.check --tp 1,2,4`: every degree's logits are compared with the first
    degree's (tp=1 in one process, the others on their ranks), and a degree that differs says False."""
    import sys

    import metronome.parallel.check as check
    import metronome.parallel.group as group

    logits = {1: torch.zeros(3, 5), 2: torch.zeros(3, 5), 4: torch.ones(3, 5)}
    trace = lambda tp: {"logits": logits[tp], "decode_s": 0.5, "transport": "test"}  # noqa: E731
    calls = []

    def one_rank(grp, model, shards, prompt, steps, weights="f32"):
        calls.append((1, model, shards, steps))
        return trace(1)

    def ranks(tp, fn, args, timeout_s):
        calls.append((tp, *args[:2], args[3]))
        return [trace(tp)] * tp

    monkeypatch.setattr(check, "greedy_trace", one_rank)
    monkeypatch.setattr(group, "run_ranks", ranks)
    monkeypatch.setattr(sys, "argv", ["check", "model.gguf", "--tp", "1,2,4", "--shards", "4", "--steps", "8"])
    check.main()
    assert calls == [(1, "model.gguf", 4, 8), (2, "model.gguf", 4, 8), (4, "model.gguf", 4, 8)]
    assert capsys.readouterr().out.splitlines() == [
        "tp=1: 16.0 tok/s, logits identical to tp=1: True",
        "tp=2: 16.0 tok/s, logits identical to tp=1: True",
        "tp=4: 16.0 tok/s, logits identical to tp=1: False",
    ]


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
def test_moe_tp_degrees_are_bit_identical(tmp_path_factory, arch):
    """Every expert's width (and the shared expert's) cut in 4 chunks: each rank routes every row and runs
    its chunks of the chosen experts; the chunks' partials are added in chunk order on every rank. tp=1, 2
    and 4 give the same logits, close to the uncut model. (Qwen2-MoE: top-3 of 8 experts, weights not
    renormalized, and a gated shared expert; Mixtral: top-2.)"""
    path = str(tiny_moe.save_hf(tiny_moe.build(arch), tmp_path_factory.mktemp(arch), stacked=False))
    _check_degrees(path)


def test_a_moe_engine_at_tp2_serves_what_tp1_serves(tmp_path_factory):
    path = str(tiny_moe.save_hf(tiny_moe.build("qwen2moe"), tmp_path_factory.mktemp("moe-engine"), stacked=False))
    runs = []
    for tp in (1, 2):
        engine = _engine(path, tp)
        try:
            done = engine.generate(["w1 w2 w3", "w7 w5 w9 w11"], GREEDY, chat=False)  # two rows at once
            runs.append([(c.token_ids, [x.logprob for x in c.choices]) for c in done])
        finally:
            engine.plan.runner.close()
    assert runs[0] == runs[1]


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
def test_moe_on_the_fused_decoder_gives_the_same_tokens_and_logprobs_at_tp1_2_4(tmp_path_factory, arch):
    """The fused decoder's MoE blocks cut in 4 chunks of every expert's width (the shared expert's too):
    tp=1, 2 and 4 give the same tokens and logprobs bit for bit, two prompts decoding side by side; and
    the chunked block is the block: tp=1's logprobs are close to the uncut decoder's."""
    folder = tmp_path_factory.mktemp(f"{arch}-wide")
    path = str(tiny_moe.save_hf(tiny_moe.build(arch, gain=1.0, wide=True), folder, stacked=False))
    runs = []
    for tp in (1, 2, 4):
        engine = _engine(path, tp, "int8")
        try:
            assert "fused decoder" in engine.plan.report.kernels
            done = engine.generate(["w1 w2 w3", "w7 w5 w9 w11"], GREEDY, chat=False)
            runs.append([(c.token_ids, [x.logprob for x in c.choices]) for c in done])
        finally:
            engine.plan.runner.close()
    assert runs[0] == runs[1] == runs[2]
    whole = Engine.from_model(path, EngineConfig(slots=2, ctx=128, weights="int8", spec_tokens=0), calibrate=False)
    done = whole.generate(["w1 w2 w3", "w7 w5 w9 w11"], GREEDY, chat=False)
    for (tokens, logprobs), c in zip(runs[0], done):
        n = next((i for i, (a, b) in enumerate(zip(tokens, c.token_ids)) if a != b), len(tokens))
        assert n >= 3, (tokens, c.token_ids)  # a near-tie may part them later; the first steps agree
        assert logprobs[:n] == pytest.approx([x.logprob for x in c.choices][:n], abs=1e-3)


def test_layouts_that_cannot_work_are_refused(tiny_hf):
    cfg = load(str(tiny_hf("llama"))).config
    with pytest.raises(ShardingError, match="tp_shards=8.*4 attention heads"):
        check_shards(cfg, 8)
    with pytest.raises(ShardingError, match="not a multiple of tp=3"):
        TPLayout(3, 0, 4)


def test_a_model_that_cannot_be_cut_says_what_stops_it(tmp_path):
    """OLMoE at --tp 2 was refused naming its heads and its dense MLP width (which an MoE has no use for),
    not the QK norm over every head that stops the cut."""
    from metronome.compile.plan import PlanError

    loaded = load(str(tiny_moe.save_hf(tiny_moe.build("olmoe"), tmp_path, stacked=False)))
    with pytest.raises(PlanError, match=r"at most 1 equal chunk\(s\) \(a QK norm over the whole projection.*tp=1 only"):
        tp_settings(loaded, EngineConfig(slots=1, ctx=64, tp=2, weights="f32"))


def test_a_tp_the_model_takes_outside_the_default_cut_names_tp_shards(smollm):
    """SmolLM2 (9 heads, 3 KV heads) cuts into 3 chunks but into no power of two, the default cut: --tp 3
    was refused as "at most 1 equal chunk(s) ... it runs at tp=1 only", while --tp-shards 3 runs it."""
    from metronome.compile.plan import PlanError

    with pytest.raises(PlanError, match=r"add --tp-shards 3") as caught:
        tp_settings(smollm, EngineConfig(slots=1, ctx=64, tp=3))
    assert "tp=1 only" not in str(caught.value) and caught.value.param == "tp"
    resolved, layout, _weights = tp_settings(smollm, EngineConfig(slots=1, ctx=64, tp=3, tp_shards=3))
    assert (layout.world, layout.shards, resolved.tp_shards) == (3, 3, 3)


def _report_sigint(answers) -> None:
    import signal

    answers.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_ranks_start_with_ctrl_c_ignored_and_the_parent_keeps_its_handler():
    """A Ctrl-C while a rank still imported torch printed that rank's KeyboardInterrupt traceback (rank 0
    ends the ranks; they ignore it once running): they now start with it ignored."""
    import multiprocessing as mp
    import signal

    from metronome.parallel.plan import _sigint_ignored_by_children

    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    before = signal.getsignal(signal.SIGINT)
    for ignored in (True, False):
        child = ctx.Process(target=_report_sigint, args=(answers,))
        if ignored:
            with _sigint_ignored_by_children():
                child.start()
        else:
            child.start()
        assert answers.get(timeout=60) is ignored
        child.join(timeout=60)
        assert signal.getsignal(signal.SIGINT) is before


def _fail_on_rank_one(group, *_args):
    if group.rank == 1:
        raise ValueError("model file differs")
    return group.rank


def test_a_failing_rank_is_named():
    with pytest.raises(GroupError, match="rank 1 of 2 failed: ValueError: model file differs"):
        run_ranks(2, _fail_on_rank_one, timeout_s=60, collective_timeout_s=10)


def test_a_rank_that_dies_before_joining_is_named_at_once(tiny_hf, tmp_path):
    """Rank 0 joined first and waited the collective timeout out for a rank that was already dead (killed by
    the Ctrl-C that stopped the server while it imported torch, or unable to load its file), then said only
    that the group did not form. Now it sees the death while waiting, and says how the rank ended."""
    from metronome.parallel.plan import Ranks

    loaded = load(str(tiny_hf("llama")))
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF" + bytes(60))
    config = EngineConfig(slots=1, ctx=64, tp=2, tp_shards=4, weights="f32")
    ranks = Ranks(loaded, config, TPLayout(2, 0, 4), say=lambda _msg: None, path=str(bogus))
    spawned, spawn = [], ranks._spawn

    def spawn_and_keep():  # stop() forgets its processes: keep them to look at afterwards
        endpoint = spawn()
        spawned.extend(ranks.workers)
        return endpoint

    ranks._spawn = spawn_and_keep
    with pytest.raises(GroupError, match=r"tp-rank-1 \(pid \d+\) exited with code 1 before joining") as err:
        ranks.form()
    assert "not-a-model.gguf" in str(err.value)  # the rank's own error comes with it
    assert spawned and not any(w.is_alive() for w in spawned)


def test_a_ready_rank_waits_for_rank_zeros_go_and_not_for_ever():
    """A rank joined the group as soon as it was ready, so with three or more ranks an early one waited out
    the 30 s collective timeout for a slower one; now it waits for rank 0's go (given once every rank is
    ready), and gives up if rank 0 is gone or at the start-up limit."""
    import multiprocessing as mp
    import os
    import threading

    from metronome.parallel.group import await_go

    go = mp.get_context("spawn").Event()
    threading.Timer(0.3, go.set).start()
    await_go(go, os.getppid(), timeout_s=10)  # returns once go is set
    go.clear()
    with pytest.raises(GroupError, match="rank 0 .* ended before the group formed"):
        await_go(go, os.getppid() + 1, timeout_s=10)  # another parent: as if ours had died
    with pytest.raises(GroupError, match="did not form the group within"):
        await_go(go, os.getppid(), timeout_s=0.6)


def _engine(path: str, tp: int, weights: str = "f32") -> Engine:
    """f32: the torch path; int8: the fused C++ decoder (its Q8_0 blocks need K ranges of 32 columns)."""
    shards = 4
    config = EngineConfig(slots=2, ctx=128, tp=tp, tp_shards=shards, weights=weights, spec_tokens=0)
    return Engine.from_model(path, config, calibrate=False)


def test_fused_decoder_tp2_gives_the_tp1_tokens_and_logprobs(wide_llama):
    """Greedy and seeded sampled requests get the same tokens and logprobs at tp=1, 2 and 4 (every rank
    holds the whole logits; rank 0 draws). The plan draws with the C++ kernel at every degree, and each
    request draws its own row: sampled together, each gets what it gets alone."""
    path = wide_llama
    runs, sampled_runs = [], []
    # seeded sampled requests, drawn by the C++ kernel as a one-process plan draws them: two plainly sampled
    # (one call for both rows) and one with logprobs (its own sampler's call)
    sampled = [
        SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.2, top_k=5, seed=5, logprobs=True, ignore_eos=True),
    ]
    for tp in (1, 2, 4):
        engine = _engine(path, tp, "int8")
        assert "fused decoder" in engine.plan.report.kernels and engine.plan.runner.any_rows
        assert engine.plan.draw_rows is not None
        done = engine.generate(["w1 w2 w3", "w7 w5"], GREEDY, chat=False)
        runs.append([(c.token_ids, [x.logprob for x in c.choices]) for c in done])
        prompts = [engine.encode_prompt(p, chat=False) for p in ("w1 w2 w3", "w7 w5", "w4 w4 w9 w2")]
        together = [engine.submit(pr, pa) for pr, pa in zip(prompts, sampled)]
        while not engine.scheduler.idle:
            engine.step()
        sampled_runs.append([(tuple(r.output_ids), [x.logprob for x in r.choices]) for r in together])
        if tp == 1:  # each drew its own row: what it draws alone (a call of its row only)
            alone = [tuple(engine.generate(pr, pa).token_ids) for pr, pa in zip(prompts, sampled)]
            assert alone == [t for t, _ in sampled_runs[0]]
        engine.plan.runner.close()
    assert runs[0] == runs[1] == runs[2]
    assert sampled_runs[0] == sampled_runs[1] == sampled_runs[2]
    # three different answers: sampled by their seeds, not one greedy continuation
    assert len({tuple(t) for t, _ in sampled_runs[0]}) == 3


GREEDY = SamplingParams(max_tokens=10, temperature=0, logprobs=True, ignore_eos=True)


def test_engine_tp2_serves_what_tp1_serves_and_survives_a_killed_rank(tiny_hf):
    path = str(tiny_hf("llama"))
    one = _engine(path, 1)
    expected = one.generate("w1 w2 w3", GREEDY, chat=False)
    expected_scored = one.generate("w1 w2 w3", dataclasses.replace(GREEDY, prompt_logprobs=True), chat=False)
    assert len(expected_scored.prompt_choices) == len(one.encode_prompt("w1 w2 w3", chat=False)) - 1
    one.plan.runner.close()
    two = _engine(path, 2)
    runner = two.plan.runner
    try:
        got = two.generate("w1 w2 w3", GREEDY, chat=False)
        assert got.token_ids == expected.token_ids
        assert [c.logprob for c in got.choices] == [c.logprob for c in expected.choices]
        # a prompt scored (prompt_logprobs): its rows' logits come from every rank's vocabulary chunks
        scored = two.generate("w1 w2 w3", dataclasses.replace(GREEDY, prompt_logprobs=True), chat=False)
        assert [c.logprob for c in scored.prompt_choices] == [c.logprob for c in expected_scored.prompt_choices]
        assert [c.logprob for c in scored.choices] == [c.logprob for c in expected.choices]
        # SIGKILL rank 1 while a request runs: it fails with an error naming the rank failure, promptly
        two.start()
        events: queue.Queue = queue.Queue()
        ids = two.encode_prompt("w1 w2 w3", chat=False)
        request = two.submit(ids, dataclasses.replace(GREEDY, max_tokens=100), events.put)
        first = events.get(timeout=30)  # it is running
        assert first.finish_reason is None
        killed_at = time.monotonic()
        os.kill(runner.ranks.workers[0].pid, signal.SIGKILL)
        while (delta := events.get(timeout=10)).finish_reason is None:
            pass
        assert delta.finish_reason == "error" and "RankFailure" in delta.error, delta
        assert time.monotonic() - killed_at < 5.0
        assert request.finish_reason == "error"
        # the group is formed again (new processes) and a new request gets the same answer as before
        again = two.generate("w1 w2 w3", GREEDY, chat=False)
        assert again.token_ids == expected.token_ids
        assert runner.rebuilds == 1
    finally:
        two.stop()
        runner.close()


def test_a_model_file_that_differs_between_ranks_is_refused(tiny_hf, tmp_path):
    from metronome.parallel.plan import Ranks

    path = tiny_hf("llama")
    other = tmp_path / "other"
    shutil.copytree(path, other)
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # another copy of the "same" model
    loaded = load(str(path))
    config, layout, _ = tp_settings(loaded, EngineConfig(slots=1, ctx=64, tp=2, tp_shards=4, weights="f32"))
    with pytest.raises(GroupError, match="the model file differs between ranks"):
        Ranks(loaded, config, layout, lambda _m: None, path=str(other)).form()


def test_torchrun_launch_serves_the_same_tokens(tiny_hf, tmp_path):
    """Ranks started by torchrun (as on many hosts), bound to loopback: rank 0 prints what tp=1 gives."""
    path = str(tiny_hf("llama"))
    want = _engine(path, 1)
    expected = want.generate("w1 w2 w3", dataclasses.replace(GREEDY, ignore_eos=False), chat=False).text
    want.plan.runner.close()
    assert len(expected.split()) >= 3  # a real continuation to find in rank 0's output
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd = [*torchrun, "--master-port", str(free_port()), "-m", "metronome.cli", "generate", "--model", path]
    cmd += ["--tp", "2", "--tp-shards", "4", "--weights", "f32", "--raw", "--max-tokens", "10", "--temperature", "0"]
    cmd += ["--spec-tokens", "0", "--ctx", "128", "--slots", "2", "w1 w2 w3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected.strip() in done.stdout, (expected, done.stdout)


def test_the_calibration_prices_rank_zeros_cut(wide_llama):
    """`plan --calibrate` predicts tp=2 from rank 0's matrices (half of q/k/v, gate/up and the head; o and
    down as K chunks) and the exchanges of a step (o and down of each layer, the logits, the broadcast)."""
    from metronome.fleet.calibrate import PlanCost, plan_matmuls, tp_plan_cost

    loaded = load(wide_llama)
    config = EngineConfig(slots=1, ctx=128, threads=2, tp_shards=4, weights="int8", spec_tokens=0)
    base = PlanCost("m", {}, 2, 128, 24, {1: 50})
    plain = Engine.from_model(wide_llama, EngineConfig(slots=1, ctx=128, weights="int8", spec_tokens=0))
    full_counts, full_head, _ = plan_matmuls(plain.plan.runner)  # qkv, o, gate_up, down per layer
    before = torch.get_num_threads()
    cost, samples, threads = tp_plan_cost(loaded, config, 2, base)
    assert torch.get_num_threads() == before  # building rank 0's cut leaves this process's threads alone
    # o and down of 2 layers, the logits, the step's broadcast (one exchange through shared memory)
    assert threads == 1 and cost.collectives == 2 * 2 + 1 + 1 and cost.q_size == 64  # 2 of the 4 heads of 32
    gloo = tp_plan_cost(loaded, config, 2, base, shared_memory=False)[0]
    assert gloo.collectives == cost.collectives + 1  # over gloo the broadcast sends its size, then its contents
    assert cost.head_matmul.rows == -(-full_head.rows // 4) * 2 and cost.head_matmul.k == full_head.k  # 2 of 4 cuts
    # per layer: qkv and gate_up with half their rows; o and down as rank 0's 2 of 4 K chunks, a call each
    assert sum(cost.matmuls.values()) == sum(full_counts.values()) + 2 * 2
    chunks = {(m.rows, m.k): n for m, n in cost.matmuls.items() if m.rows == 128}
    assert chunks == {(128, 32): 2 * 2, (128, 64): 2 * 2}  # o: K 128 in 4 chunks of 32; down: 256 in 4 of 64
    work = [m.rows * m.k * n for m, n in cost.matmuls.items()]
    assert sum(work) < 0.6 * sum(m.rows * m.k * n for m, n in full_counts.items())
    assert set(samples) == {*cost.matmuls, cost.head_matmul}


def _turns(page: int) -> list[list[int]]:
    """An agent's turns: each prompt begins with the last one (words of the tiny vocabulary after <s>)."""
    base = [1] + [5 + (7 * i) % 100 for i in range(4 * page)]
    return [base[: 2 * page + 5], base[: 3 * page + 1], base[: 3 * page + 1] + base[:2]]


def _trace(done) -> list:
    return [(c.token_ids, [x.logprob for x in c.choices]) for c in done]


def test_tensor_parallel_ranks_keep_their_own_prefix_pages(wide_llama):
    """Every rank pools the pages of its own KV heads, rank 0 deciding which: the agent's turns find their
    beginnings cached, colocated and with a prefill worker (which gets every rank's heads of the cached
    pages), and give the tokens and logprobs of tp=1 with no prefix cache over the same 4 chunks."""
    runs, cached = {}, {}
    for tp, layout, pool in ((1, "colocated", 0), (2, "colocated", 4096), (2, "disaggregated", 4096)):
        config = EngineConfig(
            slots=2, ctx=128, weights="int8", spec_tokens=0, tp=tp, tp_shards=4, layout=layout, threads=2,
            prefix_cache_tokens=pool,
        )  # fmt: skip
        engine = Engine.from_model(wide_llama, config, calibrate=False)
        try:
            assert (engine.prefix_cache is not None) == bool(pool), engine.plan.report.prefix_cache_note
            # one after the other, each finding the last in the pool; between them another prompt runs in
            # the same slot, so what the slot held before is gone wherever a rank failed to copy its pages
            other = [1] + [6 + (11 * i) % 90 for i in range(60)]
            turns = [t for turn in _turns(16) for t in (turn, other)]
            done = [engine.generate(t, GREEDY) for t in turns]
            runs[tp, layout], cached[tp, layout] = _trace(done), [c.cached_tokens for c in done]
        finally:
            if engine.prefiller is not None:
                engine.prefiller.close()
            engine.plan.runner.close()
    assert runs[2, "colocated"] == runs[1, "colocated"]
    assert runs[2, "disaggregated"] == runs[1, "colocated"]
    assert cached[2, "colocated"] == cached[2, "disaggregated"] == [0, 0, 32, 48, 48, 48]


def test_a_rank_started_again_comes_with_an_empty_pool_which_the_prefix_cache_forgets(wide_llama):
    """After a rank is killed and the group formed again, the new rank's pool is empty: the prefix cache
    forgets every page (copying them would give that rank's heads zeros, and other tokens). A group that
    fails to form again counts as a failure too (it was raised uncounted, and the cache's pages outlived it)."""
    config = EngineConfig(slots=2, ctx=128, weights="int8", spec_tokens=0, tp=2, tp_shards=4, threads=2)
    engine = Engine.from_model(wide_llama, config, calibrate=False)
    runner = engine.plan.runner
    try:
        first, second, _ = _turns(16)
        engine.generate(first, GREEDY)
        want = engine.generate(second, GREEDY)
        assert want.cached_tokens == 32
        reform, tries = runner.ranks.reform, []

        def failing_once() -> None:
            tries.append(1)
            if len(tries) == 1:
                raise GroupError("the new rank did not join (as a rank that cannot start)")
            reform()

        runner.ranks.reform = failing_once
        os.kill(runner.ranks.workers[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while runner.failures < 2 and time.monotonic() < deadline:  # the heartbeat finds it (2 s), then reforms
            time.sleep(0.05)
        assert runner.failures == 2  # the kill, and the group that did not form
        again = engine.generate(second, GREEDY)
        assert again.cached_tokens == 0 and runner.rebuilds == 1
        assert _trace([again]) == _trace([want])
        last = engine.generate(second, GREEDY)  # pooled again, on the new ranks too (prompt and reply)
        assert last.cached_tokens == 48 and _trace([last]) == _trace([want])
    finally:
        runner.close()


def test_a_refused_tp_engine_releases_its_ranks_and_a_draft_model_runs_beside_them(tiny_hf, wide_llama):
    """A refusal after the group formed (a disaggregated f32 plan, a draft model) left rank 1 running, and
    the next tensor-parallel engine of the process could not form its group ('initialize the default
    process group twice'); a draft model was compiled with the main plan's tp, and so never ran with one."""
    import multiprocessing as mp

    path = str(tiny_hf("llama"))
    with pytest.raises(ValueError, match="needs the fused CPU decoder"):
        Engine.from_model(
            path, EngineConfig(slots=2, ctx=128, tp=2, tp_shards=4, weights="f32", layout="disaggregated")
        )
    assert not [p for p in mp.active_children() if p.name.startswith("tp-rank")]
    plain = EngineConfig(slots=2, ctx=128, tp=2, tp_shards=4, weights="int8", spec_tokens=0)
    with Engine.from_model(wide_llama, plain, calibrate=False) as engine:
        expected = engine.generate("w1 w2 w3 w1 w2 w3 w1 w2", GREEDY, chat=False)
    drafted = dataclasses.replace(plain, spec_tokens=4, draft=wide_llama)
    with Engine.from_model(wide_llama, drafted, calibrate=False) as engine:
        got = engine.generate("w1 w2 w3 w1 w2 w3 w1 w2", GREEDY, chat=False)
        assert engine.spec.drafted > 0
    assert got.token_ids == expected.token_ids
    assert [c.logprob for c in got.choices] == [c.logprob for c in expected.choices]
    assert not [p for p in mp.active_children() if p.name.startswith("tp-rank")]


def test_a_cut_that_splits_a_files_blocks_says_which_chunk_counts_would_not():
    """Qwen2.5-0.5B's 4,864-wide down projection is 19 Q4_K blocks a row: at --tp 2 the message said "choose
    fewer tp_shards (no fewer than --tp)", which no setting could follow."""
    import numpy as np

    from metronome.model.loader import QuantTensor
    from metronome.parallel.fused_tp import _columns

    down = QuantTensor(np.zeros((2, 19 * 144), np.uint8), "Q4_K", (2, 19 * 256))
    with pytest.raises(ShardingError, match=r"\(19 a row\).*that divides 19; otherwise run the torch path"):
        _columns(down, 0, 19 * 128, "layers.0.w_down")
    assert _columns(down, 0, 19 * 256, "layers.0.w_down").shape == (2, 19 * 256)


def test_a_layout_and_its_chunk_counts_check_every_rank_and_width():
    """A rank one past the last was taken as a layout (its chunks past the matrices' rows); a model with 8
    heads and widths that cut in 8 gets 8 default chunks (the limit itself); a shared expert's width that
    does not divide is refused like the experts' widths."""
    from metronome.config import ModelConfig

    with pytest.raises(ShardingError, match="rank=2 is outside 0..1"):
        TPLayout(2, 2, 4)
    assert TPLayout(2, 1, 4).chunks == range(2, 4)
    cfg = ModelConfig(
        arch="llama", vocab_size=100, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=8,
        num_kv_heads=8, head_dim=32, max_position=64,
    )  # fmt: skip
    assert default_shards(cfg) == 8
    moe = dataclasses.replace(cfg, num_experts=4, experts_per_token=2, moe_intermediate_size=64, shared_expert_size=100)
    with pytest.raises(ShardingError, match="tp_shards=8: this model cannot be cut in 8: a shared expert width of 100"):
        check_shards(moe, 8)  # 8 divides the heads and the experts' 64, not the shared expert's 100
    assert default_shards(moe) == 4


def test_the_cut_embedding_gives_every_tokens_row_and_a_cut_needs_its_own_rank(tiny_hf):
    """The vocabulary (117 words) cut in 4 chunks of 30 rows, the last short: every token's row comes from
    its chunk (a chunk of 117 // 4 rows left the last token with zeros). A layout whose rank is not the
    group's is refused before the model is cut."""
    loaded = load(str(tiny_hf("llama")))
    weights = {k: dense(v) for k, v in loaded.weights.items()}
    model = build_model(loaded.config, weights, 64, torch.float32)
    whole = model.embed.weight.detach().clone()
    ids = torch.arange(loaded.config.vocab_size)[None]
    assert loaded.config.vocab_size % 4
    from metronome.parallel.tp import shard_model

    shard_model(model, TPLayout(1, 0, 4), Solo())
    assert torch.equal(model.embed(ids)[0], whole)
    other = build_model(loaded.config, weights, 64, torch.float32)
    with pytest.raises(ShardingError, match="the process group is rank 0 of 1, the layout rank 0 of 2"):
        shard_model(other, TPLayout(2, 0, 4), Solo())


def test_settings_a_tensor_parallel_plan_cannot_run_are_refused_before_any_rank(tiny_hf, monkeypatch):
    """int8 weights with kernels='torch' (the tp path runs int4/int8 on the C++ kernels only), and a tp that
    is not the WORLD_SIZE torchrun started: refused naming the setting, before a group is joined (a group of
    3 that only 1 process joins waits out its 30 s timeout)."""
    from metronome.compile.plan import PlanError
    from metronome.parallel.plan import compile_tp_plan

    loaded = load(str(tiny_hf("llama")))
    with pytest.raises(PlanError, match="kernels='torch' with weights='int8'") as err:
        tp_settings(loaded, EngineConfig(slots=1, ctx=64, tp=2, tp_shards=4, weights="int8", kernels="torch"))
    assert err.value.param == "weights"
    with pytest.raises(PlanError, match=r"ctx=1024 is longer than the model's context \(512\)") as err:
        tp_settings(loaded, EngineConfig(slots=1, ctx=1024, tp=2, tp_shards=4, weights="f32"))
    assert err.value.param == "ctx"
    config = EngineConfig(slots=1, ctx=64, tp=2, tp_shards=4, weights="f32")
    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    with pytest.raises(PlanError, match=r"tp=2 but torchrun started 3 ranks \(WORLD_SIZE\): pass --tp 3") as err:
        compile_tp_plan(loaded, config, calibrate=False)
    assert err.value.param == "tp" and time.monotonic() - t0 < 10


class _Pool:
    """A rank's prefix cache pool, as TPRunner and TPPages see it."""

    page, pages = 16, 4

    def __init__(self) -> None:
        self.copies: list = []

    def nbytes(self) -> int:
        return 1000

    def copy(self, slot, moves, into_pool) -> None:
        self.copies.append((slot, moves, into_pool))


class _Group:
    rank, world, transport = 0, 2, "test"

    def __init__(self) -> None:
        self.sent: list = []

    def broadcast_object(self, obj=None):
        self.sent.append(obj)
        return obj

    def close(self) -> None:
        pass


class _Ranks:
    def reform(self) -> None:
        pass

    def alive(self) -> bool:
        return False  # no Stop at close

    def stop(self) -> None:
        pass


def test_a_page_copy_asked_for_before_a_failure_runs_on_no_rank():
    """The prefix cache asks for a copy at the failure count it saw; a failure since (new ranks, empty pools)
    makes the copy run nowhere, and the pool's generation is that count. The pools of all ranks count in
    its size."""
    from metronome.parallel.runner import CopyPages, TPPages, TPRunner

    class Local:
        any_rows, weight_bytes, decode_mode = True, 0, "compact"

    pool, group = _Pool(), _Group()
    tp = TPRunner(Local(), group, _Ranks(), pool)
    try:
        pages = TPPages(tp, pool)
        assert pages.nbytes() == 2 * pool.nbytes() and pages.generation == 0
        assert pages.copy(0, [], True, generation=0) and len(pool.copies) == 1 and len(group.sent) == 1
        tp.failures += 1  # as a failed call counts it
        assert pages.generation == 1
        assert not pages.copy(0, [], True, generation=0)
        assert len(pool.copies) == 1 and len(group.sent) == 1  # neither sent to the other ranks nor run here
        assert isinstance(group.sent[0], CopyPages)
    finally:
        tp.close()


def test_a_tensor_parallel_plan_reports_the_kv_cache_of_every_rank(tiny_hf):
    """Each rank holds its KV heads: the plan's report counts them all, as one process holding every head."""
    path = str(tiny_hf("llama"))
    sizes = []
    for tp in (1, 2):
        engine = _engine(path, tp)
        try:
            sizes.append(engine.plan.report.kv_cache_bytes)
            assert engine.plan.cache.nbytes() * tp == sizes[-1]
        finally:
            engine.plan.runner.close()
    assert sizes[0] == sizes[1]
