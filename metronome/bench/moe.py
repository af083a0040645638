"""A realistic-shape MoE decode benchmark on random weights (no package ships real MoE weights).

`write_random_moe` writes a GGUF of OLMoE's layout (qk-norm over the projections, 8 of 64 experts per
token, no shared expert) scaled to this machine: ~1B weights in all, ~0.2B read per token, Q4_0 blocks,
random codes and scales. `measure_moe` decodes it in process on the fused plan and reports tokens/s beside
the active-bytes memory bound (the plan's own accounting, model/moe.py) and the share of each step spent
routing, scattering and gathering (the C++ MoeLayer's own clocks, csrc/moe.h). `--peer`: llama.cpp
(llama-cpp-python) decodes the same file from the same prompt ids, its runs alternating with ours.

    flock /tmp/metronome-bench.lock python -m metronome.bench.moe --out /tmp/moe-1b.gguf --threads 2 [--peer]

`--arch qwen3moe` writes the same shapes with a QK norm per head instead, which tensor parallel can cut:
`python tools/bench_tp.py --model /tmp/moe-q3.gguf --tp 1,2` times it (docs/parallel.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metronome.args import at_least
from metronome.bench.random_gguf import add_byte_vocabulary, random_q4_0
from metronome.config import EngineConfig


@dataclass(frozen=True)
class MoeShape:
    """OLMoE-1B-7B's layout at about 1/7 of its size (OLMoE: hidden 2048, 16 layers, 64 experts of 1024)."""

    hidden: int = 1024
    layers: int = 16
    heads: int = 16
    kv_heads: int = 16
    experts: int = 64
    experts_per_token: int = 8
    expert_width: int = 256
    vocab: int = 32768

    def parameters(self) -> tuple[int, int]:
        """(total, active per token) weights."""
        d, L = self.hidden, self.layers
        attn = 2 * d * d + 2 * d * (d // self.heads * self.kv_heads)
        expert = 3 * d * self.expert_width
        fixed = L * (attn + self.experts * d) + 2 * self.vocab * d
        return fixed + L * self.experts * expert, fixed - self.vocab * d + L * self.experts_per_token * expert


ARCHS = ("olmoe", "qwen3moe")


def write_random_moe(path: Path, shape: MoeShape = MoeShape(), seed: int = 0, arch: str = "olmoe") -> Path:
    """The GGUF file, every matrix in Q4_0, norms and routers float32. `arch`: "olmoe" (QK norm over the
    whole projection), or "qwen3moe", the same shapes with a QK norm per head, which tensor parallel can
    cut (`--tp`: a whole-projection norm needs every head's values)."""
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHS)}")
    rng = np.random.default_rng(seed)
    s, d = shape, shape.hidden
    head_dim = d // s.heads
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"random-{arch}-1b")
    w.add_block_count(s.layers)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(s.expert_width)
    w.add_expert_feed_forward_length(s.expert_width)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.experts_per_token)
    add_byte_vocabulary(w, s.vocab)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(name: str, rows: int, cols: int, count: int = 0) -> None:
        data = random_q4_0(rng, rows * max(count, 1), cols, cols**-0.5)
        data = data.reshape(count, rows, -1) if count else data
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q4)

    def vector(name: str, *shape_: int, std: float = 0.0) -> None:
        w.add_tensor(name, (1.0 + std * rng.standard_normal(shape_)).astype(np.float32))

    matrix("token_embd.weight", s.vocab, d)
    matrix("output.weight", s.vocab, d)
    vector("output_norm.weight", d)
    kv = head_dim * s.kv_heads
    for i in range(s.layers):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", d)
        vector(b + "ffn_norm.weight", d)
        vector(b + "attn_q_norm.weight", d if arch == "olmoe" else head_dim)
        vector(b + "attn_k_norm.weight", kv if arch == "olmoe" else head_dim)
        matrix(b + "attn_q.weight", d, d)
        matrix(b + "attn_k.weight", kv, d)
        matrix(b + "attn_v.weight", kv, d)
        matrix(b + "attn_output.weight", d, d)
        w.add_tensor(b + "ffn_gate_inp.weight", rng.standard_normal((s.experts, d)).astype(np.float32) * d**-0.5)
        matrix(b + "ffn_gate_exps.weight", s.expert_width, d, s.experts)
        matrix(b + "ffn_up_exps.weight", s.expert_width, d, s.experts)
        matrix(b + "ffn_down_exps.weight", d, s.expert_width, s.experts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass(frozen=True)
class MoeResult:
    total_parameters: int
    active_parameters: int
    weight_bytes: int  # read per token (active experts only)
    file_bytes: int
    threads: int
    runs_tokens_per_s: tuple[float, ...]
    runs_bandwidth: tuple[float, ...]  # bytes/s, read just before each run (fleet/machine.read_bandwidth)
    dispatch_fraction: float  # routing + scatter + gather, of the decode step
    experts_fraction: float  # the experts' matmuls, of the decode step
    dense_model: str  # the yardstick: the shipped dense model, decoded the same way in the same run
    dense_tokens_per_s: float
    dense_weight_bytes: int
    peer_tokens_per_s: tuple[float, ...] = ()  # --peer: llama.cpp on the same file, runs alternating with ours
    peer_version: str = ""

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.runs_tokens_per_s)

    @property
    def bandwidth(self) -> float:
        return statistics.median(self.runs_bandwidth)

    @property
    def bound_tokens_per_s(self) -> float:
        return self.bandwidth / self.weight_bytes

    @property
    def runs_fraction(self) -> tuple[float, ...]:
        """Each run's speed against the bound at the bandwidth read just before it."""
        return tuple(r * self.weight_bytes / b for r, b in zip(self.runs_tokens_per_s, self.runs_bandwidth))

    def markdown(self) -> str:
        fractions = self.runs_fraction
        rows = [
            ("weights: total / active per token", f"{self.total_parameters / 1e9:.2f} B / {self.active_parameters / 1e9:.3f} B"),
            ("file (Q4_0)", f"{self.file_bytes / 1e6:.0f} MB"),
            ("bytes read per token (active experts only)", f"{self.weight_bytes / 1e6:.1f} MB"),
            ("threads", str(self.threads)),
            ("decode tokens/s (median)", f"{self.tokens_per_s:.1f} (runs: {', '.join(f'{r:.1f}' for r in self.runs_tokens_per_s)})"),
            ("read bandwidth, before each run (median)", f"{self.bandwidth / 1e9:.1f} GB/s (runs: {', '.join(f'{b / 1e9:.1f}' for b in self.runs_bandwidth)})"),
            ("active-bytes memory bound (median bandwidth)", f"{self.bound_tokens_per_s:.1f} tokens/s"),
            ("fraction of the bound, each run at its own bandwidth (median)", f"{statistics.median(fractions):.0%} (runs: {', '.join(f'{f:.0%}' for f in fractions)})"),
            ("routing + scatter + gather, of the step", f"{self.dispatch_fraction:.1%}"),
            ("expert matmuls, of the step", f"{self.experts_fraction:.1%}"),
            (f"yardstick: {self.dense_model} (dense), same loop", f"{self.dense_tokens_per_s:.1f} tokens/s, {self.dense_weight_bytes / 1e6:.1f} MB/token, {self.dense_tokens_per_s * self.dense_weight_bytes / self.bandwidth:.0%} of its bound"),
        ]  # fmt: skip
        if self.peer_tokens_per_s:
            peer = statistics.median(self.peer_tokens_per_s)
            rows += [
                (f"llama.cpp ({self.peer_version}) decode tokens/s, same file and threads, runs alternating", f"{peer:.1f} (runs: {', '.join(f'{r:.1f}' for r in self.peer_tokens_per_s)})"),
                ("metronome / llama.cpp", f"{self.tokens_per_s / peer:.2f}x"),
            ]  # fmt: skip
        return "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _fused_engine(path: Path | None, threads: int):
    from metronome.compile.fused import FusedRunner
    from metronome.engine import Engine

    engine = Engine.from_model(
        None if path is None else str(path),
        EngineConfig(slots=1, ctx=512, weights="int4", threads=threads, spec_tokens=0),
        calibrate=False,
    )
    if not isinstance(engine.plan.runner, FusedRunner):
        raise RuntimeError(f"the MoE benchmark runs the fused decoder; this plan runs {engine.plan.report.kernels}")
    return engine


PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _decode_run(engine, prompt: list[int], tokens: int) -> tuple[float, float, float]:
    """Greedy single-stream decode steps (one row each) after the prompt: tokens/s and the shares of the
    wall time the MoE blocks spent dispatching and in their experts (0 for a dense model)."""
    plan, layers = engine.plan, engine.plan.runner.moe_layers
    token = int(plan.prefill(prompt, 0).argmax())
    for m in layers:
        m.reset_timings()
    t0 = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + tokens):
        token = int(plan.decode([0], [token], [pos])[0].argmax())
    wall = time.perf_counter() - t0
    spent = [m.timings() for m in layers]
    return tokens / wall, sum(t[0] for t in spent) / wall, sum(t[1] for t in spent) / wall


def _llama_cpp_run(llm, prompt: list[int], tokens: int) -> float:
    """The same loop on llama.cpp (llama-cpp-python): the prompt evaluated, then `tokens` greedy steps of
    one token each; tokens/s."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return tokens / (time.perf_counter() - t0)


def _llama_cpp(path: Path, threads: int):
    """llama.cpp on the file, or a RuntimeError saying what to install or what llama.cpp said."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeError("--peer needs llama-cpp-python: pip install 'llama-cpp-python==0.3.36'") from exc
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, verbose=False)
    except ValueError as exc:  # its message is generic; the reason is in llama.cpp's log (verbose=True)
        raise RuntimeError(f"llama.cpp refused {path}: {exc} (rerun it with verbose=True for its log)") from exc
    return llm, llama_cpp.__version__


