"""The kernel that draws sampled rows (csrc/sample.cpp, CppOps.sample_rows) against the distribution
written again in float64 here: the token at a uniform number is the inverse of the cumulative weights (ids
in order; for top-p the nucleus by weight, ties by id), masked tokens are never drawn, and a row's token
depends on nothing but the row (its batch, its place in it, the thread count)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metronome.kernels.ops import KernelBuildError, load_kernels

try:
    OPS = load_kernels()
except KernelBuildError as exc:  # pragma: no cover - every CI machine has AVX-512 or AVX2
    pytest.skip(f"C++ kernels unavailable: {exc}", allow_module_level=True)


def _draw(
    logits: torch.Tensor, u: float, temp: float = 1.0, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0
) -> int:
    row = logits.float().reshape(1, -1)
    settings = (
        torch.tensor([1.0 / temp]),
        torch.tensor([top_k]),
        torch.tensor([top_p]),
        torch.tensor([min_p]),
        torch.tensor([u], dtype=torch.float64),
    )
    return OPS.sample_rows(row, torch.zeros(1, dtype=torch.long), row.shape[1], *settings)[0]


def _kept(x: np.ndarray, temp: float, top_p: float, min_p: float, top_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a row keeps, in the order the draw walks them, and their weights (float64)."""
    finite = np.isfinite(x)
    w = np.where(finite, np.exp((np.where(finite, x, 0.0) - x[finite].max()) / temp), 0.0)
    if 0 < top_k < len(x):
        w = np.where(w >= np.sort(w)[::-1][top_k - 1], w, 0.0)  # the k-th largest and its ties stay
    order = np.arange(len(x))
    if top_p < 1.0:
        order = np.array(sorted(np.flatnonzero(w > 0), key=lambda i: (-w[i], i)))
        before = np.concatenate([[0.0], np.cumsum(w[order])[:-1]])
        order = order[before < top_p * w.sum()]
    order = order[(w[order] > 0) & (w[order] >= min_p)]
    return order, w[order]


def _midpoints(weights: np.ndarray) -> np.ndarray:
    """A uniform number in the middle of each kept token's share of [0, 1)."""
    ends = np.cumsum(weights) / weights.sum()
    return (ends - weights / weights.sum() / 2).clip(0.0, np.nextafter(1.0, 0.0))


@pytest.mark.parametrize(
    ("temp", "top_p", "min_p", "top_k"),
    [
        (1.0, 1.0, 0.0, 0),
        (0.7, 1.0, 0.0, 0),
        (1.3, 1.0, 0.0, 0),
        (1.0, 0.9, 0.0, 0),
        (0.8, 0.5, 0.0, 0),
        (1.0, 1.0, 0.2, 0),
        (1.0, 0.9, 0.3, 0),
        (1.0, 1.0, 0.0, 40),
        (0.9, 0.8, 0.0, 60),
        (1.0, 0.9, 0.5, 100),
        (1.0, 1.0, 0.0, 199),
    ],
)
def test_the_token_at_u_is_the_inverse_of_the_cumulative_weights(
    temp: float, top_p: float, min_p: float, top_k: int
) -> None:
    # 203 tokens: 12 whole chunks of 16 and a tail of 11; logits spread over 6 units, so every kept token's
    # share is far wider than float32's rounding of the weights
    x = np.random.default_rng(0).uniform(-3.0, 3.0, size=203)
    x[[7, 100, 202]] = -np.inf  # masked: never drawn, the last token too
    order, weights = _kept(x, temp, top_p, min_p, top_k)
    assert 1 < len(order) <= 200  # 200: the whole row but the masked tokens
    got = [_draw(torch.from_numpy(x), float(u), temp, top_p, min_p, top_k) for u in _midpoints(weights)]
    assert got == order.tolist()


