"""The shipped default tokenizer at its operating point, on held-out *whole* photos (never trained on).

Floors sit a little under the numbers measured when the model was shipped (docs/default-tokenizer.md),
so a regression in any component, in the weights file, in the fill stage or in the test-time
refinement the default encodes with (``pipeline.refine_steps = 10``) fails here. The built-in held-out
photos are used because they exist on every install (the Debian photos may not). The sets are the
filter's own (``search_sweeps=0``): these floors hold the ranking and the allocation, which the set search
would blur by choosing the members again at each count; tests/test_set_search.py holds the search.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.operating_point import flat_mean_colour, hole_errors, thumbnail_at_bits
from tatok_core.contract.bitrate import token_bits
from tatok_core.contract.selection import Selection
from tatok_core.io.images import fit_longest_side
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer
from tatok_core.workflows.analysis import Analysed
from tatok_core.workflows.compression import CODING_PRIOR
from tatok_core.workflows.data import HELDOUT_PHOTOS, ImageSource
from tatok_core.workflows.metrics import psnr
from tatok_core.workflows.generation import load_prior
from tatok_core.workflows.rate_control import calibrate_bits
from tatok_plugins import PRETRAINED_DIR

SIDE = 256  # longest side of the whole photos
# dB, every patch token kept (23.99 measured with the shipped refinement; 23.27 with the encoder's tokens, which
# this floor refuses; tatok-small8-anchored 23.25; the 16-px tatok-small16-anchored 20.37 at 0.28× the bits)
PSNR_ALL_FLOOR = 23.7
BPP_ALL_CEILING = 0.25  # the operating point: every token kept, globals and codes counted
# dB the globals-only decode may trail an 8-bit thumbnail in the globals' bits (0.24 measured, refined; 0.53 with
# the encoder's globals; tatok-small8-anchored 0.78; the 16-px tatok-small16-anchored 1.75; tatok-small16-long,
# whose globals are not anchored, 2.47; tatok-small16, without the canvas, 3.24)
GLOBALS_THUMBNAIL_MARGIN = 0.5
# dB the globals-only decode must beat each photo's flat mean colour by (1.66 measured; tatok-small8-anchored 1.41;
# tatok-small16-anchored 0.45;
# tatok-small16-long −0.28: its globals said less than three numbers)
GLOBALS_OVER_MEAN_COLOUR = 1.2
# dB one shared θ gains over a per-photo top-k at the same mean count (0.76 / 0.10 measured with the shipped
# refinement, which lifts top-k a little more; 0.85 / 0.12 with the encoder's tokens: the bar of 0.3 is
# missed at 50 % (0.16 on the 14 held-out photos; 0.19 unrefined), so that floor only says the shared θ does not
# lose; top-k follows the same coverage order, which made it 1.5 dB better at 25 % than worst-first: under
# worst-first tatok-small8-anchored gained 1.44 / 0.06, tatok-small16-anchored 0.97 / 0.28, tatok-small16-long
# 0.68 / 0.38; the `residual` bits of tatok-small's first spec gained −0.09 / 0.00 on the 14 held-out photos)
ALLOCATION_GAIN_FLOOR = {0.25: 0.6, 0.5: 0.0}
# dB the coverage order gains over worst-first on the same weights, one θ each at 25 % (0.87 measured; on the 12
# training photos 21.14 against 20.53 dB, docs/default-tokenizer.md)
COVERAGE_GAIN_FLOOR = 0.6
# dB the fill of random holes may trail the kept-neighbour average: none, the target (it leads, by
# 0.68 measured; tatok-small8-anchored 0.64; tatok-small16-anchored 0.42; the 8-px tatok-small trailed by 0.71, and by 2.75 without fill_spread)
HOLES_MARGIN = 0.0
# Bits per patch code the shipped `context` prior (fitted on the training photos' refined tokens) codes every held-out
# token with: 8.78 measured on these 5 photos with the shipped refinement (8.89 under the previous prior, fitted on the
# encoder's codes; 8.19 for the encoder's codes under that one), against the counted log2 12 800 = 13.64 (8.48 on the
# 14 held-out photos of builtin:photos:extended)
CODED_BITS_PER_CODE_CEILING = 9.0
# the default's own set (θ) coded, as a share of its counted bits, on every photo (0.40–0.79 measured, refined;
# 0.47–0.82 under the previous prior)
CODED_SHARE_CEILING = 0.85
# The default's own set refined for its coder too (`refine_bpp_worth`, with its 20 steps at 0.02, as `tatok compress`
# refines it) against refined for pixels only (10 steps at 0.005), on these photos: the prior's bits at least this
# share lower on average (16 % measured: 9.4–16 % on four photos, 29 % on the gravel's globals), for at most this mean
# loss of PSNR (−0.02 dB measured, a gain; on the 14 held-out photos files −12 % for −0.01 dB, docs/results.md)
RATE_AWARE_BITS_SAVED_FLOOR = 0.12
RATE_AWARE_PSNR_LOSS_CEILING = 0.1


@pytest.fixture(scope="module")
def model() -> Tokenizer:
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    source = ImageSource("builtin:photos:heldout")
    assert tuple(source.names) == HELDOUT_PHOTOS
    return [fit_longest_side(image, SIDE)[None] for image in source.images]  # each (1, C, H, W)


@pytest.fixture(scope="module")
def analysed(model: Tokenizer, photos: list[torch.Tensor]) -> list[Analysed]:
    """Each photo encoded once (the `chain` estimator decodes it at its probes)."""
    with torch.no_grad():
        return [Analysed.of(model, photo, search_sweeps=0) for photo in photos]


def test_the_default_is_the_shipped_operating_point_model(model: Tokenizer) -> None:
    assert model.name == DEFAULT_PRETRAINED
    assert 8 <= model.patch_size <= 16 and 2**10 <= model.quantizer.codebook_size <= 2**16


@torch.no_grad()
def test_every_token_kept_reaches_its_floor_within_the_rate(model: Tokenizer, photos: list[torch.Tensor]) -> None:
    scores, rates = [], []
    for photo in photos:
        tokens = model.encode(photo, filter="all")
        scores.append(float(psnr(model.decode(tokens), photo)))
        cost = token_bits(tokens.lengths, tokens.num_patches, model.num_global, model.quantizer.codebook_size,
                          tuple(photo.shape[2:]))
        rates.append(float(cost.bpp()))
    assert sum(scores) / len(scores) >= PSNR_ALL_FLOOR, scores
    assert max(rates) <= BPP_ALL_CEILING, rates


@torch.no_grad()
def test_the_globals_alone_decode_against_a_thumbnail_in_their_bits(model: Tokenizer, photos: list[torch.Tensor],
                                                                    analysed: list[Analysed]) -> None:
    """No patch token kept. The issue asks for a recognisable coarse picture: the bar is the 8-bit
    thumbnail the globals' bits would buy (benchmarks/operating_point.py). The shipped model is still
    under it (docs/results.md says so); this floor keeps it from getting worse. And it must say more
    than each photo's flat mean colour, which the globals of the default before anchoring did not."""
    gaps, over_mean = [], []
    for photo, encoded in zip(photos, analysed):
        tokens = encoded.tokens(Selection.from_mask(torch.zeros(encoded.patch_codes.shape, dtype=torch.bool)))
        bits = model.num_global * math.log2(model.quantizer.codebook_size)
        alone = float(psnr(model.decode(tokens), photo))
        gaps.append(thumbnail_at_bits(photo[0], bits)["psnr"] - alone)
        over_mean.append(alone - flat_mean_colour(photo[0])["psnr"])
    assert sum(gaps) / len(gaps) <= GLOBALS_THUMBNAIL_MARGIN, gaps
    assert sum(over_mean) / len(over_mean) >= GLOBALS_OVER_MEAN_COLOUR, over_mean


