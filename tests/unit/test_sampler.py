"""The per-request sampler alone, on hand-made logits: greedy, seeding, the truncation filters, the
penalties and the logprobs. No model. Every test runs twice where the C++ kernels build: with torch's draw
(a GPU row's, or a plan without the kernels) and with the kernel's (DrawRows, every CPU plan's)."""

from __future__ import annotations

import math

import pytest
import torch

from metronome.config import SamplingParams
from metronome.engine.sampler import RequestSampler, argmax_row, argmax_rows
from metronome.kernels.ops import DrawRows, KernelBuildError, load_kernels

V = 16

try:
    KERNEL_DRAW: DrawRows | None = load_kernels().sample_rows
except KernelBuildError:  # pragma: no cover - every CI machine has AVX-512 or AVX2
    KERNEL_DRAW = None
DRAW: DrawRows | None = None  # the draw `_sampler` gives its samplers: the fixture below sets it per run


@pytest.fixture(autouse=True, params=["torch", "kernel"])
def _draw(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "kernel" and KERNEL_DRAW is None:  # pragma: no cover
        pytest.skip("no C++ kernels here")
    monkeypatch.setitem(globals(), "DRAW", KERNEL_DRAW if request.param == "kernel" else None)


def _sampler(prompt: list[int] | None = None, **kw) -> RequestSampler:
    return RequestSampler(SamplingParams(**kw), prompt or [], V, DRAW)


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 2


def _support(logits: torch.Tensor, n: int = 400, **kw) -> set[int]:
    s = _sampler(**kw)
    return {s.choose(logits).token for _ in range(n)}


def test_greedy_is_the_argmax():
    for seed in range(5):
        logits = _logits(seed)
        assert _sampler().choose(logits).token == int(logits.argmax())
    # extra (padded) logits beyond the vocabulary are never chosen
    padded = torch.cat([_logits(1), torch.full((4,), 100.0)])
    assert _sampler().choose(padded).token == int(_logits(1).argmax())


def test_the_batched_argmax_picks_each_rows_first_maximum_as_the_row_argmax_does():
    """The step's batched greedy pick (Engine._picks) must be the token the request's own sampler
    picks: ties go to the lowest index, over a strided view (the padded logits cut to the vocabulary) too."""
    logits = torch.randn(6, V + 3, generator=torch.Generator().manual_seed(3))
    logits[1, [2, 9]] = 50.0  # a tie: index 2 wins
    logits[4, :] = 0.0  # all equal: index 0
    logits[5, V:] = 99.0  # padding outside the vocabulary is cut off
    view = logits[:, :V]
    assert argmax_rows(view) == [argmax_row(row) for row in view] == torch.argmax(view, dim=-1).tolist()
    assert argmax_rows(view)[1] == 2 and argmax_rows(view)[4] == 0 and argmax_rows(view)[5] < V


def test_a_seed_gives_the_same_draws_and_another_seed_other_draws():
    def draws(seed: int) -> list[int]:
        s = _sampler(temperature=1.0, seed=seed)
        return [s.choose(torch.zeros(V)).token for _ in range(30)]  # uniform: all up to the generator

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    # seed 0 is a seed (a common choice, and choice 1's seed of an n=2 request seeded -1), not "no seed"
    assert draws(0) == draws(0) and _sampler(temperature=1.0, seed=0).seed == 0


def test_unfiltered_sampling_reaches_the_whole_vocabulary():
    assert _support(torch.zeros(V), temperature=1.0, seed=0) == set(range(V))


def test_top_k_keeps_the_k_best():
    logits = torch.arange(V, dtype=torch.float32) * 0.1  # nearly flat, so every kept token shows up
    assert _support(logits, temperature=1.0, top_k=3, seed=1) == {V - 1, V - 2, V - 3}
    # one fewer than the vocabulary still drops the worst token; the whole vocabulary drops none
    assert _support(logits, n=2000, temperature=1.0, top_k=V - 1, seed=1) == set(range(1, V))
    assert _support(logits, n=2000, temperature=1.0, top_k=V, seed=1) == set(range(V))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-12))
    # 0.4 < 0.65 so token 1 is needed; 0.4 + 0.3 >= 0.65, so tokens 2 and 3 are not
    assert _support(logits, temperature=1.0, top_p=0.65, seed=2) == {0, 1}
    assert _support(logits, temperature=1.0, top_p=0.75, seed=2) == {0, 1, 2}


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.1] + [0.0] * (V - 5))
    logits = torch.log(probs.clamp_min(1e-12))
    assert _support(logits, temperature=1.0, min_p=0.3, seed=3) == {0, 1, 2}  # 0.15 >= 0.3 * 0.4 > 0.1


