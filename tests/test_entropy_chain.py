"""The decoded chain-rule estimator: bits a token adds given the globals and the tokens ranked above it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tatok_core.contract.interfaces import EntropyContext
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_plugins.entropy_chain import DecodedChainEntropy, concave_slopes, coverage_kernel, coverage_order
from tatok_plugins.filters import DynamicTokenFilter
from tests.helpers import small_spec

PATCH = 2
GRID = (4, 4)  # 16 patch tokens of 2×2 pixels


def patch_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, N) → (B, 1, H, W) pixel mask of the kept patches."""
    return keep.reshape(-1, 1, *GRID).float().repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)


def context_for(images: torch.Tensor, base: torch.Tensor, decode) -> EntropyContext:
    batch, n = images.shape[0], GRID[0] * GRID[1]
    rest = (torch.zeros(batch, 2, 4), torch.zeros(batch, 2), torch.zeros(batch, n, 4), torch.zeros(batch, n))
    return EntropyContext(images, GRID, *rest, base, decode)


def exact_where_kept(images: torch.Tensor, base: torch.Tensor, floor: float = 0.01):
    """A decoder that restores kept patches (up to a small error everywhere) and leaves the globals-only picture
    elsewhere, so D(k) is known in closed form."""
    def decode(keep: torch.Tensor) -> torch.Tensor:
        mask = patch_mask(keep)
        return mask * images + (1 - mask) * base + floor
    return decode


def image_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.fixture
def scene() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    base = images + 0.3 * torch.randn(2, 3, 8, 8) * torch.rand(2, 1, 1, 1)  # each image missed by another amount
    return images, base


@pytest.mark.parametrize("coverage", [0, 1])
def test_bits_add_up_to_the_measured_gain_from_globals_only_to_every_token(scene, coverage: int) -> None:
    images, base = scene
    decode = exact_where_kept(images, base)
    estimator = DecodedChainEntropy(probes=(0.25, 0.5), coverage=coverage, patch_size=PATCH).eval()
    bits = estimator(context_for(images, base, decode)).bits  # (2, 16)
    everything = decode(torch.ones(2, 16, dtype=torch.bool))
    expected = 0.5 * 3 * 8 * 8 * torch.log2(image_error(base, images) / image_error(everything, images))  # (2,)
    torch.testing.assert_close(bits.sum(1), expected, rtol=1e-3, atol=0)  # the 10⁻³ tilt is all that moves it


def test_a_token_the_decoder_infers_from_the_kept_ones_moves_down_the_ranking() -> None:
    """Patch 0 misses most under the globals alone, patch 1 next; once patch 0 is kept the decoder also
    gets patch 1 right (it infers it). Reranking by what the decode so far misses puts patch 1 last;
    ranking by the globals-only error alone would keep it second."""
    images = torch.zeros(1, 3, 8, 8)
    base = torch.full_like(images, 0.1)
    base[..., :2, :2], base[..., :2, 2:4] = 0.9, 0.8  # patch 0 worst, patch 1 second
    floor = 0.01

    def infers_patch_1(keep: torch.Tensor) -> torch.Tensor:
        decoded = patch_mask(keep) * images + (1 - patch_mask(keep)) * base + floor
        if bool(keep[0, 0]):
            decoded[..., :2, 2:4] = images[..., :2, 2:4] + floor
        return decoded

    context = context_for(images, base, infers_patch_1)
    reranked = DecodedChainEntropy(probes=(1 / 16, 0.5), patch_size=PATCH).eval()(context).bits[0]
    assert int(reranked.argmax()) == 0 and int(reranked.argmin()) == 1
    static = DecodedChainEntropy(probes=(1 / 16, 0.5), rerank=False, patch_size=PATCH).eval()(context).bits[0]
    assert static.argsort(descending=True)[:2].tolist() == [0, 1]


def test_bits_never_grow_down_the_ranking(scene) -> None:
    images, base = scene
    estimator = DecodedChainEntropy(probes=(0.125, 0.25, 0.5, 0.75), rerank=False, patch_size=PATCH).eval()
    bits = estimator(context_for(images, base, exact_where_kept(images, base))).bits
    residual = ((images - base) ** 2).reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1).mean(-1)
    for b in range(2):  # without reranking, the ranking is the globals-only error's
        ranked = bits[b][residual[b].argsort(descending=True, stable=True)]
        assert bool((ranked[1:] < ranked[:-1]).all()), ranked  # strictly: every rule keeps a prefix


