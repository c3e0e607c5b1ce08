"""benchmarks/bench_search.py: a batch searched together keeps the sets its images get alone."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_search


def test_the_batched_search_keeps_every_image_s_own_set_at_any_masks_per_call(tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    assert bench_search.main(["--data", "builtin:photos", "--images", "3", "--side", "64", "--batches", "1,5,48",
                              "--threads", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["images"] == 3 and record["kept"] == 16 and record["sweeps"] == 8
    assert [row["search_batch"] for row in record["rows"]] == [1, 5, 48]
    assert all(row["same_sets"] and row["seconds"] > 0 for row in record["rows"])
