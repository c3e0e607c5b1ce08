"""``vector_quantize_pytorch.FSQ``'s calling convention over TaTok's FSQ: switch by changing one import.

``from vector_quantize_pytorch import FSQ`` → ``from tatok_plugins.vqp_compat import FSQ``; then
``FSQ(levels=[8, 5, 5, 3])`` builds the same quantizer and ``quantized, indices = fsq(z)`` returns the
same values: z (B, N, D) channel-last, or (B, D, H, W …) channel-first (as vector_quantize_pytorch
treats any input of 4 or more dimensions, or any input when ``channel_first``); indices are int32 with
the first level least significant; :meth:`FSQ.indices_to_codes` maps indices back to quantized vectors
in the input's layout. The quantization itself is TaTok's FSQ (bound, rounding, float32 region), which
follows the same reference, so values and indices agree exactly whenever no projection is involved
(``dim == len(levels)``); with a projection only the random initialisation differs.
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor

from tatok_plugins.fsq import FSQ as TatokFSQ


class FSQ(TatokFSQ):
    """TaTok's FSQ with ``forward(z) -> (quantized, indices)`` (the ``vector_quantize_pytorch`` convention)."""

    def __init__(self, levels: Sequence[int], dim: int | None = None, channel_first: bool = False) -> None:
        super().__init__(levels=tuple(levels), dim=dim)
        self.channel_first = channel_first

    def _channel_first(self, ndim: int) -> bool:
        return self.channel_first or ndim >= 4

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """z (B, N, D) or channel-first (B, D, ...) → (quantized like z, indices (B, N) or (B, ...) int32)."""
        moved = self._channel_first(z.ndim)
        x = rearrange(z, "b d ... -> b ... d") if moved else z  # (B, ..., D)
        out = super().forward(x)
        vectors = rearrange(out.vectors, "b ... d -> b d ...") if moved else out.vectors
        return vectors, out.codes.int()

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices (B, N) or (B, ...) → quantized vectors (B, N, D), or channel-first (B, D, ...) for images."""
        vectors = self.codes_to_vectors(indices.long())  # (B, ..., D)
        return rearrange(vectors, "b ... d -> b d ...") if self._channel_first(indices.ndim + 1) else vectors
