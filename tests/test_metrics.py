"""PSNR and SSIM: scikit-image's SSIM values, for every image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tatok_core.workflows.metrics import psnr, ssim


def pair(side_h: int, side_w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, side_h, side_w, generator=g)
    return (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(0, 1), target


@pytest.mark.parametrize("side", [4, 6, 7, 8, 10, 11, 16, 33])
def test_ssim_matches_scikit_image_at_every_size(side: int) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    x, y = pair(side, side + 3, seed=side)
    win = min(11, side if side % 2 else side - 1)  # scikit-image's default (11) raises below 11 pixels
    reference = [metrics.structural_similarity(np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1), channel_axis=-1,
                                               data_range=1.0, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, win_size=win)
                 for a, b in zip(x.double().numpy(), y.double().numpy())]
    assert torch.allclose(ssim(x, y), torch.tensor(reference, dtype=torch.float64), atol=2e-6)


def test_ssim_of_tiny_images_is_defined() -> None:
    # regression: ssim raised for sides 4, 6, 7, 8 and 10, so `tatok eval --crop 8` ended in a traceback
    for side in (1, 2, 3, 4, 6, 7, 8, 10):
        x, y = pair(side, side)
        assert torch.allclose(ssim(y, y), torch.ones(2, dtype=torch.float64))
        assert bool(((ssim(x, y) > -1) & (ssim(x, y) < 1)).all())


def test_psnr_and_ssim_order_by_distortion() -> None:
    x, y = pair(32, 32)
    closer = (y + 0.3 * (x - y)).clamp(0, 1)
    assert bool((ssim(closer, y) > ssim(x, y)).all()) and bool((psnr(closer, y) > psnr(x, y)).all())
    assert bool((psnr(y, y) > 90).all())
    with pytest.raises(ValueError, match="ssim needs two"):
        ssim(x, y[:, :, :8])


def test_eval_on_tiny_crops_reports_ssim() -> None:
    from click.testing import CliRunner

    from tatok_cli.main import cli

    # 8² crops (under the SSIM window) need a model with 8-px patches: the shipped tatok-small
    result = CliRunner().invoke(cli, ["eval", "--model", "tatok-small", "--crop", "8", "--count", "2", "--taus", "0.5",
                                      "--filters", "dtf,all"])
    assert result.exit_code == 0, result.output
    assert "SSIM" in result.output and "Traceback" not in result.output