def measure_moe(path: Path, threads: int, tokens: int = 64, runs: int = 3, peer: bool = False) -> MoeResult:
    """Greedy single-stream decode of `tokens` tokens, `runs` times, on the fused plan (int4); with `peer`,
    llama.cpp on the same file and prompt ids, its runs alternating with ours; then the shipped dense
    model the same way, as a yardstick measured under the same conditions."""
    from metronome.fleet.machine import read_bandwidth

    engine = _fused_engine(path, threads)
    prompt = engine.encode_prompt(PROMPT, chat=False)
    llm, version = _llama_cpp(path, threads) if peer else (None, "")
    rates, bandwidths, dispatch, experts, peer_rates = [], [], [], [], []
    for run in range(runs + 1):  # the first run warms up
        bandwidth = read_bandwidth(threads)
        rate, d, e = _decode_run(engine, prompt, tokens)
        peer_rate = _llama_cpp_run(llm, prompt, tokens) if llm is not None else None
        if run:
            rates.append(rate)
            bandwidths.append(bandwidth)
            dispatch.append(d)
            experts.append(e)
            if peer_rate is not None:
                peer_rates.append(peer_rate)
    cfg, weight_bytes = engine.plan.cfg, engine.plan.report.weight_bytes
    del engine, llm
    dense = _fused_engine(None, threads)
    dense_prompt = dense.encode_prompt(PROMPT, chat=False)
    dense_rates = [_decode_run(dense, dense_prompt, tokens)[0] for _ in range(runs + 1)][1:]
    return MoeResult(
        cfg.num_parameters(),
        cfg.active_parameters(),
        weight_bytes,
        path.stat().st_size,
        threads,
        tuple(rates),
        tuple(bandwidths),
        statistics.median(dispatch),
        statistics.median(experts),
        dense.model_name,
        statistics.median(dense_rates),
        dense.plan.report.weight_bytes,
        tuple(peer_rates),
        version,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metronome.bench.moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the random-weight GGUF (written if missing)")
    parser.add_argument(
        "--arch", choices=ARCHS, default="olmoe", help="the file's layout when written (qwen3moe: cuts for --tp)"
    )
    # checked here: 0 runs ended in "no median for empty data", 0 tokens in a ZeroDivisionError
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--tokens", type=at_least(1), default=64)
    parser.add_argument("--runs", type=at_least(1), default=3)
    parser.add_argument(
        "--peer", action="store_true", help="also decode the file with llama.cpp (llama-cpp-python), runs alternating"
    )
    args = parser.parse_args(argv)
    if not args.out.is_file():
        write_random_moe(args.out, arch=args.arch)
    print(measure_moe(args.out, args.threads, args.tokens, args.runs, args.peer).markdown())


if __name__ == "__main__":
    main()
