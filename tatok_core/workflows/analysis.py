"""Images analysed once, filtered many times: what every rate workflow keeps of an :class:`Analysis`.

The expensive half of the pipeline (encoder, global tokens, quantizer, entropy model:
:meth:`Tokenizer.analyse`) runs **once** per image; the cheap token filter re-runs for each threshold
or baseline on the stored bits.
"""

from __future__ import annotations

import attrs
from torch import Tensor

from tatok_core.contract.interfaces import Grid
from tatok_core.contract.selection import Selection
from tatok_core.contract.tokens import Tokens
from tatok_core.pipeline.tokenizer import Analysis, Tokenizer


@attrs.frozen(eq=False)
class Analysed:
    """The part of an :class:`Analysis` that filtering and decoding need: codes and bits, on the CPU.

    Small (about 12 bytes per patch), so a whole data set's worth can wait for τ to be calibrated.
    """

    global_codes: Tensor  # (B, M)
    patch_codes: Tensor  # (B, N)
    bits: Tensor  # (B, N)
    grid: Grid
    image_size: tuple[int, int]

    @classmethod
    def of(cls, analysis: Analysis) -> Analysed:
        return cls(analysis.globals_.codes.cpu(), analysis.patches.codes.cpu(), analysis.entropy.bits.float().cpu(),
                   analysis.grid, analysis.image_size)

    def tokens(self, selection: Selection) -> Tokens:
        """The kept tokens, laid out exactly as :meth:`Tokenizer.encode` lays them out."""
        return Tokens.from_selection(self.global_codes, self.patch_codes, selection, self.grid, self.image_size)


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