@pytest.mark.parametrize("coverage", [0, 1])
def test_every_rule_keeps_a_prefix_of_the_ranking(scene, coverage: int) -> None:
    images, base = scene
    estimator = DecodedChainEntropy(probes=(0.25, 0.5), coverage=coverage, patch_size=PATCH).eval()
    bits = estimator(context_for(images, base, exact_where_kept(images, base))).bits
    order = bits.argsort(dim=1, descending=True)
    for rule, values in (("theta", bits.flatten().tolist()), ("tau", [0.1, 0.3, 0.6, 0.9])):
        for threshold in values:
            keep = DynamicTokenFilter(mode=rule, min_keep=0).select(bits, threshold).keep
            ranked = keep.gather(1, order)  # (2, 16) in ranking order: kept ones first, then dropped ones
            assert bool((ranked[:, 1:] <= ranked[:, :-1]).all())


def test_a_decoder_that_gets_worse_with_more_tokens_yields_no_negative_bits(scene) -> None:
    images, base = scene
    helpful = exact_where_kept(images, base)

    def erratic(keep: torch.Tensor) -> torch.Tensor:  # every token kept is worse than the globals alone
        return helpful(keep) + (1.0 if bool(keep.all()) else 0.0)

    estimator = DecodedChainEntropy(probes=(0.25, 0.5, 0.75), patch_size=PATCH).eval()
    bits = estimator(context_for(images, base, erratic)).bits
    assert bool((bits >= 0).all()) and bool(torch.isfinite(bits).all())
    with_helpful = estimator(context_for(images, base, helpful)).bits
    assert float(bits.sum()) < float(with_helpful.sum())  # the last slice's loss is not counted as gain


@pytest.mark.parametrize("coverage", [0, 1])
def test_a_threshold_never_stops_inside_a_dip(scene, coverage: int) -> None:
    """A few kept tokens can decode *worse* than the globals alone (the decoder switches its canvas off
    near them) until enough are kept. A θ stopping inside such a run would keep the worst set measured: the
    run — the slices that end worse than the best decode before them, through the slice that recovers —
    holds one value, so every θ keeps all of it or none (a budget calibrated over many images cannot
    split it either); outside runs the bits still fall strictly down the ranking."""
    images, base = scene
    helpful = exact_where_kept(images, base)

    def dips(keep: torch.Tensor) -> torch.Tensor:  # 1 … 7 tokens: worse than globals only; 8: recovered
        kept = keep.sum(1)  # (B,)
        return helpful(keep) + 0.5 * ((kept > 0) & (kept < 8)).to(images.dtype)[:, None, None, None]

    estimator = DecodedChainEntropy(probes=(0.25, 0.5, 0.75), coverage=coverage, patch_size=PATCH).eval()
    bits = estimator(context_for(images, base, dips)).bits  # (2, 16); probe counts 0, 4, 8, 12, 16
    for row in bits:
        ranked = row.sort(descending=True).values
        assert bool((ranked[:8] == ranked[0]).all()) and bool((ranked[8:] < ranked[7:-1]).all()), ranked
        for theta in [0.0, *row.tolist()]:
            kept = int((row > theta).sum())
            assert kept == 0 or kept >= 8, (theta, kept)
    everything = helpful(torch.ones(2, 16, dtype=torch.bool))
    expected = 0.5 * 3 * 8 * 8 * torch.log2(image_error(base, images) / image_error(everything, images))  # (2,)
    torch.testing.assert_close(bits.sum(1), expected, rtol=1e-3, atol=0)  # the gain is counted once, after the dip


def test_concave_slopes_match_pool_adjacent_violators() -> None:
    def pava(values: list[float], weights: list[float]) -> list[float]:
        blocks: list[list[float]] = []
        for v, w in zip(values, weights):
            blocks.append([v, w, 1])
            while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
                (v2, w2, m2), (v1, w1, m1) = blocks.pop(), blocks.pop()
                blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, m1 + m2])
        return [v for v, _, m in blocks for _ in range(int(m))]

    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        slices = int(torch.randint(1, 8, (), generator=generator))
        cuts = sorted((torch.randperm(30, generator=generator)[: slices - 1] + 1).tolist())
        counts = torch.tensor([0, *cuts, 31])
        slice_bits = torch.rand(2, slices, generator=generator, dtype=torch.float64) * 10
        sizes = (counts[1:] - counts[:-1]).double()
        got = concave_slopes(slice_bits, counts)
        for b in range(2):
            expected = pava((slice_bits[b] / sizes).tolist(), sizes.tolist())
            torch.testing.assert_close(got[b], torch.tensor(expected, dtype=torch.float64))