@torch.no_grad()
def test_dropped_patches_are_filled_about_as_well_as_their_kept_neighbours(model: Tokenizer,
                                                                           photos: list[torch.Tensor],
                                                                           analysed: list[Analysed]) -> None:
    generator = torch.Generator().manual_seed(0)
    decoder_db, neighbour_db = [], []
    for photo, encoded in zip(photos, analysed):
        keep = torch.rand(encoded.patch_codes.shape, generator=generator) < 0.5  # (1, N) random holes
        tokens = encoded.tokens(Selection.from_mask(keep))
        holes = hole_errors(photo[0], model.decode(tokens)[0], keep[0], encoded.grid, model.patch_size)
        decoder_db.append(holes["decoder"])
        neighbour_db.append(holes["neighbours"])
    gap = sum(neighbour_db) / len(photos) - sum(decoder_db) / len(photos)
    assert gap <= HOLES_MARGIN, (decoder_db, neighbour_db)


@torch.no_grad()
def test_the_model_filter_adapts_the_count_to_the_photo(model: Tokenizer, photos: list[torch.Tensor]) -> None:
    fractions = []
    for photo in photos:
        tokens = model.encode(photo, search_sweeps=0)  # the search keeps the count
        fractions.append(float(tokens.lengths.double().mean()) / tokens.num_patches)
    # 0.0 (gravel) … 0.40 at shipping (cat 0.40, cup 0.40, rocket 0.30, flower 0.35)
    assert max(fractions) < 0.7 and max(fractions) - min(fractions) > 0.05, fractions


