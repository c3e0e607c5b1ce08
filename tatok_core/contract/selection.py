"""Which patch tokens each image keeps, in mask form and in packed (FlashAttention varlen) form."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor


def cu_seqlens_from_lengths(lengths: Tensor, dtype: torch.dtype = torch.int32) -> Tensor:
    """(B+1,) row starts of a packed batch from its (B,) lengths: 0, l0, l0+l1, … on the lengths' device.

    int32 is FlashAttention's varlen dtype; int64 never wraps (what kernels use to address tokens).
    """
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=dtype, device=lengths.device)  # (B+1,)
    if lengths.numel():
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return cu_seqlens


@attrs.frozen(eq=False)
class Selection:
    """Per-image kept patch positions.

    * ``keep`` (B, N) bool — the mask.
    * ``lengths`` (B,) int64 — tokens kept per image.
    * ``cu_seqlens`` (B+1,) int32 — exclusive prefix sum of ``lengths`` (FlashAttention varlen).
    * ``index`` (K,) int64 — kept positions (0 ≤ pos < N), increasing within each image, images
      concatenated: image b's positions are ``index[cu_seqlens[b]:cu_seqlens[b+1]]``.
    """

    keep: Tensor
    lengths: Tensor
    cu_seqlens: Tensor
    index: Tensor

    @classmethod
    def from_mask(cls, keep: Tensor) -> Selection:
        """Build every field from a (B, N) bool mask."""
        if keep.dim() != 2 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a (B, N) bool tensor, got {tuple(keep.shape)} {keep.dtype}")
        lengths = keep.sum(dim=1, dtype=torch.int64)  # (B,)
        cu_seqlens = cu_seqlens_from_lengths(lengths)  # (B+1,) int32
        index = keep.nonzero()[:, 1]  # row-major, so increasing within each row
        return cls(keep=keep, lengths=lengths, cu_seqlens=cu_seqlens, index=index)

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    @property
    def num_patches(self) -> int:
        return self.keep.shape[1]

    def positions(self, b: int) -> Tensor:
        """Kept positions of image ``b``, increasing."""
        return self.index[int(self.cu_seqlens[b]) : int(self.cu_seqlens[b + 1])]

    def equal(self, other: Selection) -> bool:
        """Exact equality of every field (used to compare backends)."""
        return (
            torch.equal(self.keep.cpu(), other.keep.cpu())
            and torch.equal(self.lengths.cpu(), other.lengths.cpu())
            and torch.equal(self.cu_seqlens.cpu(), other.cu_seqlens.cpu())
            and torch.equal(self.index.cpu(), other.index.cpu())
        )
