"""The entropy-coding measurements of benchmarks/bits_breakdown.py: code lengths a coder can reach."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.bits_breakdown import jpeg_gap_with_tables, kt_code_bits, mask_context_bits, table_bits
from tatok_core.contract.bitrate import log2_binomial


def sequential_kt_bits(sequence: list[int]) -> float:
    """The same code coded symbol by symbol: p(1) = (ones + ½) / (seen + 1), adapting as it goes."""
    zeros = ones = 0
    bits = 0.0
    for symbol in sequence:
        p_one = (ones + 0.5) / (zeros + ones + 1)
        bits -= math.log2(p_one if symbol else 1 - p_one)
        zeros, ones = zeros + (1 - symbol), ones + symbol
    return bits


def test_kt_closed_form_is_the_length_of_the_adaptive_code_in_any_order() -> None:
    sequence = [1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1]
    closed = float(kt_code_bits(torch.tensor(7), torch.tensor(6)))
    assert abs(closed - sequential_kt_bits(sequence)) < 1e-9
    assert abs(closed - sequential_kt_bits(sorted(sequence))) < 1e-9


def test_clustered_masks_code_cheaper_than_enumeration_and_scattered_ones_do_not() -> None:
    grid = (16, 16)
    block = torch.zeros(grid, dtype=torch.bool)
    block[4:12, 2:10] = True  # 64 kept in one block: what texture next to sky looks like
    enumerative = math.log2(257) + float(log2_binomial(256, torch.tensor([64]))[0])
    assert mask_context_bits(block.flatten(), grid) < 0.4 * enumerative
    torch.manual_seed(0)
    scattered = torch.zeros(256, dtype=torch.bool)
    scattered[torch.randperm(256)[:64]] = True
    assert mask_context_bits(scattered, grid) > 0.9 * enumerative  # no structure: nothing to gain
    assert mask_context_bits(torch.zeros(256, dtype=torch.bool), grid) < 10  # globals only: almost free


def test_tables_score_a_skewed_code_stream_below_its_uniform_length() -> None:
    factors = (4, 2)
    fit = torch.tensor([0] * 90 + [5] * 10)  # two codes of eight
    result = table_bits(fit, torch.tensor([0] * 9 + [5]), factors)
    assert result["uniform"] == 3.0
    assert result["joint"] < result["factorised"] - 0.3  # the joint table sees the pair, the channels do not
    assert result["factorised"] < 1.0  # each channel alone is still 90 % one value


def test_jpeg_gap_recounts_the_every_token_point_at_the_tables_bits(tmp_path) -> None:
    curve = [{"bpp": 0.1, "psnr": 20.0}, {"bpp": 0.3, "psnr": 30.0}]  # JPEG: 50 dB per bpp
    row = {"photo": "p", "point": "all", "kept": 100, "num_global": 10, "bits": 110 * 10.0, "bpp": 0.2, "psnr": 24.0}
    run = {"models": {"m": {"rows": [row, {**row, "point": "globals"}]}}, "codecs": {"jpeg": {"per_photo": {"p": curve}}}}
    path = tmp_path / "op.json"
    path.write_text(json.dumps(run))
    gap = jpeg_gap_with_tables(path, "m", patch_bits=8.0, global_bits=8.0)  # 8 of 10 bits per code: 0.16 bpp
    assert abs(gap["counted"] - (24.0 - 25.0)) < 1e-9 and gap["counted_photos"] == 1
    assert abs(gap["tables"] - (24.0 - 23.0)) < 1e-9 and gap["tables_photos"] == 1
    with pytest.raises(SystemExit, match="no model 'other'"):
        jpeg_gap_with_tables(path, "other", 8.0, 8.0)