def shared_theta_psnr(model: Tokenizer, photos: list[torch.Tensor], analysed: list[Analysed],
                      fraction: float) -> list[float]:
    """Per photo PSNR with ONE θ calibrated to keep ``fraction`` of the tokens on average over the photos
    (what `tatok encode --budget` does)."""
    bits = [encoded.bits for encoded in analysed]
    budget = fraction * sum(b.shape[1] for b in bits) / len(bits)
    own = model.token_filter()
    theta = calibrate_bits(own, bits, budget, tol=1.0).threshold
    return [float(psnr(model.decode(encoded.tokens(own.select(encoded.bits, theta))), photo))
            for photo, encoded in zip(photos, analysed)]


def test_no_budget_leaves_a_photo_under_its_globals_only_picture(tmp_path) -> None:
    """A few kept tokens can decode worse than the globals alone until enough are kept (a dip). A budget
    calibrated over a set (`tatok encode --budget`, to within half a token) would stop one photo inside
    its dip whenever that is the step nearest the budget: before dips held one value, 4 of these 28
    budgets left a photo 1.8–6.0 dB under its globals-only picture (benchmarks/budget_sweep.py, which
    uses the encoder's tokens so the sweep stays quick)."""
    from benchmarks.budget_sweep import main

    record = main(["--data", "builtin:photos:heldout", "--side", str(SIDE), "--out", str(tmp_path)])
    assert len(record["budgets"]) == 28 and record["photos"] == list(HELDOUT_PHOTOS)
    assert [b["under_globals_only"] for b in record["budgets"]] == [{}] * 28
    assert all(abs(b["fraction"] - b["percent"] / 100) < 0.02 for b in record["budgets"])  # the budgets were met


@torch.no_grad()
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_one_theta_for_the_set_beats_a_fixed_count_per_photo(model: Tokenizer, photos: list[torch.Tensor],
                                                             analysed: list[Analysed], fraction: float) -> None:
    """The shipped rule at a budget: one θ for the photos against k = f·N per photo ranked by the same
    bits — the same mean count, only the allocation differs."""
    shared = shared_theta_psnr(model, photos, analysed, fraction)
    fixed = []
    for photo, encoded in zip(photos, analysed):
        k = round(fraction * encoded.bits.shape[1])
        topk = model.baseline_filter("top-k", k=k, min_keep=0, max_keep=-1)
        fixed.append(float(psnr(model.decode(encoded.tokens(topk.select(encoded.bits))), photo)))
    gain = (sum(shared) - sum(fixed)) / len(photos)
    assert gain >= ALLOCATION_GAIN_FLOOR[fraction], (shared, fixed)


