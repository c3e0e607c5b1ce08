"""The operating-point harness (benchmarks/operating_point.py): honest bit counts, the shared threshold's
budget, the neighbour baseline of the holes measure, and a quick end-to-end run on a tiny untrained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.operating_point import (
    CODEC_SCALES,
    bootstrap_interval,
    codec_at,
    codec_bpp_for,
    codec_curve,
    flat_mean_colour,
    hole_errors,
    main,
    rate_bits,
    shared_threshold,
    side_information_bits,
    thumbnail_at_bits,
    threshold_selection,
)
from tatok_core.contract.spec import PipelineSpec
from tatok_core.pipeline.tokenizer import Tokenizer


def test_side_information_counts_the_number_and_the_subset() -> None:
    assert side_information_bits(2, 4) == pytest.approx(math.log2(5) + math.log2(6))
    assert side_information_bits(0, 4) == pytest.approx(math.log2(5))  # C(4, 0) = 1: only k
    assert side_information_bits(4, 4) == pytest.approx(math.log2(5))
    assert side_information_bits(3, 10) == pytest.approx(math.log2(11) + math.log2(120))
    with pytest.raises(ValueError, match="kept must lie in"):
        side_information_bits(5, 4)


def test_rate_bits_counts_globals_kept_codes_and_side_information() -> None:
    # M = 2 globals, k = 2 of N = 4 kept, codebook 256 (8 bits a code)
    assert rate_bits(2, 2, 4, 256) == pytest.approx(4 * 8 + math.log2(5) + math.log2(6))
    assert rate_bits(2, 4, 4, 256, keeps_all=True) == pytest.approx(6 * 8)  # nothing to say when all are kept
    assert rate_bits(32, 0, 256, 12800) == pytest.approx(32 * math.log2(12800) + math.log2(257))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_shared_threshold_hits_the_mean_count(fraction: float) -> None:
    generator = torch.Generator().manual_seed(0)
    bits = [torch.rand(1, n, generator=generator) * 20 for n in (48, 70, 35)]  # photos of different sizes
    target = fraction * sum(b.shape[1] for b in bits) / len(bits)
    theta, mean = shared_threshold(bits, target)
    kept = [int(threshold_selection(b, theta).lengths[0]) for b in bits]
    assert sum(kept) / len(kept) == pytest.approx(mean)
    assert abs(mean - target) <= 1
    # one θ for the set: an image with more high-bit tokens keeps more of them
    assert all((b[threshold_selection(b, theta).keep] > theta).all() for b in bits)


def test_shared_threshold_with_ties_gets_as_close_as_ties_allow() -> None:
    bits = [torch.tensor([[1.0, 1.0, 1.0, 5.0]]), torch.tensor([[1.0, 1.0, 2.0, 2.0]])]
    theta, mean = shared_threshold(bits, 2.0)  # 4 of the pooled 8: only 3 (> 1) or 8 (everything) exist
    assert mean == pytest.approx(1.5) and 1.0 <= theta < 2.0


def test_hole_errors_compare_the_decoder_with_the_kept_neighbours() -> None:
    """A 2×2 grid of flat 2×2 patches; the top-left one is dropped, its kept neighbours are the top-right
    (0.2) and the bottom-left (0.6) one: the neighbour average is exactly 0.4, the true value."""
    p, grid = 2, (2, 2)
    original = torch.zeros(3, 4, 4)
    for (r, c), value in {(0, 0): 0.4, (0, 1): 0.2, (1, 0): 0.6, (1, 1): 0.9}.items():
        original[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = value
    decoded = original.clone()
    decoded[:, :2, :2] = 0.3  # the decoder's fill is off by 0.1
    keep = torch.tensor([False, True, True, True])
    errors = hole_errors(original, decoded, keep, grid, p)
    assert errors["decoder"] == pytest.approx(20.0, abs=1e-4)  # 10·log10(1 / 0.1²)
    assert errors["neighbours"] >= 99.0 and errors["neighbour_colour"] >= 99.0
    assert errors["scored_patches"] == errors["dropped_patches"] == 1


def test_the_thumbnail_reference_is_the_largest_that_fits_the_bits() -> None:
    """The bar for a globals-only decode: a 32-global, 16-bit model (512 bits) buys a 20-pixel thumbnail;
    a flat photo is one exactly (up to 8 bits), a two-colour one needs more than one pixel."""
    flat = torch.full((3, 30, 45), 0.25)
    small = thumbnail_at_bits(flat, 512.0)
    assert (small["height"], small["width"], small["bits"]) == (4, 5, 480)  # 21 px fit; 3×7 is too elongated
    assert small["psnr"] > 60
    halves = torch.zeros(3, 30, 45)
    halves[:, :, 23:] = 1.0
    assert thumbnail_at_bits(halves, 24.0)["psnr"] < 7 < thumbnail_at_bits(halves, 512.0)["psnr"]
    assert thumbnail_at_bits(halves, 10.0)["bits"] == 24  # never less than one pixel


def test_the_flat_mean_colour_reference_is_the_photos_mean_everywhere() -> None:
    """Half black, half white: the mean colour 0.5 everywhere errs by 0.5 on every pixel, 6.02 dB."""
    halves = torch.zeros(3, 30, 40)
    halves[:, :, 20:] = 1.0
    assert abs(flat_mean_colour(halves)["psnr"] - 10 * math.log10(4)) < 1e-3
    assert flat_mean_colour(torch.full((3, 8, 8), 0.3))["psnr"] > 60


def test_codec_interpolation_uses_the_best_quality_at_each_rate() -> None:
    curve = [{"bpp": 0.5, "psnr": 30.0, "ssim": 0.8}, {"bpp": 1.0, "psnr": 34.0, "ssim": 0.9},
             {"bpp": 0.8, "psnr": 29.0, "ssim": 0.7}]  # the 0.8-bpp point is dominated
    assert codec_at(curve, 0.75)["psnr"] == pytest.approx(32.0)
    assert codec_at(curve, 0.2)["psnr"] is None and codec_at(curve, 2.0)["psnr"] is None
    assert codec_bpp_for(curve, 32.0) == (pytest.approx(0.75), False)
    assert codec_bpp_for(curve, 40.0) == (None, False)
    assert codec_bpp_for(curve, 25.0) == (0.5, True)  # reached at the lowest quality: only a bound


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained composition of the new components: packed decoder, residual-bits estimator."""
    spec = PipelineSpec.compose(
        encoder="vit", global_tokenizer="learned", quantizer="fsq", entropy="residual", filter="dtf", decoder="packed",
        options={"encoder": {"dim": 32, "depth": 1, "heads": 2, "patch_size": 4},
                 "global_tokenizer": {"num_global": 4, "depth": 1, "heads": 2},
                 "quantizer": {"levels": [5, 5, 5, 5]},
                 "filter": {"min_keep": 0},
                 "decoder": {"depth": 1, "heads": 2, "fill_width": 16, "fill_depth": 1, "refine": 0}})
    torch.manual_seed(0)
    return Tokenizer(spec).save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def test_a_downscaled_codec_reaches_the_rates_the_full_size_one_cannot_and_is_scored_at_full_size() -> None:
    """What a user does for a low rate: code the photo smaller and upscale it back. Its curve holds the
    full-size one, reaches far lower rates, and every point is scored against the photo as it is."""
    from tatok_core.workflows.data import load_builtin_photo
    from tatok_core.io.images import fit_longest_side

    photo = fit_longest_side(load_builtin_photo("astronaut"), 128)  # (3, 128, 128)
    full = codec_curve(photo, "jpeg", (1, 50))
    scaled = codec_curve(photo, "jpeg-scaled", (1, 50))
    assert [p["scale"] for p in scaled] == [s for s in CODEC_SCALES for _ in range(2)]
    assert scaled[:2] == full  # scale 1 is the full-size codec
    assert min(p["bpp"] for p in scaled) < 0.5 * min(p["bpp"] for p in full)
    smallest = min(scaled, key=lambda p: p["bpp"])
    assert smallest["scale"] == min(CODEC_SCALES) and 10 < smallest["psnr"] < full[0]["psnr"] + 3  # a real picture
    assert codec_at(scaled, min(p["bpp"] for p in full))["psnr"] >= codec_at(full, min(p["bpp"] for p in full))["psnr"]


