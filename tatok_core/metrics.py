"""Image quality metrics, per image, as every evaluation in TaTok reports them."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor


def psnr(reconstruction: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR in dB for images in [0, 1] (reconstruction clamped first, as a viewer would)."""
    mse = (reconstruction.clamp(0, 1).float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(reconstruction: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM (scikit-image, Gaussian-weighted, on RGB) for images in [0, 1]."""
    values = []
    for x, y in zip(reconstruction.clamp(0, 1).float().cpu().numpy(), target.float().cpu().numpy()):
        values.append(structural_similarity(np.moveaxis(x, 0, -1), np.moveaxis(y, 0, -1), channel_axis=-1,
                                            data_range=1.0, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, win_size=min(7, *x.shape[1:]) // 2 * 2 + 1
                                            if min(x.shape[1:]) < 7 else None))
    return torch.tensor(values, dtype=torch.float64)
