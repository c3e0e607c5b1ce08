"""Images analysed once, filtered many times: what every rate workflow keeps of an
:class:`~tatok_core.pipeline.tokenizer.Analysis`.

The expensive half of the pipeline (encoder, global tokens, quantizer, entropy model:
:meth:`Tokenizer.analyse`) runs **once** per image; the cheap token filter re-runs for each threshold
or baseline on the stored bits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import attrs
import torch
from torch import Tensor

from tatok_core.contract.interfaces import Grid
from tatok_core.contract.selection import Selection
from tatok_core.contract.tokens import Tokens
from tatok_core.pipeline.tokenizer import Tokenizer


@attrs.frozen(eq=False)
class Analysed:
    """The part of an :class:`~tatok_core.pipeline.tokenizer.Analysis` that filtering and decoding need:
    codes and bits, on the CPU.

    Small (about 12 bytes per patch), so a whole data set's worth can wait for τ to be calibrated. A
    keep-aware encoder's codes depend on the set kept: then the patch features stay too (4·D bytes per
    patch) and :meth:`tokens` re-expresses them for each selection, exactly as :meth:`Tokenizer.encode`.
    """

    global_codes: Tensor  # (B, M)
    patch_codes: Tensor  # (B, N) as analysed: the codes when every token is kept blind to the others
    bits: Tensor  # (B, N)
    grid: Grid
    image_size: tuple[int, int]
    kept_codes: Callable[[Tensor], Tensor] | None = attrs.field(default=None, kw_only=True)  # keep (B, N) → (B, N)

    @classmethod
    def of(cls, model: Tokenizer, images: Tensor) -> Analysed:
        """Analyse ``images`` (B, C, H, W) with ``model`` once (no gradients)."""
        with torch.no_grad():
            analysis = model.analyse(images)
        kept_codes = None
        if analysis.patch_features is not None:
            kept_codes = partial(_kept_codes, model, analysis.patch_features.detach().cpu(), analysis.grid)
        return cls(analysis.globals_.codes.cpu(), analysis.patches.codes.cpu(), analysis.entropy.bits.float().cpu(),
                   analysis.grid, analysis.image_size, kept_codes=kept_codes)

    def tokens(self, selection: Selection) -> Tokens:
        """The kept tokens, laid out exactly as :meth:`Tokenizer.encode` lays them out."""
        codes = self.patch_codes if self.kept_codes is None else self.kept_codes(selection.keep)  # (B, N)
        return Tokens.from_selection(self.global_codes, codes, selection, self.grid, self.image_size)


@torch.no_grad()
def _kept_codes(model: Tokenizer, features: Tensor, grid: Grid, keep: Tensor) -> Tensor:
    """(B, N) codes of a keep-aware encoder's tokens for ``keep`` (B, N), from ``features`` (B, N, D)."""
    device = next(model.parameters()).device
    return model.express_kept(features.to(device), keep.to(device), grid).codes.cpu()


def cannot_tokenize(model: Tokenizer, image: Tensor) -> str | None:
    """Why ``image`` (C, H, W) cannot be tokenized by ``model``, or None when it can.

    Checked before any encoder work. (The filters take any number of patches: their integer sums
    choose the fixed-point precision from N, see :func:`tatok_core.ops.dtf.reference.fixed_point_bits`.)
    """
    height, width = image.shape[-2:]
    p = model.patch_size
    if height < p or width < p:
        return f"image of {height}×{width} is smaller than one {p}×{p} patch"
    return None
