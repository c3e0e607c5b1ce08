"""The shipped tokenizer: loads offline by name, meets its quality floors on held-out photos, runs the demo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tatok_cli.main import cli
from tatok_core.workflows.data import HELDOUT_PHOTOS, ImageSource, fixed_crops
from tatok_core.workflows.metrics import psnr
from tatok_core.contract.registry import get_registry
from tatok_core.pipeline.tokenizer import Tokenizer

# Floors a little under the numbers measured when the model was shipped (docs/results.md), so that a
# regression in any component (or in the weights file) fails here.
PSNR_ALL_FLOOR = 26.7  # measured 27.22 dB at shipping
PSNR_DTF_LOSS_CEILING = 1.0  # dB lost at τ = 0.9 relative to keeping every token
DTF_KEPT_CEILING = 0.92  # at most this share of patch tokens kept at τ = 0.9


@pytest.fixture(scope="module")
def shipped() -> Tokenizer:
    return Tokenizer.from_pretrained("tatok-tiny")


@pytest.fixture(scope="module")
def held_out_crops() -> torch.Tensor:
    return fixed_crops(ImageSource("builtin:photos:heldout").images, 32, 64, seed=0)


def test_shipped_model_is_registered_and_small() -> None:
    directory, provider = get_registry().pretrained()["tatok-tiny"]
    assert provider.package == "tatok"
    weights = Path(directory) / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 20 * 2**20


def test_quality_floors_on_held_out_crops(shipped: Tokenizer, held_out_crops: torch.Tensor) -> None:
    everything = shipped.encode(held_out_crops, filter="all")
    psnr_all = float(psnr(shipped.decode(everything), held_out_crops).mean())
    adaptive = shipped.encode(held_out_crops, tau=0.9)
    psnr_dtf = float(psnr(shipped.decode(adaptive), held_out_crops).mean())
    kept = float(adaptive.lengths.double().mean()) / adaptive.num_patches
    assert psnr_all >= PSNR_ALL_FLOOR, psnr_all
    assert psnr_all - psnr_dtf <= PSNR_DTF_LOSS_CEILING, (psnr_all, psnr_dtf)
    assert kept <= DTF_KEPT_CEILING, kept
    assert adaptive.lengths.min() < adaptive.lengths.max()  # the count adapts to the content


def test_demo_takes_an_absolute_threshold(tmp_path: Path) -> None:
    """--theta replaces the shipped θ: at 10⁹ bits no token of any photo is kept (the default has no floor)."""
    result = CliRunner().invoke(cli, ["demo", "--max-side", "64", "--theta", "1e9", "-o", str(tmp_path / "demo.png")],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "theta 1e+09" in result.output and result.output.count(" 0% ") == len(HELDOUT_PHOTOS), result.output


def test_demo_runs_and_writes_the_panel(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    result = CliRunner().invoke(cli, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in HELDOUT_PHOTOS:
        assert name in result.output
    assert "panel:" in result.output


def test_demo_map_scale_shows_where_theta_cuts_when_nothing_is_kept(tmp_path: Path) -> None:
    """Gravel keeps no token under the default's θ: the map's scale still spans its bits and reaches θ
    (a scale of the kept bits alone would be empty); a τ panel marks no θ; only a searching model says "searched"."""
    from tatok_core.workflows.demo import run_demo
    from tatok_core.workflows.panels import bits_scale

    model = Tokenizer.from_pretrained()
    (gravel,) = run_demo(model, ["gravel"], out=tmp_path / "demo.png").shown
    assert gravel.kept == 0 and gravel.theta == model.token_filter().theta and gravel.searched
    low, high = bits_scale(gravel.bits, gravel.theta)
    assert low <= gravel.bits.min() and gravel.bits.max() < gravel.theta == high
    (by_tau,) = run_demo(model, ["gravel"], max_side=64, tau=0.5, out=tmp_path / "tau.png").shown
    assert by_tau.theta is None and by_tau.kept > 0
    assert bits_scale(by_tau.bits, None) == (float(by_tau.bits.min()), float(by_tau.bits.max()))
    unsearched = Tokenizer(model.spec.updated({}, {"pipeline": {"search_sweeps": 0}})).eval()
    unsearched.load_state_dict(model.state_dict())
    (plain,) = run_demo(unsearched, ["gravel"], max_side=64, tau=0.5, out=tmp_path / "plain.png").shown
    assert not plain.searched
