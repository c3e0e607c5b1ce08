"""The bit count, the oracle allocation and the complexity measures behind `tatok eval`'s allocation report."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tatok_core.workflows import allocation
from tatok_core.workflows.allocation import image_complexity, oracle_allocation, paired, spearman
from tatok_core.contract.bitrate import log2_binomial, token_bits


def test_token_bits_counts_codes_globals_and_positions() -> None:
    bits = token_bits(torch.tensor([0, 1, 3, 4]), num_patches=4, num_global=2, codebook_size=1024, image_size=(8, 8))
    assert bits.codes.tolist() == [0.0, 10.0, 30.0, 40.0]  # 10 bits per code
    assert bits.globals_.tolist() == [20.0] * 4
    assert bits.side.tolist() == pytest.approx([math.log2(5) + math.log2(c) for c in (1, 4, 4, 1)])
    assert bits.bpp().tolist() == pytest.approx(((bits.codes + bits.globals_ + bits.side) / 64).tolist())
    implied = token_bits(torch.tensor([3]), 4, 2, 1024, (8, 8), positions_from_count=True)
    assert implied.side.tolist() == pytest.approx([math.log2(5)])  # raster / seeded random: only k
    with pytest.raises(ValueError, match="kept counts must lie in"):
        token_bits(torch.tensor([5]), 4, 2, 1024, (8, 8))


def test_log2_binomial_is_exact_on_small_numbers_and_finite_on_large() -> None:
    for n, k in [(10, 3), (64, 32), (256, 0), (256, 256)]:
        assert float(log2_binomial(n, torch.tensor(k))) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-9)
    assert math.isfinite(float(log2_binomial(1 << 20, torch.tensor(1 << 19))))


def test_side_information_of_a_subset_beats_an_index_per_token() -> None:
    """Keeping 90 % of 256 tokens: log2 C(N, k) is far below k·log2 N (what naming each position costs)."""
    side = float(token_bits(torch.tensor([230]), 256, 0, 2, (64, 64)).side[0])
    assert side < 230 * 8 / 10


@pytest.mark.parametrize("seed", range(8))
def test_oracle_allocation_is_the_best_choice_within_the_budget(seed: int) -> None:
    """Brute force over every choice: none with mean count ≤ the target beats the oracle's total PSNR —
    curves that dip and jump included (a Lagrangian reaches only each image's convex hull)."""
    rng = np.random.default_rng(seed)
    counts = [sorted(rng.choice(12, size=int(rng.integers(2, 5)), replace=False).tolist()) for _ in range(4)]
    psnrs = [rng.uniform(10, 30, size=len(c)).tolist() for c in counts]
    target = float(rng.uniform(max(min(c) for c in counts), 8))
    choice = oracle_allocation(counts, psnrs, target)
    assert np.mean([c[j] for c, j in zip(counts, choice)]) <= target
    value = sum(p[j] for p, j in zip(psnrs, choice))
    feasible = [other for other in itertools.product(*(range(len(c)) for c in counts))
                if np.mean([c[j] for c, j in zip(counts, other)]) <= target]
    assert value == pytest.approx(max(sum(p[j] for p, j in zip(psnrs, other)) for other in feasible))


def test_the_oracle_leaves_the_hull_where_the_budget_falls_between_its_corners() -> None:
    """Two images whose PSNR jumps only at 4 tokens: at a mean of 2 the best is one image at 4 and the
    other at 0 — a point no single slope picks, since both images' hulls are the same line."""
    counts, psnrs = [[0, 2, 4], [0, 2, 4]], [[10.0, 10.0, 20.0], [10.0, 10.0, 20.0]]
    assert sorted(oracle_allocation(counts, psnrs, 2.0)) == [0, 2]


def test_the_oracle_takes_fractional_costs_and_stays_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    rates, psnrs = [[0.0, 0.031, 0.062], [0.0, 0.029, 0.058]], [[16.0, 19.0, 21.0], [17.0, 18.0, 18.5]]
    assert oracle_allocation(rates, psnrs, 0.031, unit=1e-4) == [2, 0]  # 0.062 + 0 ≤ 2 · 0.031
    assert oracle_allocation(rates, psnrs, 0.0309, unit=1e-4) == [1, 1]  # just under: no longer fits
    monkeypatch.setattr(allocation, "MAX_ALLOCATION_CELLS", 10)  # a coarser unit: within the budget still
    choice = allocation.oracle_allocation(rates, psnrs, 0.031, unit=1e-4)
    assert np.mean([r[j] for r, j in zip(rates, choice)]) <= 0.031


def test_complexity_grows_with_detail() -> None:
    flat = torch.full((3, 32, 32), 0.5)
    noisy = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = image_complexity(flat), image_complexity(noisy)
    assert a["mean_gradient"] == 0.0 and b["mean_gradient"] > 0.1 and b["jpeg_bpp"] > 1.5 * a["jpeg_bpp"]


def test_spearman_and_paired() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2], [3, 4]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert paired([2.0, 1.0, 3.0], [1.0, 1.0, 4.0]) == {"mean": 0.0, "median": 0.0, "wins": 1, "losses": 1,
                                                      "ties": 1, "images": 3}


def test_only_methods_that_allocate_are_correlated_with_content() -> None:
    from tatok_core.workflows.allocation import allocates, allocation_report
    from tatok_core.workflows.rate_distortion import RDPoint

    noise = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(1))
    images = [torch.full((3, 16, 16), 0.5), 0.5 + 0.2 * noise[:, :16], noise]  # flat, faint, busy
    def point(name: str, tokens: list[float], n: list[int]) -> RDPoint:
        return RDPoint(name, "s", 0, 0, 0, matched="tau=0.5", per_image={
            "tokens": tokens, "fraction": [t / m for t, m in zip(tokens, n)], "psnr": [20.0, 21.0, 22.0]})
    n = [16, 24, 36]
    report = allocation_report([point("topk", [8, 8, 8], n), point("shared-theta", [2, 10, 20], n)], images)
    assert [r["filter"] for r in report["spearman"]] == ["shared-theta"] and not allocates([8, 8, 8])
    assert report["spearman"][0]["mean_gradient"] == pytest.approx(1.0)  # more detail, larger share kept
    assert report["paired"][0]["psnr_wins"] == 0 and report["paired"][0]["psnr_ties"] == 3
