"""A decode benchmark's fraction of the memory bound holds each run to the bandwidth read just before it: on a
machine whose bandwidth drifts, a single reading taken at another minute made the fraction say more about
the minute than about the decoder."""

from __future__ import annotations

from metronome.bench.decode import DecodeResult
from metronome.bench.moe import MoeResult
from metronome.fleet.machine import read_bandwidth

MB = 1_000_000


def test_each_run_is_held_to_its_own_bandwidth():
    # 100 MB per token: 200 tokens/s at 20 GB/s is 100 % of that minute's bound; 150 at 30 GB/s is 50 %
    runs, bandwidths = (200.0, 150.0, 190.0), (20e9, 30e9, 19e9)
    decode = DecodeResult("m", "int4", "compact", 2, 64, runs, (0.1,) * 3, 5.0, 100 * MB, bandwidths)
    moe = MoeResult(10, 2, 100 * MB, 500 * MB, 2, runs, bandwidths, 0.03, 0.4, "dense", 300.0, 90 * MB)
    for result in (decode, moe):
        assert [round(f, 3) for f in result.runs_fraction] == [1.0, 0.5, 1.0]
        assert result.bandwidth == 20e9 and result.bound_tokens_per_s == 200.0
        assert "100% (runs: 100%, 50%, 100%)" in result.markdown()


def test_read_bandwidth_measures_something_plausible():
    assert 1e8 < read_bandwidth(threads=1, size_mib=16, repeats=1) < 1e13
