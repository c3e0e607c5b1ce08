"""benchmarks/decoder_side_selection.py: what a selection the decoder could reproduce pays and costs."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.decoder_side_selection import main, patch_detail, summarise
from benchmarks.operating_point import load_photos


def test_patch_detail_is_the_squared_gradient_of_each_patch() -> None:
    image = torch.zeros(1, 3, 8, 16)  # a 1 × 2 grid of 8-px patches
    image[..., 4:, :8] = 1.0  # a horizontal edge through the left patch ...
    image[..., 4:, 8:] = 0.5  # ... and a half as high one through the right patch
    detail = patch_detail(image, 8)  # (1, 2)
    assert detail.shape == (1, 2)
    # left: 8 unit steps down, and 4 steps of 0.5 across the seam (counted on the pixel before it); of 64 pixels
    assert detail[0, 0] == pytest.approx((8 + 4 * 0.25) / 64)
    assert detail[0, 1] == pytest.approx(8 * 0.25 / 64)  # 8 steps of 0.5 down
    assert torch.equal(patch_detail(torch.full((1, 3, 8, 16), 0.3), 8), torch.zeros(1, 2))


def test_allocation_moves_the_bits_to_the_photo_that_uses_them() -> None:
    """Top-k spends half its bits on a photo they do not help; at the same mean bits the per-photo choice
    spends them where they do, and an order that is better only by top-k is not better allocated."""
    def points(psnrs: list[list[float]], bpps: list[list[float]]) -> dict[str, list[dict[str, float]]]:
        return {f"{f:g}": [{"psnr": p[i], "bpp": b[i], "positions_bpp": 0.0} for p, b in zip(psnrs, bpps)]
                for i, f in enumerate((0.0, 0.5, 1.0))}

    bpps = [[0.0, 0.1, 0.2], [0.0, 0.1, 0.2]]
    rows = {"chain": points([[10, 20, 22], [30, 30, 30]], bpps),  # photo 1: nothing to gain
            "other": points([[10, 15, 25], [30, 30, 30]], bpps)}
    summary = summarise(rows, [0.0, 0.5, 1.0])
    assert summary["chain"]["topk"]["0.5"] == {"psnr": 25.0, "bpp": 0.1, "positions_bpp": 0.0}
    assert summary["chain"]["allocated"]["0.5"] == {"psnr": 26.0, "bpp": 0.1}  # photo 0 gets all, photo 1 none
    assert summary["other"]["allocated"]["0.5"] == {"psnr": 27.5, "bpp": 0.1}
    assert summary["other"]["topk"]["0.5"]["psnr"] < summary["chain"]["topk"]["0.5"]["psnr"]


def test_decoder_side_files_pay_only_the_count_and_agree_at_the_ends(tmp_path) -> None:
    record = main(["--data", "builtin:photos:heldout", "--limit", "1", "--side", "64", "--fractions", "0.25,1",
                   "--no-progress", "--out", str(tmp_path)])
    (photo,) = load_photos("builtin:photos:heldout", 64, 1)
    rows, n = record["rows"], math.ceil(photo.image.shape[-2] / 8) * math.ceil(photo.image.shape[-1] / 8)
    for fraction in ("0", "1"):  # nothing kept or everything: the order does not matter, only who pays positions
        chain, detail, seeded = (rows[name][fraction][0] for name in ("chain", "detail", "seeded"))
        assert detail["psnr"] == seeded["psnr"] == chain["psnr"]
        paid = chain["bpp"] - chain["positions_bpp"] + math.log2(n + 1) / photo.pixels
        assert detail["bpp"] == pytest.approx(paid) and seeded["bpp"] == pytest.approx(paid)
    assert rows["chain"]["0.25"][0]["positions_bpp"] > 0
    assert rows["detail"]["0.25"][0]["psnr"] != rows["seeded"]["0.25"][0]["psnr"]  # different sets
    assert (tmp_path / "decoder_side_selection.json").is_file()
