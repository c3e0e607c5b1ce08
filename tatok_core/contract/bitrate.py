"""What a token set costs in bits: the one place where TaTok counts a rate.

Per image with M global tokens, N patch positions, k kept patch tokens and a codebook of V codes:

* ``codes``   = k · log2 V — each kept patch code at its fixed length (no entropy coding);
* ``globals`` = M · log2 V — the global codes, the same fixed length;
* ``side``    = log2(N + 1) + log2 C(N, k) — which tokens were kept: the count k (one of N + 1 values)
  and then which k-subset of the N positions (enumerative coding of the mask). A filter whose positions
  follow from k alone (``positions_from_count``: raster's first k, a seeded random draw) pays only
  log2(N + 1).

``total`` is their sum and ``bpp`` = total / (H · W). This is an upper bound a real entropy coder
beats; it counts every bit a decoder needs to rebuild the kept tokens, which a rate given in tokens
hides (a log2 N index per kept token would cost more than keeping every token at τ = 0.9).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor


@attrs.frozen(eq=False)
class TokenBits:
    """Bits per image (B,) float64, by part; ``pixels`` (B,) H·W of each image."""

    codes: Tensor
    globals_: Tensor
    side: Tensor
    pixels: Tensor

    @property
    def total(self) -> Tensor:
        return self.codes + self.globals_ + self.side

    def bpp(self, part: str = "total") -> Tensor:
        """Bits per pixel of one part (``codes``, ``globals``, ``side``) or of the ``total``, per image."""
        value = {"codes": self.codes, "globals": self.globals_, "side": self.side, "total": self.total}[part]
        return value / self.pixels


def log2_binomial(n: Tensor | int, k: Tensor) -> Tensor:
    """log2 C(n, k) in float64, elementwise (exact to float64 rounding through lgamma)."""
    n64 = torch.as_tensor(n, dtype=torch.float64)
    k64 = k.to(torch.float64)
    nats = torch.lgamma(n64 + 1) - torch.lgamma(k64 + 1) - torch.lgamma(n64 - k64 + 1)
    return (nats / math.log(2)).clamp(min=0.0)  # C(n, 0) = C(n, n) = 1: lgamma rounding must not go below 0


def token_bits(
    lengths: Tensor,
    num_patches: int,
    num_global: int,
    codebook_size: int,
    image_size: tuple[int, int],
    *,
    positions_from_count: bool = False,
) -> TokenBits:
    """The bit count of images that keep ``lengths`` (B,) of ``num_patches`` patch tokens each.

    ``positions_from_count``: the decoder derives the kept positions from k (raster, seeded random), so
    the side information is the count alone.
    """
    if codebook_size < 1 or num_global < 0 or num_patches < 0:
        raise ValueError(f"need codebook_size ≥ 1, num_global ≥ 0, num_patches ≥ 0; got {codebook_size}, "
                         f"{num_global}, {num_patches}")
    k = lengths.detach().to("cpu", torch.float64)  # (B,)
    if bool(((k < 0) | (k > num_patches)).any()):
        raise ValueError(f"kept counts must lie in [0, {num_patches}], got {k.tolist()}")
    per_code = math.log2(codebook_size)
    side = torch.full_like(k, math.log2(num_patches + 1))
    if not positions_from_count:
        side = side + log2_binomial(num_patches, k)
    return TokenBits(
        codes=k * per_code,
        globals_=torch.full_like(k, num_global * per_code),
        side=side,
        pixels=torch.full_like(k, float(image_size[0] * image_size[1])),
    )
