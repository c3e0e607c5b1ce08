"""A token filter with a fixed, absolute threshold: keep every token carrying more than ``bits_above`` bits.

Compared with DTF, which keeps a *share* τ of each image's total information, an absolute threshold
keeps the same bits-per-token standard for every image. It reuses the input checks and ordering
helpers of :mod:`tatok_core.ops.dtf.reference`, so bad input (NaN, ±inf, negative bits, bad bounds) raises the
same :class:`~tatok_core.contract.errors.FilterInputError` as the built-in filters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tatok_core import Facts, Selection, TokenFilter
from tatok_core.ops.dtf.reference import descending_order, keep_first, validate_bits, validate_bounds


class ThresholdFilter(TokenFilter):
    """Keep the tokens whose bits exceed ``bits_above``; clamp the count to [min_keep, max_keep].

    Per image: k = clamp(#{i : h_i > bits_above}, min_keep, min(max_keep, N)), and the k tokens with
    the most bits are kept (ties: smaller position first). Unclamped, the keep mask is exactly
    ``bits > bits_above``; ``min_keep`` tops up with the next most informative tokens and
    ``max_keep`` drops the least informative ones above the threshold. ``max_keep = -1`` means no cap
    (options cannot hold ``None``). τ is ignored. The comparison is made in float32, the precision
    the bits are validated to.
    """

    def __init__(self, facts: Facts | None = None, *, bits_above: float = 1.0, min_keep: int = 1,
                 max_keep: int = -1) -> None:
        super().__init__(facts)
        if isinstance(bits_above, bool) or not isinstance(bits_above, (int, float)) or not math.isfinite(bits_above) or bits_above < 0:
            raise ValueError(f"bits_above must be a finite number ≥ 0, got {bits_above!r}")
        self.max_keep = None if max_keep == -1 else max_keep
        validate_bounds(0, min_keep, self.max_keep)  # types and min_keep ≤ max_keep
        self.bits_above, self.min_keep = float(bits_above), min_keep

    def select(self, bits: Tensor, tau: float | Tensor | None = None) -> Selection:
        h = validate_bits(bits)  # (B, N) float32, checked
        upper = validate_bounds(h.shape[1], self.min_keep, self.max_keep)
        above = (h > self.bits_above).sum(dim=1)  # (B,) tokens over the threshold
        k = torch.clamp(above, min=min(self.min_keep, upper), max=upper)  # (B,)
        # the tokens over the threshold are exactly the first `above` in descending order
        return Selection.from_mask(keep_first(descending_order(h), k))