def test_top_p_reads_the_whole_distribution_before_min_p():
    """top-p then min-p, as transformers, vLLM and llama.cpp: min-p first left [.5, .3] of [.5, .3, .2],
    and top-p=0.6 of that mass kept token 0 alone, where the others keep 0 and 1."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2] + [1e-12] * (V - 3)))
    assert _support(logits, temperature=1.0, top_p=0.6, min_p=0.5, seed=4) == {0, 1}


def test_allowed_mask_restricts_the_choice_but_not_the_logprobs():
    logits = _logits(4)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[2, 5]] = True
    s = _sampler(temperature=1.0, seed=4, logprobs=True)
    for _ in range(100):
        c = s.choose(logits, allowed)
        assert c.token in (2, 5)
        assert c.logprob == torch.log_softmax(logits, -1)[c.token].item()
    best_allowed = 2 if logits[2] > logits[5] else 5
    assert _sampler().choose(logits, allowed).token == best_allowed


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0] + [0.5] * (V - 4))
    s = _sampler(prompt=[0, 1], repetition_penalty=2.0)
    s.observe(5)
    out = s.penalize(logits)
    expected = logits.clone()
    expected[0], expected[1], expected[5] = 1.0, -4.0, 0.25
    assert torch.equal(out, expected)


def test_presence_and_frequency_penalties_follow_the_generated_counts():
    logits = torch.zeros(V)
    s = _sampler(prompt=[7], presence_penalty=0.5, frequency_penalty=0.25)
    for t in (3, 3, 3, 9):
        s.observe(t)
    out = s.penalize(logits)
    expected = torch.zeros(V)
    expected[3] = -(0.5 + 3 * 0.25)
    expected[9] = -(0.5 + 0.25)
    assert torch.equal(out, expected)  # the prompt token 7 is not penalized by these two
    assert torch.equal(_sampler(prompt=[7]).penalize(logits), logits)  # defaults: no change


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7},
        {"presence_penalty": 0.6, "frequency_penalty": -0.35},
        {"repetition_penalty": 1.1, "presence_penalty": -0.2, "frequency_penalty": 0.45},
    ],
)
def test_penalties_on_the_tokens_they_name_are_the_whole_row_formula_bit_for_bit(penalties):
    """The sampler keeps the penalties' state as the tokens they name and changes those entries only; each
    entry is what the formula over the whole row gives it (repetition where(x > 0, x / r, x * r) on the seen
    tokens, then x - f * count - p * (count > 0)), on a real vocabulary's width."""
    vocab = 49_152
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(vocab, generator=g) * 5
    prompt = torch.randint(0, vocab, (300,), generator=g).tolist()
    generated = torch.randint(0, vocab, (200,), generator=g).tolist() + [7, 7, 7, prompt[0]]
    s = RequestSampler(SamplingParams(**penalties), prompt, vocab, DRAW)
    for t in generated:
        s.observe(t)
    r = penalties.get("repetition_penalty", 1.0)
    f, p = penalties.get("frequency_penalty", 0.0), penalties.get("presence_penalty", 0.0)
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt + generated)] = r != 1.0
    counts = torch.bincount(torch.tensor(generated), minlength=vocab).float()
    expected = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if f or p:
        expected = expected - f * counts - p * (counts > 0).float()
    out = s.penalize(logits)
    assert torch.equal(out, expected)
    assert (out != logits).sum() > 100  # the penalties did act


