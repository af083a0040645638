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
