"""benchmarks/bench_training.py: float32 and bfloat16 steps of one recipe, timed side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_training

REPO = Path(__file__).resolve().parents[1]


def test_both_precisions_train_the_same_steps_and_bf16_changes_the_arithmetic(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench_training.main(["--recipe", str(REPO / "recipes" / "tiny.toml"), "--data", "builtin:photos",
                                "--steps", "20", "--threads", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    fp32, bf16 = record["fp32"], record["bf16"]
    assert [step for step, _ in fp32["loss"]] == [step for step, _ in bf16["loss"]] == [10.0, 20.0]
    assert fp32["seconds_per_step"] > 0 and bf16["seconds_per_step"] > 0
    assert record["bf16_over_fp32_time"] == bf16["seconds_per_step"] / fp32["seconds_per_step"]
    # autocast took effect (the curves differ) and learned the same thing (by little)
    largest = max(loss for _, loss in fp32["loss"])
    assert 0 < record["loss_max_abs_difference"] < 0.1 * abs(largest)
    for precision in ("fp32", "bf16"):
        assert set(record["linear_layer"][precision]) == {"fixed_rows_s", "changing_rows_s"}
        assert min(record["linear_layer"][precision].values()) > 0


def test_a_history_with_one_line_is_refused() -> None:
    with pytest.raises(SystemExit, match="raise --steps"):
        bench_training.seconds_per_step([{"step": 10.0, "seconds": 1.0}])
