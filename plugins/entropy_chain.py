"""What each patch token adds given the globals AND the tokens ranked above it, measured by decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tatok_core.contract.interfaces import EntropyContext, EntropyEstimate, EntropyEstimator, Facts, Grid
from tatok_plugins.entropy_residual import patch_squared_error

DEFAULT_PROBES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 0.9)


class DecodedChainEntropy(EntropyEstimator):
    """The chain rule of conditional entropy, measured with the model's own decoder.

    The decoder reconstructs each image from the globals plus its top k tokens at a few probe counts
    0 = k₀ < k₁ < … < k_S = N (``probes``: fractions of N; N is always the last). The ranking is built
    slice by slice: the first takes the patches the globals-only decode gets most wrong (what
    ``residual`` measures); with ``rerank`` (the default) each later slice takes those the decode at the
    previous probe gets most wrong, so a token the decoder already infers from its kept neighbours moves
    down; without, every slice follows the globals-only error. With ``coverage`` = r > 0 a slice is
    chosen one token at a time by :func:`coverage_order`: the token whose neighbourhood (r rings, ring i
    weighted ``coverage_decay``^i) holds the most error not yet covered, and keeping it covers that
    neighbourhood by the same weights — the decoder fills a dropped patch from its kept neighbours, so
    the error is spread over the image instead of piled on the worst patches and their neighbours
    (on the 12 training photos at 25 % of the tokens: +1.4 dB by top-k, +0.45 dB by a shared θ; see
    docs/default-tokenizer.md). With D(k) the image's mean square error, the tokens ranked k_{s−1} … k_s − 1
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
    slice in the ranking's favour — except inside a *dip* (:func:`dip_runs`: a few kept tokens can
    decode worse than the globals alone, until enough are kept), whose tokens hold one value: a θ keeps
    all of a dip or none of it, so a budget calibrated over a set cannot stop one image inside its
    worst measured sets (a count, τ or ε may end inside one: then its tokens go in position order).
    Cost: S extra decodes per image at encode (and, with ``coverage``, one greedy pass of N small
    steps). In training the decodes are skipped and the bits are the globals-only mean square error per
    patch — with ``coverage``, its values re-dealt in the coverage order of that error: the training
    selection needs only the order, and so sees the sets the filter will keep.
    """

    needs_base_reconstruction = True
    needs_decoder = True

    def __init__(self, facts: Facts | None = None, *, probes: Sequence[float] = DEFAULT_PROBES, rerank: bool = True,
                 coverage: int = 0, coverage_decay: float = 0.3, patch_size: int | None = None) -> None:
        super().__init__(facts)
        fractions = [float(f) for f in probes]
        if any(not 0 < f < 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise ValueError(f"{self.label}: probes must be increasing fractions strictly between 0 and 1, got {probes!r}")
        if isinstance(coverage, bool) or int(coverage) != coverage or coverage < 0 or not 0 < coverage_decay <= 1:
            raise ValueError(f"{self.label}: need coverage ≥ 0 rings (a whole number) and 0 < coverage_decay ≤ 1, "
                             f"got {coverage} and {coverage_decay:g}")
        self.probes, self.rerank = tuple(fractions), bool(rerank)
        self.kernel = coverage_kernel(int(coverage), float(coverage_decay)) if coverage else None
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
            return EntropyEstimate(bits=self.training_order(squared, context.grid), loss=squared.new_zeros(()))
        n = squared.shape[1]
        counts = self.counts(n).to(squared.device)  # (S + 1,)
        rank, errors = self.ranked_distortion(context, base, squared, counts)  # (B, N), (B, S + 1)
        distortion = errors.cummin(dim=1).values.clamp_min(1e-12)  # (B, S + 1) made non-increasing in k
        slice_bits = 0.5 * context.images[0].numel() * torch.log2(distortion[:, :-1] / distortion[:, 1:])  # (B, S)
        per_token = concave_slopes(slice_bits, counts)  # (B, S) bits per token, non-increasing in s
        slice_id = torch.bucketize(rank, counts[1:], right=True)  # (B, N) the slice each token's rank is in
        first, in_dip = dip_runs(errors)  # (B, S) each slice's run's first slice; whether it is in a run
        held = torch.where(in_dip.gather(1, slice_id), counts[first].gather(1, slice_id), rank)  # (B, N)
        tilt = 1 - 1e-3 * held.to(per_token.dtype) / n  # (B, N) ties inside a slice go to the ranking; a run is one value
        bits = per_token.gather(1, first).gather(1, slice_id) * tilt  # (B, N)
        return EntropyEstimate(bits=bits.clamp_min(0), loss=squared.new_zeros(()))

    def next_slice(self, missed: Tensor, kept: Tensor, count: int, grid: Grid) -> Tensor:
        """(B, count) positions of the next slice: the worst ``missed`` (B, N) not yet ``kept``, or, with
        ``coverage``, :func:`coverage_order`."""
        if self.kernel is not None:
            return coverage_order(missed, kept, count, grid, self.kernel.to(missed))
        return missed.masked_fill(kept, -1.0).argsort(dim=1, descending=True, stable=True)[:, :count]

    def training_order(self, squared: Tensor, grid: Grid) -> Tensor:
        """(B, N) the globals-only error per patch, its values re-dealt so that their order is the
        first slice's (with ``coverage``; unchanged without)."""
        if self.kernel is None:
            return squared
        order = self.next_slice(squared, torch.zeros_like(squared, dtype=torch.bool), squared.shape[1], grid)  # (B, N)
        return torch.empty_like(squared).scatter_(1, order, squared.sort(dim=1, descending=True).values)

    @torch.no_grad()
    def ranked_distortion(self, context: EntropyContext, base: Tensor, squared: Tensor,
                          counts: Tensor) -> tuple[Tensor, Tensor]:
        """The ranking (B, N) and the mean square error (B, S + 1) with the top k_s tokens kept, as measured.
        Each slice takes the tokens the previous decode misses most (``rerank``), or the globals-only decode
        does (not ``rerank``)."""
        images = context.images.detach().float()
        batch, n = squared.shape
        errors = [((base.detach().float() - images) ** 2).mean(dim=(1, 2, 3))]  # k₀ = 0: the globals-only decode
        rank = torch.empty(batch, n, dtype=torch.int64, device=squared.device)
        kept = torch.zeros(batch, n, dtype=torch.bool, device=squared.device)
        missed = squared  # (B, N) per patch, what the decode so far gets wrong
        for low, high in zip(counts[:-1].tolist(), counts[1:].tolist()):  # one probe at a time: memory of one decode
            chosen = self.next_slice(missed, kept, high - low, context.grid)  # (B, high − low)
            rank.scatter_(1, chosen, torch.arange(low, high, device=rank.device).expand(batch, -1))
            kept.scatter_(1, chosen, True)
            decoded = context.decode(kept)  # (B, C, H, W)
            errors.append(((decoded.float() - images) ** 2).mean(dim=(1, 2, 3)))  # (B,)
            if self.rerank:
                missed = patch_squared_error(images, decoded, self.patch_size)
        return rank, torch.stack(errors, dim=1)


