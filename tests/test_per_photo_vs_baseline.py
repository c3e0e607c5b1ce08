"""benchmarks/per_photo_vs_baseline.py reads the right rows of an operating point, or says what is missing."""

from __future__ import annotations

import pytest

from benchmarks.per_photo_vs_baseline import own_rows


def row(photo: str, point: str, fraction: float | None) -> dict:
    return {"photo": photo, "point": point, "fraction": fraction, "kept": 3, "psnr": 20.0}


def test_own_rows_takes_the_own_filter_at_that_fraction_only() -> None:
    rows = [row("a", "own", 0.25), row("a", "topk", 0.25), row("a", "own", 0.35), row("b", "own", 0.25),
            row("a", "all", None)]
    run = {"models": {"m": {"rows": rows}}}
    picked = own_rows(run, "m", 0.25)
    assert sorted(picked) == ["a", "b"] and all(r["point"] == "own" and r["fraction"] == 0.25 for r in picked.values())


def test_a_missing_model_or_fraction_is_named() -> None:
    run = {"models": {"m": {"rows": [row("a", "own", 0.25)]}}}
    with pytest.raises(SystemExit, match=r"no model 'x'.*\['m'\]"):
        own_rows(run, "x", 0.25)
    with pytest.raises(SystemExit, match="no own@0.5"):
        own_rows(run, "m", 0.5)
