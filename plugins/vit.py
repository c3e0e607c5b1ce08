"""ViT encoder and decoder: patches in raster order, 2-D sin-cos positions for any grid."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from tatok_core.contract.interfaces import Decoder, Encoder, Facts, Grid
from tatok_plugins.layers import Transformer, check_heads, check_window, init_tokens, patch_layout, start_missing


class ViTEncoder(Encoder):
    """Patch embedding + transformer over the patch grid (any H×W divisible by the patch size).

    ``keep_aware`` > 0 adds that many transformer blocks that re-express the patch features once the
    kept tokens are known (:meth:`given_keep`): each position learns whether it is kept, so a kept
    token can spend its code on what its dropped neighbours hold rather than on its own patch alone.
    The blocks' output enters through a zero-initialised projection: at the start the tokens are
    exactly the keep-blind ones, so the option can be added to trained weights.
    """

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        channels: int = 3,
        window: int = 0,
        keep_aware: int = 0,
    ) -> None:
        super().__init__(facts)
        check_heads(dim, heads, self.label)
        if keep_aware < 0:
            raise ValueError(f"{self.label}: keep_aware is a number of blocks ≥ 0, got {keep_aware!r}")
        self.window = check_window(window, self.label)
        if patch_size < 1:
            raise ValueError(f"patch_size must be ≥ 1, got {patch_size}")
        self.patch_size, self.dim, self.channels = patch_size, dim, channels
        self.embed = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio)
        self.keep_aware = bool(keep_aware)
        if keep_aware:
            self.keep_state = nn.Parameter(torch.zeros(2, dim))  # (dropped, kept); learned once keep_out is not 0
            self.keep_blocks = Transformer(dim, int(keep_aware), heads, mlp_ratio)
            self.keep_out = nn.Linear(dim, dim)
            nn.init.zeros_(self.keep_out.weight)
            nn.init.zeros_(self.keep_out.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        """Weights saved without ``keep_aware`` load into an encoder with it: the new blocks keep their
        initial values, with which the encoder computes exactly what the saved one did (so
        ``train.init`` can start a keep-aware encoder from a trained model)."""
        start_missing(self, state_dict, prefix, "keep_")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def given_keep(self, patches: Tensor, keep: Tensor, grid: Grid) -> Tensor:
        if not self.keep_aware:
            return patches
        positions, windows = patch_layout(grid, self.dim, window=self.window, prefix=0, shift=self.training,
                                          device=patches.device)
        x = patches + self.keep_state[keep.long()].to(patches.dtype) + positions.to(patches.dtype)  # (B, N, D)
        return patches + self.keep_out(self.keep_blocks(x, windows=windows))  # (B, N, D)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.embed(images * 2 - 1)  # (B, D, H/p, W/p), pixels centred on 0
        grid = (patches.shape[2], patches.shape[3])
        x = rearrange(patches, "b d gh gw -> b (gh gw) d")  # (B, N, D) raster order
        positions, windows = patch_layout(grid, self.dim, window=self.window, prefix=0, shift=self.training,
                                          device=x.device)
        return self.transformer(x + positions.to(x.dtype), windows=windows)


class ViTDecoder(Decoder):
    """Globals + kept patch vectors (a learned mask token at dropped positions) → pixels.

    The transformer sees the M global tokens and the full grid; dropped positions carry only the mask
    token and their position, so all they know comes from the globals and the kept neighbours.
    ``refine`` > 0 adds a small residual 3×3 conv head that smooths patch seams.
    """

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        width: int = 0,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        refine: int = 32,
        window: int = 0,
        dim: int | None = None,
        patch_size: int | None = None,
        num_global: int | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__(facts)
        self.window = check_window(window, self.label)
        dim = self.need("dim", dim)
        self.patch_size = self.need("patch_size", patch_size)
        self.channels = self.need("channels", channels, default=3)
        self.num_global = self.need("num_global", num_global)
        self.width = width or dim
        check_heads(self.width, heads, self.label if width else f"{self.label} ({self.facts_in.describe('dim')})")
        self.project = nn.Linear(dim, self.width)
        self.mask_token = init_tokens(self.width)
        self.global_position = init_tokens(max(self.num_global, 1), self.width)
        self.transformer = Transformer(self.width, depth, heads, mlp_ratio)
        self.to_pixels = nn.Linear(self.width, self.channels * self.patch_size**2)
        self.refine = (
            nn.Sequential(
                nn.Conv2d(self.channels, refine, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(refine, self.channels, 3, padding=1),
            )
            if refine
            else None
        )
        if self.refine is not None:
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

    def forward(self, global_vectors: Tensor, patch_vectors: Tensor, keep: Tensor, grid: Grid) -> Tensor:
        m = global_vectors.shape[1]
        patches = torch.where(keep[..., None], self.project(patch_vectors), self.mask_token)  # (B, N, W)
        positions, windows = patch_layout(grid, self.width, window=self.window, prefix=m, shift=self.training,
                                          device=patches.device)
        patches = patches + positions.to(patches.dtype)
        globals_ = self.project(global_vectors) + self.global_position[:m]  # (B, M, W)
        x = self.transformer(torch.cat([globals_, patches], dim=1), windows=windows)[:, m:]  # (B, N, W)
        pixels = rearrange(
            self.to_pixels(x), "b (gh gw) (c p q) -> b c (gh p) (gw q)",
            gh=grid[0], gw=grid[1], p=self.patch_size, q=self.patch_size,
        )
        if self.refine is not None:
            pixels = pixels + self.refine(pixels)
        return pixels * 0.5 + 0.5