def dip_runs(errors: Tensor) -> tuple[Tensor, Tensor]:
    """(B, S + 1) the error measured at each probe count → (B, S) the first slice of the run each slice is
    in (itself outside runs), and whether it is in one.

    A run is a stretch the decode should be kept whole or not at all: the slices that end *worse* than
    the best decode before them (a few kept tokens can switch the globals' canvas off around them), through
    the slice that recovers. A run still open at N reaches it."""
    batch, slices = errors.shape[0], errors.shape[1] - 1
    first = torch.arange(slices, device=errors.device).expand(batch, -1).clone()  # (B, S)
    in_dip = torch.zeros(batch, slices, dtype=torch.bool, device=errors.device)  # (B, S)
    best = errors[:, 0]  # (B,) the best decode before the slice
    opened = torch.full((batch,), -1, dtype=torch.int64, device=errors.device)  # (B,) the open run's first slice
    for s in range(slices):
        worse = errors[:, s + 1] > best  # (B,) this slice ends worse than the best before it
        start = torch.where(opened >= 0, opened, s)  # (B,)
        in_dip[:, s] = worse | (opened >= 0)  # a slice that dips, or the one that closes an open run
        first[:, s] = torch.where(in_dip[:, s], start, s)
        opened = torch.where(worse, start, -1)
        best = torch.minimum(best, errors[:, s + 1])
    return first, in_dip


