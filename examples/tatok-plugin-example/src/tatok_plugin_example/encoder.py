"""A convolutional encoder: the ViT-free alternative to the built-in ``vit`` encoder."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from tatok_core import Encoder, Facts


class ResidualConv(nn.Module):
    """x + conv(gelu(conv(norm(x)))) with 3×3 kernels: the grid size is unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(1, dim),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(Encoder):
    """Strided conv stem (one p×p patch per output cell) + residual 3×3 conv layers.

    Works for any H×W that is a multiple of ``patch_size``: the stem maps it to an (H/p)×(W/p) grid
    and the 3×3 layers keep that size. Provides ``channels``, ``patch_size`` and ``dim`` (the Encoder
    contract), so every built-in downstream component composes with it.
    """

    def __init__(self, facts: Facts | None = None, *, patch_size: int = 4, dim: int = 64, depth: int = 2,
                 channels: int = 3) -> None:
        super().__init__(facts)
        for option, value, least in (("patch_size", patch_size, 1), ("dim", dim, 1), ("depth", depth, 0), ("channels", channels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{option} must be an integer ≥ {least}, got {value!r}")
        self.patch_size, self.dim, self.channels = patch_size, dim, channels
        self.stem = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.layers = nn.Sequential(*(ResidualConv(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        x = self.layers(self.stem(images * 2 - 1))  # (B, D, H/p, W/p), pixels centred on 0
        return self.norm(rearrange(x, "b d gh gw -> b (gh gw) d"))  # (B, N, D) in raster order