def test_training_ranks_by_the_globals_only_error_without_decoding(scene) -> None:
    images, base = scene

    def never(keep: torch.Tensor) -> torch.Tensor:
        raise AssertionError("training must not pay for probe decodes")

    estimator = DecodedChainEntropy(patch_size=PATCH).train()
    bits = estimator(context_for(images, base, never)).bits
    residual = ((images - base) ** 2).reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1).mean(-1)
    torch.testing.assert_close(bits, residual)


def test_coverage_spreads_the_first_tokens_over_the_error_instead_of_piling_them_on_the_worst() -> None:
    """A 2×2 blob of error 1.0 and one lone patch of 0.9: worst-first spends the first four tokens on the
    blob; once one blob token covers its neighbours (decay 0.8), the lone patch is worth more than the rest
    of the blob."""
    grid = (8, 8)
    missed = torch.zeros(1, 64)
    missed[0, [0, 1, 8, 9]] = 1.0  # the blob, top left
    missed[0, 63] = 0.9  # the lone patch, bottom right
    kept = torch.zeros(1, 64, dtype=torch.bool)
    worst_first = coverage_order(missed, kept, 4, grid, coverage_kernel(0, 0.8))
    assert sorted(worst_first[0].tolist()) == [0, 1, 8, 9]
    spread = coverage_order(missed, kept, 2, grid, coverage_kernel(1, 0.8))
    assert spread[0, 0].item() in (0, 1, 8, 9) and spread[0, 1].item() == 63


def test_coverage_on_an_even_error_keeps_the_first_tokens_apart() -> None:
    grid = (8, 8)
    chosen = coverage_order(torch.ones(1, 64), torch.zeros(1, 64, dtype=torch.bool), 4, grid, coverage_kernel(1, 1.0))
    rows, cols = chosen[0] // 8, chosen[0] % 8
    apart = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs())  # (4, 4)
    assert int(apart[~torch.eye(4, dtype=torch.bool)].min()) >= 2  # no two of the first four are neighbours


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rings=st.integers(0, 2), decay=st.floats(0.05, 1.0), held=st.floats(0.0, 0.9))
def test_coverage_order_ranks_every_position_not_yet_kept_exactly_once(seed: int, rings: int, decay: float,
                                                                        held: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    grid = (5, 7)
    missed = torch.rand(2, 35, generator=generator) ** 3
    kept = torch.rand(2, 35, generator=generator) < held
    count = int((~kept).sum(1).min())
    chosen = coverage_order(missed, kept, count, grid, coverage_kernel(rings, decay))  # (2, count)
    for b in range(2):
        picked = chosen[b].tolist()
        assert len(set(picked)) == count and not kept[b, picked].any()


def greedy_by_recounting(missed: torch.Tensor, kept: torch.Tensor, count: int, grid: tuple[int, int],
                         rings: int, decay: float) -> tuple[list[int], list[float]]:
    """The coverage order of one image and the worth of each choice, every worth recounted from scratch at
    every step (loops)."""
    height, width = grid
    uncovered = [0.0 if k else float(m) for m, k in zip(missed.tolist(), kept.tolist())]
    taken = list(kept.tolist())

    def weight(i: int, j: int) -> float:
        ring = max(abs(i // width - j // width), abs(i % width - j % width))
        return decay**ring if ring <= rings else 0.0

    order, worths = [], []
    for _ in range(count):
        worth = [-math.inf if taken[i] else sum(weight(i, j) * uncovered[j] for j in range(height * width))
                 for i in range(height * width)]
        best = max(range(height * width), key=lambda i: (worth[i], -i))  # the first of equal worths
        order.append(best)
        worths.append(worth[best])
        taken[best] = True
        uncovered = [u * (1 - weight(best, j)) for j, u in enumerate(uncovered)]
    return order, worths


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), rings=st.integers(1, 2), decay=st.floats(0.1, 0.9))
def test_coverage_order_updates_equal_recounting_every_worth(seed: int, rings: int, decay: float) -> None:
    """Below decay 1 no worth is left exactly equal to another by covering (at 1 a covered neighbourhood
    is exactly 0, and equal sums then tie up to rounding, which the two ways of adding break apart)."""
    generator = torch.Generator().manual_seed(seed)
    grid = (4, 6)
    missed = torch.rand(2, 24, generator=generator, dtype=torch.float64)
    kept = torch.rand(2, 24, generator=generator) < 0.25
    count = int((~kept).sum(1).min())
    chosen = coverage_order(missed, kept, count, grid, coverage_kernel(rings, decay).double())
    for b in range(2):
        expected, worths = greedy_by_recounting(missed[b], kept[b], count, grid, rings, decay)
        telling = sum(w > 1e-9 for w in worths)  # after these only positions worth nothing are left: any order
        assert chosen[b, :telling].tolist() == expected[:telling]
        assert sorted(chosen[b].tolist()) == sorted(expected)


def test_training_deals_the_globals_only_error_in_the_coverage_order(scene) -> None:
    images, base = scene

    def never(keep: torch.Tensor) -> torch.Tensor:
        raise AssertionError("training must not pay for probe decodes")

    estimator = DecodedChainEntropy(coverage=1, coverage_decay=0.5, patch_size=PATCH).train()
    bits = estimator(context_for(images, base, never)).bits  # (2, 16)
    residual = ((images - base) ** 2).reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1).mean(-1)
    torch.testing.assert_close(bits.sort(dim=1).values, residual.sort(dim=1).values)  # the same values …
    expected = coverage_order(residual, torch.zeros(2, 16, dtype=torch.bool), 16, GRID, coverage_kernel(1, 0.5))
    assert torch.equal(bits.argsort(dim=1, descending=True), expected)  # … in the coverage order
    assert not torch.equal(expected, residual.argsort(dim=1, descending=True))  # which is not the worst-first one