@pytest.mark.parametrize(
    ("tail", "tail_weight", "size"),
    [(3000, 0.3, 1900), (200, 1e-4, 120), (2000, 1e-7, 900)],
    ids=["bound 2^-10", "bound 2^-20", "every token"],
)
def test_top_p_is_the_full_sorts_nucleus_at_each_bound(tail: int, tail_weight: float, size: int) -> None:
    """The kernel sorts only the tokens at or above 2^-10 of the top weight, then 2^-20, then all of them,
    when they hold top_p of the mass: a top token (weight 1) and a tail of distinct weights at about
    `tail_weight`, above or below each bound, with top_p in the middle of the `size`th token's share (where
    float32's rounding of the row's total cannot move the cut)."""
    rng = np.random.default_rng(1)
    # the tail's logits 0.7/tail apart (float32's rounding of the logits and the kernel's e^x move a weight
    # by a millionth or less, and would swap two random weights that close)
    steps = rng.permutation(tail) * (0.7 / tail)
    x = np.concatenate([[0.0], np.log(tail_weight) - steps]).astype(np.float32).astype(np.float64)
    rng.shuffle(x)  # the top token anywhere
    order, weights = _kept(x, 1.0, 1.0, 0.0)  # by id: every token
    ranked = np.sort(weights)[::-1]
    top_p = float(np.float32((ranked[: size - 1].sum() + ranked[size - 1] / 2) / ranked.sum()))
    order, weights = _kept(x, 1.0, top_p, 0.0)
    assert len(order) == size
    got = [_draw(torch.from_numpy(x), float(u), 1.0, top_p) for u in _midpoints(weights)]
    assert got == order.tolist()


def test_a_tie_at_the_cut_goes_by_id_for_top_p_and_stays_for_top_k() -> None:
    x = np.log(np.array([0.25, 0.5, 1.0, 0.5, 0.125]))  # the two 0.5s: 1 before 3
    assert _kept(x, 1.0, 0.6, 0.0)[0].tolist() == [2, 1]  # 1.0 + 0.5 reach 0.6 of 2.375
    assert {_draw(torch.from_numpy(x), u, 1.0, 0.6) for u in np.linspace(0.0, 0.999, 50)} == {1, 2}
    # top-k keeps the k-th largest weight's ties: k = 2 keeps both 0.5s
    assert {_draw(torch.from_numpy(x), u, top_k=2) for u in np.linspace(0.0, 0.999, 50)} == {1, 2, 3}


def test_a_masked_token_is_never_drawn_at_either_end_of_u() -> None:
    x = torch.zeros(37)
    x[0] = x[35:] = float("-inf")
    for u in (0.0, 1e-300, 0.5, float(np.nextafter(1.0, 0.0))):
        assert _draw(x, u) not in (0, 35, 36)
    assert _draw(x, 0.0) == 1 and _draw(x, float(np.nextafter(1.0, 0.0))) == 34


def test_rows_are_drawn_alone_whatever_the_batch_and_the_threads() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(11, 49_200, generator=g) * 4  # a real vocabulary's width, rows padded past it
    n = 9
    per_row = (
        torch.tensor([3, 0, 10, 5, 5, 1, 7, 2, 9]),  # rows
        torch.rand(n, generator=g) + 0.5,  # inv_temp
        torch.tensor([0, 0, 40, 0, 0, 5, 0, 1000, 0]),  # top_k
        torch.tensor([1.0, 0.9, 0.5, 1.0, 0.95, 1.0, 0.8, 1.0, 0.3]),  # top_p
        torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.05, 0.0, 0.0]),  # min_p
        torch.rand(n, generator=g, dtype=torch.float64),  # u
    )
    vocab = 49_152

    def draw(rows: torch.Tensor, *settings: torch.Tensor) -> list[int]:
        return OPS.sample_rows(logits, rows, vocab, *settings)

    try:
        OPS.set_threads(2)
        batch = draw(*per_row)
        OPS.set_threads(1)
        one_thread = draw(*per_row)
    finally:
        OPS.set_threads(torch.get_num_threads())
    alone = [draw(*(t[i : i + 1] for t in per_row))[0] for i in range(n)]
    assert batch == one_thread == alone
    assert all(0 <= t < vocab for t in batch)


def test_a_row_with_nothing_to_draw_gives_minus_one() -> None:
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(20)
        x[13] = bad
        assert _draw(x, 0.5) == -1
    assert _draw(torch.full((20,), float("-inf")), 0.5) == -1


@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [
        ("inv_temp", 0.0, "inv_temp"),
        ("top_k", -1, "top_k"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("min_p", -0.1, "min_p"),
        ("u", 1.0, "u"),
        ("rows", 4, "rows"),
    ],
)
def test_settings_out_of_range_are_refused_by_name(arg: str, value: float, message: str) -> None:
    args = {
        "rows": torch.zeros(1, dtype=torch.long),
        "inv_temp": torch.ones(1),
        "top_k": torch.zeros(1, dtype=torch.long),
        "top_p": torch.ones(1),
        "min_p": torch.zeros(1),
        "u": torch.full((1,), 0.5, dtype=torch.float64),
    }
    args[arg] = torch.full((1,), value, dtype=args[arg].dtype)
    with pytest.raises((ValueError, IndexError), match=message):
        OPS.sample_rows(torch.zeros(4, 8), args.pop("rows"), 8, *args.values())
