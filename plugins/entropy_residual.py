"""What the decoder cannot infer from the global tokens: the residual of a globals-only decode, in bits."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from tatok_core.contract.interfaces import EntropyContext, EntropyEstimate, EntropyEstimator, Facts


class GlobalsResidualEntropy(EntropyEstimator):
    """Bits a patch needs beyond the globals, from the error of the decoder's globals-only picture.

    The tokenizer decodes the global tokens alone (no patch token kept) and hands that picture in
    ``context.base_reconstruction``. For a patch of n = C·p² samples whose globals-only residual has
    mean square σ², the Gaussian rate–distortion function gives the bits needed to bring it down to
    distortion ``distortion``: ``(n / 2) · log2(1 + σ² / distortion)``. This measures directly what
    the patch token must add *given the globals* — the paper's conditional entropy — with the
    decoder as the model, where a learned prior over codes only guesses it. Training-free; for the
    absolute modes (θ on bits) any ``distortion`` ranks tokens the same way, for τ and ε it sets how
    strongly large residuals dominate small ones.
    """

    needs_base_reconstruction = True

    def __init__(self, facts: Facts | None = None, *, distortion: float = 1e-3, patch_size: int | None = None) -> None:
        super().__init__(facts)
        if not distortion > 0:
            raise ValueError(f"{self.label}: distortion must be > 0, got {distortion}")
        self.distortion = float(distortion)
        self.patch_size = self.need("patch_size", patch_size)

    def forward(self, context: EntropyContext) -> EntropyEstimate:
        base = context.base_reconstruction
        if base is None:
            raise ValueError(f"{self.label} needs the globals-only reconstruction in the entropy context")
        squared = patch_squared_error(context.images, base, self.patch_size)  # (B, N)
        samples = context.images.shape[1] * self.patch_size**2
        bits = 0.5 * samples * torch.log2(1 + squared / self.distortion)  # (B, N)
        return EntropyEstimate(bits=bits.clamp_min(0), loss=squared.new_zeros(()))


def patch_squared_error(images: Tensor, reconstruction: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) twice → (B, N) mean square error of each patch (row-major grid), detached."""
    residual = (images.detach().float() - reconstruction.detach().float()) ** 2  # (B, C, H, W)
    return rearrange(residual, "b c (gh p) (gw q) -> b (gh gw) (c p q)", p=patch_size, q=patch_size).mean(-1)
