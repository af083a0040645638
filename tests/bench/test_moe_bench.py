"""bench/moe.py's random OLMoE-layout GGUF, at a tiny shape: metronome's fused plan decodes it, and llama.cpp
(where llama-cpp-python is installed) loads and decodes the same file, which `--peer` relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.llama_peer import assert_near, greedy_against_llama_cpp, open_llama
from helpers.tp_outputs import fused_tp_outputs

from metronome.bench.moe import MoeShape, _decode_run, _fused_engine, _llama_cpp, _llama_cpp_run, write_random_moe

TINY = MoeShape(hidden=64, layers=2, heads=4, kv_heads=4, experts=8, experts_per_token=2, expert_width=32, vocab=512)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_moe(tmp_path_factory.mktemp("moe") / "tiny-moe.gguf", TINY)


def test_random_moe_decodes_on_the_fused_plan(tiny_gguf: Path) -> None:
    engine = _fused_engine(tiny_gguf, threads=1)
    cfg = engine.plan.cfg
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (8, 2, 32)
    assert len(engine.plan.runner.moe_layers) == TINY.layers
    rate, dispatch, experts = _decode_run(engine, engine.encode_prompt("a lighthouse", chat=False), tokens=4)
    assert rate > 0 and 0 < dispatch < 1 and 0 < experts < 1


def test_llama_cpp_loads_and_decodes_the_random_moe(tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm, version = _llama_cpp(tiny_gguf, threads=1)
    prompt = llm.tokenize(b"a lighthouse", add_bos=False)
    assert prompt == list(b"a lighthouse")  # the byte alphabet: token id = byte value
    assert _llama_cpp_run(llm, prompt, tokens=4) > 0 and version


def test_greedy_output_matches_llama_cpp_up_to_a_near_tie(tiny_gguf: Path) -> None:
    """An independent reference for the MoE GGUF path: llama.cpp's logits and greedy tokens on the same file,
    fed the same ids. The two compute the same Q4_0 x int8 dot products but attention and the cache
    differently (metronome's cache is bf16), so they may part where the top two logits nearly tie, and rows
    whose router nearly ties may go to other experts (tests/helpers/llama_peer.py `assert_near`)."""
    llm = open_llama(tiny_gguf, f32_cache=True)  # skips where llama-cpp-python is not installed
    engine = _fused_engine(tiny_gguf, threads=1)
    texts = ("a lighthouse", "the sea at night", "xyz 123", "keeper of the light")
    results = [greedy_against_llama_cpp(engine.plan, llm, list(text.encode()), 16) for text in texts]
    print("\n" + assert_near(results, "random OLMoE-layout Q4_0"))


def test_the_qwen3moe_layout_cuts_for_tensor_parallel_and_keeps_its_tokens(tmp_path: Path) -> None:
    """The same shapes with a QK norm per head (`--arch qwen3moe`): unlike OLMoE's whole-projection norm it
    cuts into ranks, and the fused decoder at tp=2 (its Q4_0 experts' widths cut in 2 chunks of 32) gives
    the chunked tp=1 tokens and logprobs, on the file as `python tools/bench_tp.py` times it."""
    from metronome.model.loader import load
    from metronome.parallel.tp import default_shards

    shape = MoeShape(
        hidden=128, layers=2, heads=4, kv_heads=2, experts=8, experts_per_token=2, expert_width=64, vocab=512
    )
    path = write_random_moe(tmp_path / "tiny-qwen3moe.gguf", shape, arch="qwen3moe")
    cfg = load(str(path)).config
    assert cfg.arch == "qwen3moe" and cfg.qk_norm and not cfg.qk_norm_full and default_shards(cfg) >= 2
    # grouped-query attention counted at kv_heads: 2*128*128 + 2*128*64 = 49,152 a layer; the config adds
    # the norms, 2 layers * (2*128 + 2*32 per-head qk norms) + 128 = 768
    assert cfg.num_parameters() == shape.parameters()[0] + 768
    runs = fused_tp_outputs(path)
    assert runs[0] == runs[1] and len(runs[0][0]) == 6


@pytest.mark.parametrize(
    "main, argv, says",
    [
        # each ran first and then failed: "no median for empty data", a ZeroDivisionError, a ParamError traceback
        ("moe", ["--runs", "0"], "argument --runs: must be at least 1"),
        ("moe", ["--tokens", "0"], "argument --tokens: must be at least 1"),
        ("moe", ["--threads", "0"], "argument --threads: must be at least 1"),
        # 0 bursts ran 40 s and blamed the gap; 0 output tokens raised a KeyError; a layout's name a ParamError
        ("layouts", ["--bursts", "0"], "argument --bursts: must be at least 1"),
        ("layouts", ["--output-tokens", "0"], "argument --output-tokens: must be at least 1"),
        ("layouts", ["--gap", "nan"], "argument --gap: must be a positive number of seconds"),
        ("layouts", ["--layouts", "colocated,foo"], "choose one of colocated, disaggregated"),
    ],
)
def test_the_moe_and_layouts_benches_refuse_bad_flags_before_they_run(main, argv, says, tmp_path, capsys):
    from metronome.bench import layouts, moe

    run = {"moe": lambda a: moe.main(["--out", str(tmp_path / "m.gguf"), *a]), "layouts": layouts.main}[main]
    with pytest.raises(SystemExit) as exit:
        run(argv)
    assert exit.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()  # refused before the file was written


def test_the_layouts_summary_reads_percentiles_as_the_other_benches() -> None:
    """The TTFT / predicted column: median with the p10-p90 spread, interpolated as metrics.percentile; "-"
    when no burst request had a prediction; and --layouts keeps the order given."""
    from metronome.bench import layouts

    ratios = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert layouts._pct(ratios, 0.99) == pytest.approx(9.91) and layouts._pct(ratios, 0.1) == pytest.approx(1.9)
    assert layouts._spread(ratios) == "5.50 (1.90-9.10)"
    assert layouts._spread([]) == "-"
    assert layouts._layouts("disaggregated, colocated") == ["disaggregated", "colocated"]


def test_the_shape_counts_its_matrices_as_the_loaded_config_does(tiny_gguf: Path) -> None:
    """MoeShape.parameters() is (every matrix, the matrices one token reads), the file's own config's count
    less its norms. TINY: attention 2*64*64 + 2*64*64 = 16384, router 8*64 = 512, an expert 3*64*32 = 6144;
    fixed 2*(16384+512) + 2*512*64 = 99,328; total 99,328 + 2*8*6144 = 197,632; active drops the embedding
    (a lookup, not a read) and keeps 2 experts a layer: 99,328 - 32,768 + 2*2*6144 = 91,136. The config adds
    the norms: 2 layers * (2*64 + 64 + 64 for OLMoE's whole-projection qk norms) + 64 = 576, and its
    active figure keeps the embedding."""
    from metronome.model.loader import load

    total, active = TINY.parameters()
    assert (total, active) == (197_632, 91_136)
    cfg = load(str(tiny_gguf)).config
    assert cfg.num_parameters() == total + 576
    assert cfg.active_parameters() == active + 576 + 512 * 64
    # the default shape is the docstring's "~1B weights in all, ~0.2B read per token"
    assert [round(n / 1e9, 2) for n in MoeShape().parameters()] == [0.94, 0.2]


def test_measure_moe_drops_the_warm_up_and_alternates_with_the_peer(tmp_path: Path, monkeypatch) -> None:
    """With stand-ins for the engines, llama.cpp and the bandwidth probe: `runs` + 1 runs each, the first
    (warm-up) dropped from ours, the peer's and the dense yardstick's; the bandwidth read at `threads`
    before each of our runs; the peer run right after ours on the same prompt ids; medians reported."""
    from types import SimpleNamespace

    import metronome.fleet.machine
    from metronome.bench import moe

    log = []
    ours = iter([(1.0, 0.9, 0.9), (10.0, 0.1, 0.5), (30.0, 0.3, 0.7), (20.0, 0.2, 0.6)])  # warm-up first
    dense = iter([(1.0, 0.0, 0.0), (100.0, 0.0, 0.0), (300.0, 0.0, 0.0), (200.0, 0.0, 0.0)])
    peer = iter([1.0, 11.0, 33.0, 22.0])
    bandwidth = iter([1e9, 10e9, 30e9, 20e9])

    def engine(name, params, weight_bytes):
        cfg = SimpleNamespace(num_parameters=lambda: params[0], active_parameters=lambda: params[1])
        plan = SimpleNamespace(cfg=cfg, report=SimpleNamespace(weight_bytes=weight_bytes))
        return SimpleNamespace(plan=plan, model_name=name, encode_prompt=lambda text, chat: [len(name), 2, 3])

    def fused(path, threads):
        log.append(("engine", path, threads))
        return engine("moe", (1000, 200), 5_000_000) if path else engine("dense", (0, 0), 7_000_000)

    def decode_run(eng, prompt, tokens):
        log.append(("ours", eng.model_name, tuple(prompt), tokens))
        return next(ours if eng.model_name == "moe" else dense)

    def peer_run(llm, prompt, tokens):
        log.append(("peer", llm, tuple(prompt), tokens))
        return next(peer)

    def probe(threads):
        log.append(("bandwidth", threads))
        return next(bandwidth)

    monkeypatch.setattr(moe, "_fused_engine", fused)
    monkeypatch.setattr(moe, "_decode_run", decode_run)
    monkeypatch.setattr(moe, "_llama_cpp", lambda path, threads: (("llm", str(path), threads), "0.3.x"))
    monkeypatch.setattr(moe, "_llama_cpp_run", peer_run)
    monkeypatch.setattr(metronome.fleet.machine, "read_bandwidth", probe)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 1234)

    result = moe.measure_moe(path, threads=3, tokens=5, runs=3, peer=True)
    llm = ("llm", str(path), 3)
    one_run = [("bandwidth", 3), ("ours", "moe", (3, 2, 3), 5), ("peer", llm, (3, 2, 3), 5)]
    assert log[:1] == [("engine", path, 3)] and log[1:13] == one_run * 4
    assert log[13:] == [("engine", None, 3)] + [("ours", "dense", (5, 2, 3), 5)] * 4
    assert (result.total_parameters, result.active_parameters, result.weight_bytes) == (1000, 200, 5_000_000)
    assert (result.file_bytes, result.threads, result.peer_version) == (1234, 3, "0.3.x")
    assert result.runs_tokens_per_s == (10.0, 30.0, 20.0) and result.runs_bandwidth == (10e9, 30e9, 20e9)
    assert result.peer_tokens_per_s == (11.0, 33.0, 22.0)
    assert (result.dispatch_fraction, result.experts_fraction) == (0.2, 0.6)  # medians of the kept runs
    assert (result.dense_model, result.dense_tokens_per_s, result.dense_weight_bytes) == ("dense", 200.0, 7_000_000)


def test_the_moe_table_reads_in_decimal_units() -> None:
    """The figures as printed: 940,572,672 weights "0.94 B", 202,375,168 active "0.202 B", a 531,000,000-byte
    file "531 MB", 101,200,000 bytes a token "101.2 MB" (1e6, not MiB); 20 tokens/s at 101.2 MB on 4.048 GB/s
    is 50 % of its 40 tokens/s bound; the dense 90 tokens/s at 22.49 MB reads 2.024 GB/s, 50 % of 4.048;
    the peer's median 25 makes 20/25 = 0.80x. The runs' medians are 20 tokens/s and 4.048 GB/s; the first
    run's 1 GB/s would put the yardstick at 202 %."""
    from metronome.bench.moe import MoeResult

    r = MoeResult(
        940_572_672, 202_375_168, 101_200_000, 531_000_000, 2, (10.0, 20.0, 30.0), (1e9, 4.048e9, 8e9), 0.031, 0.456,
        "dense", 90.0, 22_490_000, peer_tokens_per_s=(25.0, 30.0, 10.0), peer_version="0.3.36",
    )  # fmt: skip
    table = r.markdown()
    assert "| weights: total / active per token | 0.94 B / 0.202 B |" in table
    assert "| file (Q4_0) | 531 MB |" in table and "| 101.2 MB |" in table
    assert "| active-bytes memory bound (median bandwidth) | 40.0 tokens/s |" in table
    assert "| routing + scatter + gather, of the step | 3.1% |" in table
    assert "| expert matmuls, of the step | 45.6% |" in table
    assert "| 90.0 tokens/s, 22.5 MB/token, 50% of its bound |" in table
    assert "| 25.0 (runs: 25.0, 30.0, 10.0) |" in table and "| metronome / llama.cpp | 0.80x |" in table


def test_the_moe_command_passes_its_flags(tmp_path: Path, monkeypatch, capsys) -> None:
    """--arch reaches the file written when it is missing (an existing one is kept), and --threads, --tokens,
    --runs and --peer reach the measurement, each to its own parameter."""
    from metronome.bench import moe

    written, measured = [], []

    class Result:
        def markdown(self) -> str:
            return "TABLE"

    def fake_write(path, shape=None, seed=0, arch="olmoe"):
        written.append((path, arch))
        path.write_bytes(b"x")

    monkeypatch.setattr(moe, "write_random_moe", fake_write)
    monkeypatch.setattr(moe, "measure_moe", lambda *a: measured.append(a) or Result())
    out = tmp_path / "m.gguf"
    argv = ["--out", str(out), "--arch", "qwen3moe", "--threads", "3", "--tokens", "5", "--runs", "2", "--peer"]
    moe.main(argv)
    moe.main(argv)  # the file is there now: kept
    assert written == [(out, "qwen3moe")]
    assert measured == [(out, 3, 5, 2, True)] * 2 and capsys.readouterr().out == "TABLE\nTABLE\n"


def test_an_unknown_arch_is_refused_before_a_file_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of olmoe, qwen3moe"):
        write_random_moe(tmp_path / "m.gguf", TINY, arch="mixtral")
    assert not (tmp_path / "m.gguf").exists()


class _Clock:
    """time.perf_counter's stand-in: each call moves on by `tick` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_a_decode_run_times_its_steps_and_reads_the_layers_clocks(monkeypatch) -> None:
    """Greedy: the prefill's argmax is the first token fed, each step at the next position; the layers'
    clocks are reset after the prefill, and their (dispatch, experts) seconds are shares of the steps' wall.
    The clock reads 2 s apart: 4 tokens in 2 s is 2 tokens/s; the two layers' 0.1+0.3 s dispatching is 20 %
    and their 0.5+0.7 s in experts 60 %."""
    from types import SimpleNamespace

    import numpy as np

    from metronome.bench import moe

    fed = []

    class Layer:
        def __init__(self, spent):
            self.spent, self.seen = spent, (0.0, 0.0)

        def reset_timings(self):
            self.seen = self.spent

        def timings(self):
            return self.seen

    class Plan:
        def __init__(self):
            self.runner = SimpleNamespace(moe_layers=[Layer((0.1, 0.5)), Layer((0.3, 0.7))])

        def prefill(self, prompt, slot):
            for layer in self.runner.moe_layers:
                layer.seen = (9.0, 9.0)  # the prefill's own time, cleared by the reset
            return np.eye(16)[7]

        def decode(self, slots, tokens, positions):
            fed.append((slots, tokens, positions))
            return np.eye(16)[[tokens[0] + 1]]

    monkeypatch.setattr(moe.time, "perf_counter", _Clock(2.0))
    rate, dispatch, experts = moe._decode_run(SimpleNamespace(plan=Plan()), [1, 2, 3], tokens=4)
    assert fed == [([0], [7], [3]), ([0], [8], [4]), ([0], [9], [5]), ([0], [10], [6])]
    assert (rate, dispatch, experts) == (pytest.approx(2.0), pytest.approx(0.2), pytest.approx(0.6))


def test_a_llama_cpp_run_starts_afresh_and_feeds_its_greedy_token(monkeypatch) -> None:
    """The peer's loop: reset, the prompt evaluated, then `tokens` single-token steps each feeding the argmax
    of the last position's scores; 3 tokens in 1.5 s (the clock's two reads) is 2 tokens/s."""
    import numpy as np

    from metronome.bench import moe

    class Llm:
        def __init__(self):
            self.calls, self.n_tokens, self.scores = [], 5, np.zeros((64, 16))

        def reset(self):
            self.calls.append("reset")
            self.n_tokens = 0

        def eval(self, ids):
            self.calls.append(list(ids))
            for i in ids:
                self.scores[self.n_tokens] = np.eye(16)[(i + 1) % 16]
                self.n_tokens += 1

    llm = Llm()
    monkeypatch.setattr(moe.time, "perf_counter", _Clock(1.5))
    assert moe._llama_cpp_run(llm, [4, 9], tokens=3) == pytest.approx(2.0)
    assert llm.calls == ["reset", [4, 9], [10], [11], [12]]


def test_the_peer_gets_the_threads_and_its_refusal_is_explained(monkeypatch, tmp_path: Path) -> None:
    """llama.cpp is opened with the benchmark's threads and context; its generic ValueError becomes a
    RuntimeError naming the file; our fused engine also runs at the threads asked."""
    import sys
    from types import SimpleNamespace

    opened = []

    def llama(**kwargs):
        opened.append(kwargs)
        if "bad" in kwargs["model_path"]:
            raise ValueError("Failed to load model from file")
        return "llm"

    monkeypatch.setitem(sys.modules, "llama_cpp", SimpleNamespace(Llama=llama, __version__="9.9"))
    assert _llama_cpp(tmp_path / "m.gguf", threads=3) == ("llm", "9.9")
    assert opened[0]["n_threads"] == 3 and opened[0]["n_ctx"] == 512
    with pytest.raises(RuntimeError, match="llama.cpp refused .*bad.gguf"):
        _llama_cpp(tmp_path / "bad.gguf", threads=1)


def test_the_fused_engine_runs_at_the_threads_asked(tiny_gguf: Path) -> None:
    engine = _fused_engine(tiny_gguf, threads=3)
    assert (engine.config.threads, engine.config.weights, engine.config.slots) == (3, "int4", 1)
