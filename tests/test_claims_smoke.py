"""The claims suite (benchmarks/run_claims.py) runs end to end on a tiny untrained model.

Keeps the scripts from rotting: every part runs in its smallest mode (1 training step per variant, 2
crops, 24-pixel photos) and writes its JSON with the expected keys and its PNGs; the results section is
written into a markdown file without touching the rest of it. No timing or quality assertions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.claims.report import HEADING, replace_section
from benchmarks.run_claims import main
from tatok_core.pipeline.tokenizer import Tokenizer
from tests.helpers import small_spec


def write_recipe(path: Path) -> Path:
    spec_table = "\n".join(line.replace("[", "[spec.", 1) if line.startswith("[") else line
                           for line in small_spec().to_toml().splitlines())
    path.write_text(f"{spec_table}\n\n[train]\nsteps = 2\nbatch_size = 2\ncrop = 16\nwarmup = 1\n"
                    f"eval_data = \"\"\nthreads = 1\n")
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("claims")
    torch.manual_seed(0)
    model_dir = Tokenizer(small_spec()).save_pretrained(root / "model")
    recipe = write_recipe(root / "recipe.toml")
    out = root / "out"
    docs = root / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text("# Results\n\nwritten by the docs\n\n## Claims benchmarks\n\nold\n\n## Later\n\nkept\n")
    threads = torch.get_num_threads()
    try:
        assert main(["--smoke", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                     "--no-progress", "--write-results", str(docs)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, docs


def test_every_part_writes_json_and_png(suite: tuple[Path, Path]) -> None:
    out, _ = suite
    expected = {
        "rate_distortion": {"models", "sets", "floors", "environment"},
        "ablations": {"insufficiency", "conditional_entropy", "dropping", "floors"},
        "allocation": {"sets", "correlations", "tau"},
        "throughput": {"sizes", "environment"},
    }
    for part, keys in expected.items():
        data = json.loads((out / f"{part}.json").read_text())
        assert keys <= set(data), (part, sorted(data))
        assert (out / f"{part}.png").stat().st_size > 0
    assert (out / "allocation_scatter.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) == set(expected)
    floors = summary["floors"]
    assert len(floors) == 4  # DTF vs random and global vs patch-only, on crops and photos
    for f in floors:  # an untrained model may FAIL a floor, but every floor is measured and judged by its value
        assert isinstance(f["value"], float) and math.isfinite(f["value"]), f
        assert f["status"] == ("PASS" if f["value"] >= f["threshold"] else "FAIL"), f


def test_rate_distortion_compares_every_filter_and_model(suite: tuple[Path, Path]) -> None:
    out, _ = suite
    data = json.loads((out / "rate_distortion.json").read_text())
    for key in ("crops", "photos"):
        points = data["sets"][key]["points"]
        seen = {(p["model"], p["filter"]) for p in points}
        assert {("shipped", f) for f in ("dtf", "topk", "random", "raster", "all")} <= seen
        assert {("dtf-trained", "dtf"), ("fixed-rate", "all")} <= seen
        for p in points:
            assert {"mean_tokens", "psnr", "ssim", "per_image"} <= set(p)
            assert len(p["per_image"]["psnr"]) == len(data["sets"][key]["patches"])
        assert "equal_cost" in data["sets"][key]["summary"]


def test_ablations_and_allocation_contents(suite: tuple[Path, Path]) -> None:
    out, _ = suite
    ab = json.loads((out / "ablations.json").read_text())
    for data in ab["insufficiency"]["sets"].values():
        assert {p["model"] for p in data["points"]} == {"global+patch", "patch-only"}
    ce = ab["conditional_entropy"]
    for values in ce["sets"].values():
        assert {"with_globals", "without_globals", "explained_bits", "shipped_prior"} <= set(values)
    assert {p["order"] for p in ab["dropping"]["sets"]["crops"]["points"]} >= {"topk", "random", "bottomk"}
    al = json.loads((out / "allocation.json").read_text())
    assert len(al["sets"]["photos"]["images"]) == 17
    for rows in al["correlations"].values():
        assert {"hist_entropy", "gradient_energy"} <= set(rows)
    tp = json.loads((out / "throughput.json").read_text())
    assert set(tp["sizes"][0]["component_share"]) == {"encoder", "global_tokenizer", "quantizer", "entropy", "filter", "decoder"}


def test_results_section_replaced_in_place(suite: tuple[Path, Path]) -> None:
    _, docs = suite
    text = docs.read_text()
    assert text.startswith("# Results\n\nwritten by the docs\n")
    assert text.count(HEADING) == 1 and "\nold\n" not in text
    assert text.rstrip().endswith("## Later\n\nkept")
    assert "### 1. Adaptive vs fixed rate" in text and "| budget |" in text
    for link in ("img/claims-rate-distortion.png", "img/claims-throughput.png"):
        assert link in text and (docs.parent / link).is_file()


def test_replace_section_appends_when_missing() -> None:
    assert replace_section("# Results\n", f"{HEADING}\n\nnew\n") == f"# Results\n\n{HEADING}\n\nnew\n"
    assert replace_section("", f"{HEADING}\n") == f"{HEADING}\n"