def test_bad_options_and_missing_context_are_named() -> None:
    with pytest.raises(ValueError, match="coverage ≥ 0 rings .a whole number. and 0 < coverage_decay ≤ 1"):
        DecodedChainEntropy(coverage=-1, patch_size=PATCH)
    with pytest.raises(ValueError, match="coverage ≥ 0 rings .a whole number. and 0 < coverage_decay ≤ 1"):
        DecodedChainEntropy(coverage=1, coverage_decay=0.0, patch_size=PATCH)
    with pytest.raises(ValueError, match="coverage ≥ 0 rings .a whole number."):
        DecodedChainEntropy(coverage=1.5, patch_size=PATCH)
    with pytest.raises(ValueError, match="probes must be increasing fractions"):
        DecodedChainEntropy(probes=(0.5, 0.25), patch_size=PATCH)
    with pytest.raises(ValueError, match="probes must be increasing fractions"):
        DecodedChainEntropy(probes=(0.0, 0.5), patch_size=PATCH)
    images = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="needs the globals-only reconstruction and the decoder"):
        DecodedChainEntropy(patch_size=PATCH).eval()(context_for(images, images, None))


def test_counts_merge_probes_that_round_to_the_same_count() -> None:
    estimator = DecodedChainEntropy(probes=(0.1, 0.12, 0.5), patch_size=PATCH)
    assert estimator.counts(10).tolist() == [0, 1, 5, 10]
    assert estimator.counts(3).tolist() == [0, 2, 3]


@torch.no_grad()
def test_the_tokenizer_hands_its_decoder_to_the_estimator() -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_spec(entropy="chain", decoder="packed")).eval()
    images = torch.rand(2, 3, 16, 16)
    analysis = model.analyse(images)
    ranked, order = analysis.entropy.bits.sort(dim=1, descending=True)  # (2, 16) the ranking the bits follow
    errors = [image_error(analysis.base_reconstruction, images)]
    for count in model.entropy.counts(16)[1:].tolist():  # the model's own decoder at every probe
        keep = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, order[:, :count], True)
        error = image_error(model.decoder(analysis.globals_.vectors, analysis.patches.vectors, keep, analysis.grid),
                            images)
        # inside a dip's tie the set is not the estimator's; a dip is never its best probe anyway
        settled = torch.ones(2, dtype=torch.bool) if count == 16 else ranked[:, count - 1] > ranked[:, count]
        errors.append(torch.where(settled, error, torch.inf))
    best = torch.stack(errors, 1).amin(1)  # (2,) the non-increasing D ends at the best probe
    expected = 0.5 * images[0].numel() * torch.log2(errors[0] / best)
    torch.testing.assert_close(analysis.entropy.bits.sum(1), expected, rtol=1e-3, atol=1e-3)
    assert math.isfinite(float(analysis.entropy.bits.sum()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
@torch.no_grad()
def test_chain_bits_on_cuda_match_the_cpu() -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_spec(entropy="chain", decoder="packed")).eval()
    images = torch.rand(2, 3, 16, 16)
    on_cpu = model.analyse(images).entropy.bits
    on_cuda = model.cuda().analyse(images.cuda()).entropy.bits.cpu()
    # the greedy ranking may swap near-ties between devices; the measured chain's total may not move
    torch.testing.assert_close(on_cuda.sum(1), on_cpu.sum(1), rtol=1e-3, atol=1e-3)