def test_quick_run_writes_json_pngs_and_markdown(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, md, theta_dir = tmp_path / "out", tmp_path / "section.md", tmp_path / "tiny-theta"
    Tokenizer.from_pretrained(tiny_model_dir, overrides={"filter": {"name": "dtf", "options": {"mode": "theta"}}}
                              ).save_pretrained(theta_dir)  # the same model with the absolute rule
    argv = ["--model", f"tiny={tiny_model_dir}", "--model", f"tiny-theta={theta_dir}", "--baseline", f"fixed={tiny_model_dir}",
            "--data", "builtin:photos:heldout", "--side", "40", "--max-photos", "2", "--quick",
            "--fractions", "0.25,0.5", "--grid-fractions", "0.25", "--grid-photos", "2",
            "--timing-side", "32", "--timing-repeats", "1", "--nice", "0", "--no-progress",
            "--out", str(out), "--write-markdown", str(md)]
    main(argv)
    record = json.loads((out / "operating_point.json").read_text())
    model = record["models"]["tiny"]
    n = [photo["num_patches"] for photo in model["photos"]]
    assert len(n) == 2 and model["codebook_size"] == 625
    for fraction in (0.25, 0.5):
        theta = model["points"][f"theta@{fraction:g}"]
        assert abs(theta["kept"] - fraction * sum(n) / 2) <= 1  # the shared threshold's mean count
        for label in ("tiny", "tiny-theta"):  # `own` is calibrated in the filter's own rule, τ or θ
            own = record["models"][label]["points"][f"own@{fraction:g}"]
            assert abs(own["kept"] - fraction * sum(n) / 2) <= 1, (label, own)
        topk = [r for r in model["rows"] if r["point"] == "topk" and r["fraction"] == fraction]
        assert [r["kept"] for r in topk] == [round(fraction * k) for k in n]
    for row in model["rows"]:
        expected = rate_bits(4, row["kept"], row["num_patches"], 625, keeps_all=row["point"] == "all")
        assert row["bits"] == pytest.approx(expected)
        assert row["bpp"] == pytest.approx(expected / next(p["height"] * p["width"] for p in model["photos"]
                                                           if p["name"] == row["photo"]))
    globals_only = [r for r in model["rows"] if r["point"] == "globals"]
    assert all(r["kept"] == 0 for r in globals_only)
    assert all(r["thumbnail"]["bits"] <= r["bits"] for r in globals_only)  # the same bits, at most
    assert {p["a"] + "-" + p["b"] for p in model["paired"]} >= {"theta-topk", "own-random"}
    for d in model["paired"]:  # the interval is of the same per-photo differences as the mean
        low, high = d["psnr_difference_ci95"]
        per_photo = d["per_photo_psnr_difference"]
        assert min(per_photo) <= low <= d["mean_psnr_difference"] <= high <= max(per_photo)
    assert "holes" in model and "holes" not in record["models"]["fixed"]
    assert [h["fraction"] for h in model["holes_at_own"]] == [0.25, 0.5]
    assert any(name.startswith("holes, own@0.25") for name in (t["name"] for t in model["targets"]))
    names = [t["name"] for t in model["targets"]]
    assert "own@0.25 − topk" in names and any(name.startswith("own − fixed") for name in names)
    assert "globals only − a thumbnail in the same bits" in names
    assert {t["status"] for t in model["targets"]} <= {"PASS", "FAIL", "SKIP"}
    assert set(record["models"]["fixed"]["points"]) == {"default", "all", "globals"}
    assert [p["fraction"] for p in model["decode_time"]["points"]] == [1.0, 0.5, 0.25, 0.0]
    assert all(len(record["codecs"][codec]["per_photo"]) == 2 for codec in ("jpeg", "webp", "jpeg-scaled", "webp-scaled"))
    assert "all − JPEG at its best scale at the same bpp" in names
    for path in record["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {Path(p).name for p in record["figures"].values()} == {
        "rate_distortion_bpp.png", "rate_distortion_tokens.png", "reconstructions_tiny.png", "kept_tokens_tiny.png",
        "reconstructions_tiny-theta.png", "kept_tokens_tiny-theta.png"}
    text = md.read_text()
    assert text.startswith("## Operating point") and record["command"] in text and "theta − topk" in text


def test_the_bootstrap_interval_brackets_the_mean_and_narrows_with_agreeing_photos() -> None:
    """Paired differences that agree photo by photo give a narrow interval around their mean; the same mean
    from photos that disagree gives a wide one that may include zero — what a margin over a target is worth."""
    agreeing = [0.30, 0.28, 0.32, 0.29, 0.31, 0.30, 0.27, 0.33, 0.30, 0.30, 0.29, 0.31, 0.30, 0.30]
    scattered = [1.5, -0.9, 0.8, -0.4, 1.1, -0.7, 0.3, 0.9, -0.6, 0.2, 0.7, -0.5, 0.4, -0.6]
    low, high = bootstrap_interval(agreeing)
    assert low <= sum(agreeing) / len(agreeing) <= high and high - low < 0.03
    wide_low, wide_high = bootstrap_interval(scattered)
    assert wide_low < 0 < wide_high and wide_high - wide_low > 10 * (high - low)
    assert bootstrap_interval(scattered) == (wide_low, wide_high)  # seeded: the same photos, the same interval
    assert bootstrap_interval([0.5] * 5) == (0.5, 0.5)

