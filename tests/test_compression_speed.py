"""benchmarks/compression_speed.py: times the coder's walk and, side by side, another file's walk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import compression_speed

CONTEXT_PRIOR = Path(__file__).resolve().parents[1] / "plugins" / "context_prior.py"


def test_two_walks_are_timed_side_by_side_and_each_file_round_trips(tmp_path: Path) -> None:
    assert compression_speed.main(["--data", "builtin:photos:heldout", "--side", "32", "--limit", "2", "--repeats", "1",
                                   "--walk-from", str(CONTEXT_PRIOR), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compression_speed.json").read_text())
    assert len(result["photos"]) == 2
    for row in result["photos"]:
        assert 0 <= row["kept"] <= row["num_patches"] <= 16  # longest side 32: at most 4×4 patches of 8 px
        assert row["current"]["write_s"] > 0 and row[str(CONTEXT_PRIOR)]["read_s"] > 0
        assert row["current"]["bytes"] == row[str(CONTEXT_PRIOR)]["bytes"] >= 20  # the same walk: the same file
    ratio = result["summary"]["ratio"]
    assert ratio["write_s"] > 0 and ratio["read_s"] > 0  # the same walk twice: a ratio near 1, not asserted (timing)


def test_a_file_without_a_context_prior_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.py"
    other.write_text("x = 1\n")
    with pytest.raises(AttributeError, match="ContextPrior"):
        compression_speed.walk_from(other)