def test_logit_bias_is_added_first_and_decides_the_choice():
    logits = torch.zeros(V)
    logits[4], logits[6] = 1.0, 0.9
    before = logits.clone()
    s = _sampler(prompt=[6], logit_bias={6: 0.5, 9: -100}, repetition_penalty=2.0)
    expected = before.clone()
    expected[6], expected[9] = (0.9 + 0.5) / 2.0, -100.0  # the bias, then the penalty on the seen token 6
    assert torch.equal(s.penalize(logits), expected)
    assert torch.equal(logits, before)  # the step's logits are never written
    assert not _sampler(logit_bias={9: -100}).plain_greedy  # the batched argmax would skip the bias
    for penalty in ({"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"repetition_penalty": 1.2}):
        assert not _sampler(**penalty).plain_greedy, penalty  # ... and every penalty
    assert _sampler().plain_greedy
    assert _sampler(logit_bias={4: -100}).choose(logits).token == 6
    assert _sampler(logit_bias={2: 100}).choose(logits).token == 2
    sampled = _sampler(temperature=1.0, seed=3, logit_bias={11: 100})
    assert {sampled.choose(logits).token for _ in range(50)} == {11}


def test_penalties_decide_the_greedy_choice():
    logits = torch.zeros(V)
    logits[4], logits[6] = 1.0, 0.9
    s = _sampler(frequency_penalty=0.2)
    assert s.choose(logits).token == 4
    s.observe(4)
    assert s.choose(logits).token == 6


def test_logprobs_are_the_log_softmax_of_the_penalized_logits():
    logits = _logits(5)
    s = _sampler(temperature=0.7, seed=5, logprobs=True, top_logprobs=4, presence_penalty=1.0)
    s.observe(int(logits.argmax()))
    expected = torch.log_softmax(s.penalize(logits), -1)
    c = s.choose(logits)
    assert c.logprob == expected[c.token].item()
    values, ids = torch.topk(expected, 4)
    assert c.top == tuple(zip(ids.tolist(), values.tolist()))
    assert math.isclose(sum(math.exp(v) for v in expected.tolist()), 1.0, rel_tol=1e-5)
    assert _sampler().choose(logits).logprob is None and _sampler().choose(logits).top == ()


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_temperature_scales_the_sampling_distribution(temperature):
    # two tokens with logits 0 and 1: P(second) = sigmoid(1 / T)
    logits = torch.full((V,), -1e9)
    logits[0], logits[1] = 0.0, 1.0
    s = _sampler(temperature=temperature, seed=6)
    n = 4000
    share = sum(s.choose(logits).token == 1 for _ in range(n)) / n
    assert share == pytest.approx(1 / (1 + math.exp(-1 / temperature)), abs=0.03)


def test_top_logprobs_alone_reports_the_alternatives():
    """top_logprobs without logprobs still asks for the alternatives: such a request is not plain greedy (the
    batched argmax reports no logprobs) and its choice carries the top list and the token's logprob."""
    logits = _logits(7)
    s = _sampler(top_logprobs=3)
    assert not s.plain_greedy and not _sampler(logprobs=True).plain_greedy
    c = s.choose(logits)
    expected = torch.log_softmax(logits, -1)
    values, ids = torch.topk(expected, 3)
    assert c.token == int(logits.argmax()) and c.top == tuple(zip(ids.tolist(), values.tolist()))
    assert c.logprob == expected[c.token].item()


def test_a_padded_mask_is_cut_to_the_vocabulary_with_its_logits():
    """A constraint's mask is as wide as the step's padded logits row: both are cut to the vocabulary, so a
    mask the greedy argmax strays from, or any sampled row, is applied without a shape error."""
    logits = torch.cat([_logits(8), torch.full((4,), 100.0)])
    allowed = torch.zeros(V + 4, dtype=torch.bool)
    allowed[[3, 9]] = True
    best = 3 if logits[3] > logits[9] else 9
    assert _sampler().choose(logits, allowed).token == best
    assert {_sampler(temperature=1.0, seed=s).choose(logits, allowed).token for s in range(20)} <= {3, 9}


def test_top_p_and_min_p_keep_their_boundaries():
    """top-p keeps the smallest set whose mass reaches top_p: a token after the mass was reached exactly is
    dropped. min-p drops tokens below the bound only: tokens tied with the best (min_p=1) all stay."""
    logits = torch.full((V,), float("-inf"))
    logits[2] = logits[5] = 0.0  # exactly 0.5 each
    assert _support(logits, n=200, temperature=1.0, top_p=0.5, seed=9) == {2}
    assert _support(logits, n=200, temperature=1.0, top_p=0.51, seed=9) == {2, 5}
    assert _support(logits, n=200, temperature=1.0, min_p=1.0, seed=9) == {2, 5}


def test_top_p_of_one_leaves_the_distribution_as_it_is():
    """top_p=1 is off: the sampled distribution is the softmax itself. Run through the top-p pass, float
    rounding makes the cumulative mass reach the total early and drops the tail."""
    logits = torch.zeros(V)
    logits[0] = 30.0
    s = _sampler(temperature=1.0, seed=10)
    kept, probs = s._truncated(logits)
    assert kept is None and torch.equal(probs, torch.softmax(logits, -1))


def test_draw_takes_tokens_in_proportion_to_their_weights_and_never_a_zero_weight():
    """The sampler's draw (the inverse of the cumulative weights at one uniform number): zero-weight tokens at
    the start, the middle and the end are never drawn, the shares follow the weights, and the same generator
    state gives the same token."""
    from metronome.engine.sampler import draw

    weights = torch.tensor([0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 6.0, 0.0])
    g = torch.Generator().manual_seed(11)
    n = 20_000
    counts = torch.bincount(torch.tensor([draw(weights, g) for _ in range(n)]), minlength=len(weights))
    assert counts[weights == 0].sum() == 0
    for token, share in ((2, 0.1), (4, 0.3), (7, 0.6)):
        assert counts[token] / n == pytest.approx(share, abs=0.015), (token, counts.tolist())
    one, two = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(weights, one) for _ in range(50)] == [draw(weights, two) for _ in range(50)]
    assert draw(torch.tensor([0.0, 0.0, 2.0]), g) == 2  # the last token, alone


@pytest.mark.parametrize("weights", [[0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], []])
def test_draw_refuses_weights_that_are_no_distribution(weights):
    from metronome.engine.sampler import draw

    with pytest.raises(ValueError, match="cannot sample"):
        draw(torch.tensor(weights), torch.Generator().manual_seed(0))
