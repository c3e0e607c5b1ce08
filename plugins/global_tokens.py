"""Global tokenizers: learned global tokens (the paper's) and the patch-only ablation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tatok_core.contract.interfaces import Facts, GlobalTokenizer, Grid
from tatok_plugins.layers import (Transformer, check_heads, check_window, grid_coordinates, init_tokens, patch_layout,
                                  relative_embedding)


class LearnedGlobalTokens(GlobalTokenizer):
    """M learnable tokens encoded jointly with the patches (full attention both ways).

    Globals attend to every patch, so they can gather what is shared across the image; patches attend
    to the globals, so each patch token can stop spending capacity on what the globals already say —
    the "mutual enhancement" of the paper.

    ``relative_positions``: the patches also carry their image-relative place (Fourier features of
    normalised coordinates). With windowed attention a patch's position is otherwise only its place in
    its window, so the globals can tell *what* the image holds but never *where* (in the shipped 16-px
    models a linear probe reads each crop's mean colour from the global codes, R² 0.97, and nothing of
    its layout). It makes a laid-out globals-only picture possible, not learned: neither a fine-tune
    nor a first stage trained with it and a globals-only loss taught one (docs/default-tokenizer.md).

    ``anchored = a``: the first a×a globals start from the mean of the patches of their cell of an a×a
    grid over the image (row-major; the learned token is added), the rest stay free. Why: a layout that
    learned queries must discover by attention (they had not after 1000 steps: a 32-global 1-D tokenizer
    decoded worse than each photo's flat mean colour) is given from the first step; the block then refines
    what each cell says, and every global still attends to every patch. Provides ``global_grid`` = a,
    so a decoder can place those globals (the ``packed`` one does).
    """

    def __init__(self, facts: Facts | None = None, *, num_global: int = 8, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, window: int = 0, relative_positions: bool = False, anchored: int = 0,
                 dim: int | None = None) -> None:
        super().__init__(facts)
        self.window = check_window(window, self.label)
        if num_global < 1:
            raise ValueError(f"num_global must be ≥ 1 (use global_tokenizer 'none' for none), got {num_global}")
        self.dim = self.need("dim", dim)
        check_heads(self.dim, heads, f"{self.label} ({self.facts_in.describe('dim')})")
        if anchored < 0 or anchored * anchored > num_global:
            raise ValueError(f"{self.label}: anchored = {anchored} needs {anchored}² ≤ num_global = {num_global}")
        self.num_global, self.relative_positions, self.anchored = num_global, relative_positions, anchored
        self.tokens = init_tokens(num_global, self.dim)
        self.transformer = Transformer(self.dim, depth, heads, mlp_ratio)

    def provides(self) -> dict[str, Any]:
        return {**super().provides(), "global_grid": self.anchored}

    def forward(self, patches: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
        batch = patches.shape[0]
        globals_ = self.tokens.to(patches.dtype).expand(batch, -1, -1)  # (B, M, D)
        if self.anchored:
            cells = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(batch, self.dim, *grid), self.anchored)
            cells = cells.flatten(2).transpose(1, 2)  # (B, a², D) each cell's mean patch, row-major
            globals_ = globals_ + F.pad(cells, (0, 0, 0, self.num_global - cells.shape[1]))  # (B, M, D)
        positions, windows = patch_layout(grid, self.dim, window=self.window, prefix=self.num_global,
                                          shift=self.training, device=patches.device)
        if self.relative_positions:
            positions = positions + relative_embedding(*grid_coordinates(grid, patches.device), grid, self.dim)  # (N, D)
        x = torch.cat([globals_, patches + positions.to(patches.dtype)], dim=1)  # (B, M + N, D)
        x = self.transformer(x, windows=windows)
        return x[:, : self.num_global], x[:, self.num_global :]


class NoGlobalTokens(GlobalTokenizer):
    """Patch tokens only (M = 0): the ablation the paper argues is information-insufficient."""

    num_global = 0

    def __init__(self, facts: Facts | None = None) -> None:
        super().__init__(facts)

    def forward(self, patches: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
        return patches.new_zeros(patches.shape[0], 0, patches.shape[2]), patches
