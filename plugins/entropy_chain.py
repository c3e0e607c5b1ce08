"""What each patch token adds given the globals AND the tokens ranked above it, measured by decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tatok_core.contract.interfaces import EntropyContext, EntropyEstimate, EntropyEstimator, Facts
from tatok_plugins.entropy_residual import patch_squared_error

DEFAULT_PROBES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 0.9)


class DecodedChainEntropy(EntropyEstimator):
    """The chain rule of conditional entropy, measured with the model's own decoder.

    The decoder reconstructs each image from the globals plus its top k tokens at a few probe counts
    0 = k₀ < k₁ < … < k_S = N (``probes``: fractions of N; N is always the last). The ranking is built
    slice by slice: the first takes the patches the globals-only decode gets most wrong (what
    ``residual`` measures); with ``rerank`` (the default) each later slice takes those the decode at the
    previous probe gets most wrong, so a token the decoder already infers from its kept neighbours moves
    down; without, every slice follows the globals-only error. With D(k) the image's mean square error, the tokens ranked k_{s−1} … k_s − 1
    together carry (n/2)·log2(D(k_{s−1}) / D(k_s)) bits — the Gaussian rate–distortion bits of the
    image's n samples. So a token's bits are what it adds given the globals *and every token ranked
    above it*: the cumulative conditional entropy DTF sums, measured rather than guessed (a token the
    decoder infers from its kept neighbours adds little). They are relative to the image's own error,
    which gives the rules a meaning:

    * θ shared by a set keeps a token wherever it cuts *its* image's log-error by the same amount — the
      equal-slope allocation that maximises mean PSNR at a token budget (what ``--budget`` calibrates);
    * τ keeps the fewest tokens that close a fraction τ of the image's dB gap between globals only and
      every token.

    Between probes log D is taken as linear in k, and made convex (the least concave majorant of the
    cumulative bits: diminishing returns), so bits never grow down the ranking and every rule keeps a
    prefix of it — the sets whose error was measured. A 10⁻³ tilt by rank breaks the ties inside a
    slice in the ranking's favour. Cost: S extra decodes per image at encode. In training the decodes
    are skipped and the bits are the globals-only mean square error per patch: the training selection
    needs only the order.
    """

    needs_base_reconstruction = True
    needs_decoder = True

    def __init__(self, facts: Facts | None = None, *, probes: Sequence[float] = DEFAULT_PROBES, rerank: bool = True,
                 patch_size: int | None = None) -> None:
        super().__init__(facts)
        fractions = [float(f) for f in probes]
        if any(not 0 < f < 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise ValueError(f"{self.label}: probes must be increasing fractions strictly between 0 and 1, got {probes!r}")
        self.probes, self.rerank = tuple(fractions), bool(rerank)
        self.patch_size = self.need("patch_size", patch_size)

    def counts(self, num_patches: int) -> Tensor:
        """(S + 1,) the probe counts k₀ = 0 < … < k_S = N for an N-token grid (duplicates merged)."""
        inner = [round(f * num_patches) for f in self.probes]
        return torch.tensor(sorted({0, num_patches, *inner}), dtype=torch.int64)

    def forward(self, context: EntropyContext) -> EntropyEstimate:
        base = context.base_reconstruction
        if base is None or context.decode is None:
            raise ValueError(f"{self.label} needs the globals-only reconstruction and the decoder in the entropy context")
        squared = patch_squared_error(context.images, base, self.patch_size)  # (B, N)
        if self.training:
            return EntropyEstimate(bits=squared, loss=squared.new_zeros(()))
        n = squared.shape[1]
        counts = self.counts(n).to(squared.device)  # (S + 1,)
        rank, distortion = self.ranked_distortion(context, base, squared, counts)  # (B, N), (B, S + 1)
        slice_bits = 0.5 * context.images[0].numel() * torch.log2(distortion[:, :-1] / distortion[:, 1:])  # (B, S)
        per_token = concave_slopes(slice_bits, counts)  # (B, S) bits per token, non-increasing in s
        slice_id = torch.bucketize(rank, counts[1:], right=True)  # (B, N) the slice each token's rank is in
        tilt = 1 - 1e-3 * rank.to(per_token.dtype) / n  # (B, N) ties inside a slice go to the ranking
        bits = per_token.gather(1, slice_id) * tilt  # (B, N)
        return EntropyEstimate(bits=bits.clamp_min(0), loss=squared.new_zeros(()))

    @torch.no_grad()
    def ranked_distortion(self, context: EntropyContext, base: Tensor, squared: Tensor,
                          counts: Tensor) -> tuple[Tensor, Tensor]:
        """The ranking (B, N) and the mean square error (B, S + 1) with the top k_s tokens kept, made
        non-increasing in k. Each slice takes the tokens the previous decode misses most (``rerank``), or
        the globals-only decode does (not ``rerank``)."""
        images = context.images.detach().float()
        batch, n = squared.shape
        errors = [((base.detach().float() - images) ** 2).mean(dim=(1, 2, 3))]  # k₀ = 0: the globals-only decode
        rank = torch.empty(batch, n, dtype=torch.int64, device=squared.device)
        kept = torch.zeros(batch, n, dtype=torch.bool, device=squared.device)
        missed = squared  # (B, N) per patch, what the decode so far gets wrong
        for low, high in zip(counts[:-1].tolist(), counts[1:].tolist()):  # one probe at a time: memory of one decode
            chosen = missed.masked_fill(kept, -1.0).argsort(dim=1, descending=True, stable=True)[:, : high - low]
            rank.scatter_(1, chosen, torch.arange(low, high, device=rank.device).expand(batch, -1))
            kept.scatter_(1, chosen, True)
            decoded = context.decode(kept)  # (B, C, H, W)
            errors.append(((decoded.float() - images) ** 2).mean(dim=(1, 2, 3)))  # (B,)
            if self.rerank:
                missed = patch_squared_error(images, decoded, self.patch_size)
        return rank, torch.stack(errors, dim=1).cummin(dim=1).values.clamp_min(1e-12)


def concave_slopes(slice_bits: Tensor, counts: Tensor) -> Tensor:
    """(B, S) bits per slice, (S + 1,) slice bounds → (B, S) bits per token of the least concave majorant
    of the cumulative bits: the slopes' non-increasing (decreasing isotonic) fit weighted by slice size,
    by the min–max formula f_s = min_{i ≤ s} max_{j ≥ s} mean(i … j) (S is small)."""
    cumulative = torch.cat([slice_bits.new_zeros(slice_bits.shape[0], 1), slice_bits.cumsum(1)], 1)  # (B, S + 1)
    sizes = counts.to(slice_bits.dtype)  # (S + 1,)
    span_bits = cumulative[:, None, 1:] - cumulative[:, :-1, None]  # (B, S, S): slices i … j
    span_size = sizes[None, 1:] - sizes[:-1, None]  # (S, S)
    mean = torch.where(span_size > 0, span_bits / span_size.clamp_min(1), -torch.inf)  # (B, S, S); −∞ where j < i
    s = torch.arange(slice_bits.shape[1], device=slice_bits.device)
    best_after = torch.stack([mean[:, :, t:].amax(dim=2) for t in s.tolist()], dim=2)  # (B, i, s): max over j ≥ s
    allowed = s[:, None] <= s[None, :]  # (i, s): i ≤ s
    return torch.where(allowed, best_after, torch.inf).amin(dim=1)  # (B, S)