def coverage_kernel(rings: int, decay: float) -> Tensor:
    """(2r + 1, 2r + 1) weights decay^i on the i-th ring around the centre (1 at the centre)."""
    offsets = torch.arange(-rings, rings + 1).abs()
    ring = torch.maximum(offsets[:, None], offsets[None, :])  # (2r + 1, 2r + 1) Chebyshev distance
    return (decay ** ring.double()).float()


def neighbourhoods(grid: Grid, rings: int, device: torch.device) -> Tensor:
    """(N + 1, (2r + 1)²) the positions within r rings of each position, offsets row-major (the order of
    :func:`coverage_kernel` flattened); N — a padding slot that holds nothing — beyond the border and
    everywhere in the last row (the padding slot's own neighbourhood)."""
    height, width = grid
    n = height * width
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (N,)
    cols = torch.arange(width, device=device).repeat(height)  # (N,)
    offsets = torch.arange(-rings, rings + 1, device=device)
    near_rows = rows[:, None] + offsets.repeat_interleave(offsets.numel())[None]  # (N, K)
    near_cols = cols[:, None] + offsets.repeat(offsets.numel())[None]  # (N, K)
    inside = (near_rows >= 0) & (near_rows < height) & (near_cols >= 0) & (near_cols < width)
    index = torch.where(inside, near_rows * width + near_cols, n)  # (N, K)
    return torch.cat([index, index.new_full((1, index.shape[1]), n)])  # (N + 1, K)


def coverage_order(missed: Tensor, kept: Tensor, count: int, grid: Grid, kernel: Tensor) -> Tensor:
    """(B, count) positions chosen greedily, one per image at a time, among those not ``kept`` (B, N).

    Error is *uncovered* where no kept token is near: ``missed`` (B, N), zero at the kept positions.
    Each step takes the position whose ``kernel``-weighted neighbourhood holds the most uncovered error
    and scales its neighbours' uncovered error by 1 − kernel (0 at itself). Why: the decoder fills a
    dropped patch from its kept neighbours, so a token is worth the error around it that it helps
    fill, not only its own — a kernel of one cell is the plain worst-first order. A step updates only
    the worth of the positions near the chosen one: O(k⁴) per step (k the kernel's side), not O(N·k²).
    """
    batch = missed.shape[0]
    near = neighbourhoods(grid, kernel.shape[-1] // 2, missed.device)  # (N + 1, K)
    weight = kernel.flatten().to(missed.dtype)  # (K,) symmetric: the weight from i to j is the one from j to i
    uncovered = F.pad(missed.masked_fill(kept, 0.0), (0, 1))  # (B, N + 1); the padding slot stays 0
    worth = (uncovered[:, near] * weight).sum(-1)  # (B, N + 1)
    taken = F.pad(kept, (0, 1), value=True)  # (B, N + 1): the padding slot is never chosen
    images = torch.arange(batch, device=missed.device)
    chosen = []
    for _ in range(count):
        best = worth.masked_fill(taken, -torch.inf).argmax(dim=1)  # (B,)
        chosen.append(best)
        taken[images, best] = True
        window = near[best]  # (B, K) the neighbours it covers
        change = -uncovered.gather(1, window) * weight  # (B, K): each keeps 1 − weight of its uncovered error
        uncovered.scatter_add_(1, window, change)
        reached = near[window].flatten(1)  # (B, K·K): whose worth counts those neighbours
        worth.scatter_add_(1, reached, (change[:, :, None] * weight).flatten(1))
    return torch.stack(chosen, dim=1) if chosen else missed.new_zeros(batch, 0, dtype=torch.int64)


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
