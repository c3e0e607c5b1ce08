"""Training-free baseline: Shannon entropy of each patch's pixel histogram."""

from __future__ import annotations

import torch
from einops import rearrange

from tatok_core.contract.interfaces import EntropyContext, EntropyEstimate, EntropyEstimator, Facts


class PixelHistogramEntropy(EntropyEstimator):
    """Bits = entropy of the luminance histogram of each patch (``bins`` bins over [0, 1]).

    Needs no training and no globals, so it works before any model exists; it measures local
    busyness, not information the global tokens fail to explain.
    """

    def __init__(self, facts: Facts | None = None, *, bins: int = 16, patch_size: int | None = None,
                 channels: int | None = None) -> None:
        super().__init__(facts)
        if bins < 2:
            raise ValueError(f"bins must be ≥ 2, got {bins}")
        self.bins = bins
        self.patch_size = self.need("patch_size", patch_size)
        self.channels = self.need("channels", channels, default=3)

    def forward(self, context: EntropyContext) -> EntropyEstimate:
        images = context.images.detach().float()
        gray = images.mean(dim=1) if self.channels != 3 else (
            0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        )  # (B, H, W)
        pixels = rearrange(gray, "b (gh p) (gw q) -> b (gh gw) (p q)", p=self.patch_size, q=self.patch_size)
        index = (pixels.clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1)  # (B, N, P)
        counts = torch.zeros(*index.shape[:2], self.bins, device=index.device).scatter_add_(
            -1, index, torch.ones_like(index, dtype=torch.float32)
        )  # (B, N, bins)
        p = counts / index.shape[-1]
        bits = (-(p * torch.log2(p.clamp_min(1e-12))).sum(-1)).clamp_min(0)  # (B, N), −0.0 → 0
        return EntropyEstimate(bits=bits, loss=images.new_zeros(()))