@torch.no_grad()
def test_the_coverage_ranking_beats_worst_first_at_a_quarter_of_the_tokens(model: Tokenizer,
                                                                          photos: list[torch.Tensor],
                                                                          analysed: list[Analysed]) -> None:
    """The same weights ranked worst-first (``coverage = 0``: each slice takes the patches the decode so
    far misses most) against the shipped coverage order, one θ each at 25 % of the tokens."""
    assert model.spec.entropy.options["coverage"] > 0
    worst_first = Tokenizer(model.spec.updated({}, {"entropy.coverage": 0})).eval()
    worst_first.load_state_dict(model.state_dict())
    plain = [Analysed.of(worst_first, photo, search_sweeps=0) for photo in photos]
    covered = shared_theta_psnr(model, photos, analysed, 0.25)
    piled = shared_theta_psnr(worst_first, photos, plain, 0.25)
    gain = (sum(covered) - sum(piled)) / len(photos)
    assert gain >= COVERAGE_GAIN_FLOOR, (covered, piled)


@torch.no_grad()
def test_the_shipped_prior_codes_the_tokens_under_their_counted_rate(model: Tokenizer, analysed: list[Analysed]) -> None:
    """The prior that ships with the default codes every token and the default's own set of the held-out
    photos in fewer bits than the plain count: a code length that exists (tests/test_context_prior.py)."""
    prior = load_prior(PRETRAINED_DIR / DEFAULT_PRETRAINED / CODING_PRIOR)
    assert prior.facts_in.values["spec_digest"] == model.spec.digest()
    code_bits = codes = 0.0
    for photo in analysed:
        every = photo.tokens(model.token_filter("all").select(photo.bits))
        code_bits -= float(prior.log_likelihood_parts(every)["codes"].sum()) / math.log(2)
        codes += every.codes.numel()
        own = photo.tokens(model.token_filter().select(photo.bits))
        counted = token_bits(own.lengths, own.num_patches, model.num_global, model.quantizer.codebook_size,
                             photo.image_size).total
        coded = -prior.log_likelihood(own).double() / math.log(2)
        assert float(coded[0]) < CODED_SHARE_CEILING * float(counted[0]), (float(coded[0]), float(counted[0]))
    assert code_bits / codes < CODED_BITS_PER_CODE_CEILING


@torch.no_grad()
def test_refining_for_the_coder_makes_files_smaller_for_about_the_same_picture(
        model: Tokenizer, photos: list[torch.Tensor], analysed: list[Analysed]) -> None:
    prior = load_prior(PRETRAINED_DIR / DEFAULT_PRETRAINED / CODING_PRIOR)
    assert model.refine_bpp_worth > 0  # the default ships rate-aware compression
    rated = model.with_coding_prior(prior)
    saved, lost = [], []
    for photo, pixels_only in zip(photos, analysed):
        keep = model.token_filter().select(pixels_only.bits)
        plain = pixels_only.tokens(keep)
        for_coder = Analysed.of(rated, photo, search_sweeps=0).tokens(keep)  # as `tatok compress`: no set search
        assert torch.equal(for_coder.positions, plain.positions)  # the same set: only which codes say it
        bits = [float(-prior.log_likelihood(t)[0]) for t in (plain, for_coder)]
        saved.append(1 - bits[1] / bits[0])
        lost.append(float(psnr(model.decode(plain), photo) - psnr(model.decode(for_coder), photo)))
    assert sum(saved) / len(saved) >= RATE_AWARE_BITS_SAVED_FLOOR, saved
    assert sum(lost) / len(lost) <= RATE_AWARE_PSNR_LOSS_CEILING, lost
