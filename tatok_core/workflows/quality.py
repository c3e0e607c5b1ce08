"""Evaluation at scale: SSIM batched on the device, and rFID through torch-fidelity's Inception.

:func:`ssim` is scikit-image's Gaussian-weighted SSIM (σ = 1.5, 11×11, population covariance, the
settings of :func:`tatok_core.workflows.metrics.ssim`) computed for a whole batch with two convolutions on the
images' device, instead of one image at a time on the CPU.

:class:`ReconstructionFID` accumulates Inception-v3 pool features of originals and reconstructions
and returns the Fréchet distance between them (rFID). The feature network is torch-fidelity's
TF-compatible Inception port (``pip install 'tatok[fid]'``) with its weights read from torch hub's
local checkpoint cache; when either is missing :func:`inception_features` raises a one-line
:class:`TatokError` saying what to install or download — never another network in its place.
Any feature network can be passed instead (the tests use a small random one).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.contract.errors import TatokError
from tatok_core.workflows.losses import hub_checkpoint_dir

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
_SIGMA, _RADIUS = 1.5, 5  # skimage: truncate 3.5 → radius int(3.5 · 1.5 + 0.5) = 5, an 11×11 window
_C1, _C2 = 0.01**2, 0.03**2


def ssim(reconstruction: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM of (B, 3, H, W) images in [0, 1], equal to :func:`tatok_core.workflows.metrics.ssim` to ~1e-6.

    scikit-image filters with reflection and then drops a 5-pixel border before averaging, so only
    windows fully inside the image count: a 'valid' convolution computes exactly those.
    """
    x = reconstruction.clamp(0, 1).float()
    y = target.float()
    if min(x.shape[-2:]) <= 2 * _RADIUS:
        raise TatokError(f"SSIM needs images larger than {2 * _RADIUS}×{2 * _RADIUS}, got {tuple(x.shape[-2:])}")
    offsets = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / _SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, 'valid' region only
        t = F.conv2d(t, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(t, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    mx, my = blur(x), blur(y)  # (B, 3, H - 10, W - 10)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + _C1) * (2 * cxy + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
    return s.flatten(1).mean(1).double()


def inception_features() -> nn.Module:
    """torch-fidelity's Inception-v3 (2048-d pool features) from the local cache, or a one-line error."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise TatokError("rFID needs torch-fidelity, which is not installed: pip install 'tatok[fid]'")
    weights = hub_checkpoint_dir() / INCEPTION_FILE
    if not weights.is_file():
        raise TatokError(f"rFID needs the Inception-v3 weights {weights}, which are not on this machine: "
                         f"download {INCEPTION_URL} into {weights.parent}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:  # torch-fidelity imports torchvision at import time
        raise TatokError(f"torch-fidelity is installed but cannot be imported ({e}); pip install 'tatok[fid]'") from e
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    return _UInt8Input(network)


class _UInt8Input(nn.Module):
    """torch-fidelity's extractors take uint8 images and return a tuple of feature tensors."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.network(pixels)[0].flatten(1)


class ReconstructionFID:
    """Fréchet distance between the feature distributions of originals and reconstructions.

    ``features`` maps (B, 3, H, W) images in [0, 1] to (B, D) features; sums are kept in float64 on
    the features' device, so memory does not grow with the number of images.
    """

    def __init__(self, features: Callable[[Tensor], Tensor] | None = None) -> None:
        self.features = features if features is not None else inception_features()
        self._sums: dict[str, list[Tensor]] = {}

    @torch.no_grad()
    def update(self, reconstruction: Tensor, target: Tensor) -> None:
        for key, images in (("fake", reconstruction), ("real", target)):
            f = self.features(images).double()  # (B, D)
            if key not in self._sums:
                self._sums[key] = [f.new_zeros(()), f.new_zeros(f.shape[1]), f.new_zeros(f.shape[1], f.shape[1])]
            n, s, ss = self._sums[key]
            self._sums[key] = [n + f.shape[0], s + f.sum(0), ss + f.T @ f]

    def compute(self) -> float:
        """‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½)."""
        if set(self._sums) != {"fake", "real"} or float(self._sums["real"][0]) < 2:
            raise TatokError("rFID needs at least two images")
        (mu_r, cov_r), (mu_f, cov_f) = (self._moments(k) for k in ("real", "fake"))
        root_r = _psd_sqrt(cov_r)
        cross = torch.linalg.eigvalsh(root_r @ cov_f @ root_r).clamp_min(0).sqrt().sum()
        return float((mu_r - mu_f).pow(2).sum() + cov_r.trace() + cov_f.trace() - 2 * cross)

    def _moments(self, key: str) -> tuple[Tensor, Tensor]:
        n, s, ss = self._sums[key]
        mean = s / n
        return mean, (ss - n * torch.outer(mean, mean)) / (n - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T
