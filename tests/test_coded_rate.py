"""benchmarks/coded_rate.py: the prior never sees a validation photo, and codec gaps are read at the right rate."""

from __future__ import annotations

import pytest
import torch

from benchmarks.coded_rate import codec_gaps, summarise, training_photos
from benchmarks.operating_point import codec_bytes, jpeg_scan_size


def test_validation_photos_are_whole_photos_the_prior_does_not_fit() -> None:
    fit, validation = training_photos("builtin:photos", [48, 64], every=4)
    source = {photo.name.split("-")[0] for photo in fit}, {photo.name.split("-")[0] for photo in validation}
    assert not source[0] & source[1]  # split by photo: no photo on both sides, at any size or mirrored
    assert len(source[1]) == 3 and len(source[0]) == 9  # 12 photos, every 4th validates
    assert len(fit) == 9 * 2 * 2 and len(validation) == 3 * 2 * 2  # two sides, each also mirrored
    first = next(p for p in fit if p.name.endswith("-64"))
    mirrored = next(p for p in fit if p.name == f"{first.name}-m")
    assert torch.equal(mirrored.image, first.image.flip(-1))


def test_codec_gaps_interpolate_each_codec_at_the_given_rate() -> None:
    curve = [{"bpp": 0.1, "psnr": 20.0}, {"bpp": 0.3, "psnr": 24.0}]
    scales = [{"bpp": 0.3, "psnr": 24.0}, {"bpp": 0.1, "psnr": 20.0}, {"bpp": 0.15, "psnr": 19.0},  # two scales,
              {"bpp": 0.25, "psnr": 19.5}]  # interleaved: at each rate a user takes the best of them
    codecs = {"jpeg": {"per_photo": {"p": curve}}, "jpeg-scaled": {"per_photo": {"p": scales}},
              "webp-scaled": {"per_photo": {"p": [{"bpp": 0.5, "psnr": 30.0}, {"bpp": 0.2, "psnr": 25.0}]}}}
    gaps = codec_gaps(codecs, "p", 0.2, 23.0)
    assert gaps["jpeg"] == pytest.approx(1.0)
    assert gaps["jpeg-scaled"] == pytest.approx(1.0)  # the envelope 0.1 → 0.3 bpp, not the 0.15 and 0.25 dips
    assert gaps["webp-scaled"] == pytest.approx(-2.0)  # the curve is sorted by rate first
    assert codec_gaps(codecs, "p", 0.05, 23.0)["jpeg"] is None  # below the codec's lowest rate: no gap
    row = {"kept": 10, "psnr": 23.0, "counted_bpp": 0.3, "coded_bpp": 0.2, "globals": 5.0, "positions": 1.0,
           "codes": 80.0, "counted_gap": codec_gaps(codecs, "p", 0.3, 23.0), "coded_gap": gaps}
    summary = summarise([row, {**row, "kept": 30, "codes": 160.0}])
    assert summary["code_bits_per_kept"] == pytest.approx(6.0)  # pooled over photos: 240 bits / 40 codes
    assert summary["jpeg_gap_coded"] == pytest.approx(1.0) and summary["jpeg_photos_coded"] == 2
    assert summary["jpeg_gap_counted"] == pytest.approx(-1.0)
    payload = {**row, "payload_bpp": 0.15, "payload_gap": {"jpeg-scaled-scan": 0.5}}
    summary = summarise([payload, {**payload, "payload_gap": {"jpeg-scaled-scan": None}}])
    assert summary["payload_bpp"] == pytest.approx(0.15)
    assert summary["jpeg-scaled-scan_gap_payload"] == 0.5 and summary["jpeg-scaled-scan_photos_payload"] == 1


def test_a_jpeg_scan_is_counted_without_the_tables_before_it() -> None:
    flat = torch.full((3, 64, 96), 0.5)
    data = codec_bytes(flat, "jpeg", 50)
    assert len(data) > 250 and jpeg_scan_size(data) < 40  # a flat picture: nearly all of the file is tables
    busy = codec_bytes(torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)), "jpeg", 50)
    assert jpeg_scan_size(busy) > 10 * jpeg_scan_size(data)
    assert len(busy) - jpeg_scan_size(busy) < 700  # the tables, whatever the picture
    with pytest.raises(ValueError, match="not a baseline JPEG"):
        jpeg_scan_size(codec_bytes(flat, "webp", 50))
