"""Dynamic Token Filtering: the reference definition every backend is tested against.

Per image, with bits h ∈ R^N (h ≥ 0), threshold τ ∈ [0, 1] and bounds min_keep ≤ max_keep:

* π orders tokens by h descending, ties by smaller position first;
* C_k = h_π1 + … + h_πk is the cumulative conditional entropy of the k most informative tokens, T = C_N;
* k* is the smallest k with C_k ≥ τ·T (0 when τ·T = 0); k = clamp(k*, min_keep, min(max_keep, N));
* keep {π1 … πk}.

**Exact arithmetic.** Floating-point cumulative sums depend on summation order, so two backends
(torch's CPU cumsum, a sequential Triton loop, a GPU tree scan) can decide k differently near the
threshold. We therefore sum in *integer fixed point*: with e the binary exponent of the row maximum
(max < 2^e), q_i = floor(h_i · 2^(40−e)) as int64 — an exact power-of-two scaling, so q < 2^40 and the
row total stays below 2^53 for N ≤ 8192. Integer sums are order-free, the threshold is
float64(Σq) · float64(float32(τ)), and k* = #{k : C_k < threshold} + [threshold > 0]. All guarantees
hold exactly on q (a token whose h is below 2^-40 of the row maximum has q = 0 and counts as empty).

Inputs are validated at the boundary (NaN, ±inf, negative bits, τ outside [0, 1], bad bounds raise
:class:`~tatok_core.errors.FilterInputError`) and cleaned identically in every backend: bits are
taken as float32 and −0.0 becomes +0.0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tatok_core.errors import FilterInputError
from tatok_core.selection import Selection

FIXED_POINT_BITS = 40
MAX_TOKENS = 8192  # N·2^40 ≤ 2^53: every partial sum is exact in float64


def validate_bounds(num_tokens: int, min_keep: int, max_keep: int | None) -> int:
    """Check the bounds and return the effective upper bound min(max_keep, N)."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise FilterInputError(f"min_keep must be an integer ≥ 0, got {min_keep!r}")
    if max_keep is not None and (isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep < 0):
        raise FilterInputError(f"max_keep must be an integer ≥ 0 or None, got {max_keep!r}")
    if max_keep is not None and min_keep > max_keep:
        raise FilterInputError(f"min_keep ({min_keep}) must not exceed max_keep ({max_keep})")
    upper = num_tokens if max_keep is None else min(max_keep, num_tokens)
    return upper


def validate_bits(bits: Tensor) -> Tensor:
    """Check bits (B, N) and return them cleaned: float32, non-negative, −0.0 → +0.0."""
    if not isinstance(bits, Tensor):
        raise FilterInputError(f"bits must be a torch.Tensor of shape (B, N), got {type(bits).__name__}")
    if bits.dim() != 2:
        raise FilterInputError(f"bits must have shape (B, N), got shape {tuple(bits.shape)}")
    if not bits.is_floating_point():
        raise FilterInputError(f"bits must be a floating-point tensor, got {bits.dtype}")
    if bits.shape[1] > MAX_TOKENS:
        raise FilterInputError(f"at most {MAX_TOKENS} tokens per image are supported, got N = {bits.shape[1]}")
    h = bits.detach().to(torch.float32)
    if h.numel():
        bad_values = ~torch.isfinite(h) | (h < 0)
        if bool(bad_values.any()):
            row, col = (int(i) for i in bad_values.nonzero()[0])
            raise FilterInputError(
                f"bits must be finite and ≥ 0; bits[{row}, {col}] = {float(h[row, col])!r} "
                f"({int(bad_values.sum())} bad values in all)"
            )
    return torch.where(h > 0, h, torch.zeros((), dtype=h.dtype, device=h.device))


def validate_tau(tau: float | Tensor, batch_size: int, device: torch.device) -> Tensor:
    """τ as a (B,) float64 tensor holding float64(float32(τ)), checked to lie in [0, 1]."""
    if isinstance(tau, bool):
        raise FilterInputError(f"tau must be a number in [0, 1], got {tau!r}")
    if isinstance(tau, Tensor):
        if tau.dim() == 0:
            tau = tau.expand(batch_size)
        if tau.shape != (batch_size,):
            raise FilterInputError(f"tau must be a scalar or have shape ({batch_size},), got {tuple(tau.shape)}")
        tau32 = tau.detach().to(device=device, dtype=torch.float32)
    else:
        try:
            tau32 = torch.full((batch_size,), float(tau), dtype=torch.float32, device=device)
        except (TypeError, ValueError):
            raise FilterInputError(f"tau must be a number in [0, 1], got {tau!r}") from None
    if tau32.numel() and not bool(((tau32 >= 0) & (tau32 <= 1)).all()):
        bad = tau32[~((tau32 >= 0) & (tau32 <= 1))][0]
        raise FilterInputError(f"tau must lie in [0, 1], got {float(bad)!r}")
    return tau32.to(torch.float64)


def row_scale(h: Tensor) -> Tensor:
    """(B, 1) float64 2^(40−e), e the exponent of each row's maximum (max < 2^e), built from bits.

    Built from the IEEE-754 bit patterns so that every backend gets exactly the same power of two.
    """
    row_max = h.amax(dim=1, keepdim=True) if h.shape[1] else h.new_zeros(h.shape[0], 1)
    biased = (row_max.view(torch.int32) >> 23) & 0xFF  # float32 exponent field
    e = torch.clamp(biased, min=1).to(torch.int64) - 126  # row_max < 2^e, also for subnormals
    return ((1023 + FIXED_POINT_BITS - e) << 52).view(torch.float64)


def fixed_point(h: Tensor) -> Tensor:
    """q = floor(h · 2^(40−e)) as int64, per row (h cleaned, float32, (B, N))."""
    return torch.floor(h.to(torch.float64) * row_scale(h)).to(torch.int64)


def dtf_keep_counts(q_sorted: Tensor, tau64: Tensor, min_keep: int, upper: int) -> Tensor:
    """k per row from fixed-point bits sorted descending (B, N) and τ (B,) float64."""
    cumulative = torch.cumsum(q_sorted, dim=1)  # (B, N) int64, exact
    total = cumulative[:, -1] if q_sorted.shape[1] else q_sorted.new_zeros(q_sorted.shape[0])
    threshold = total.to(torch.float64) * tau64  # (B,)
    below = (cumulative.to(torch.float64) < threshold[:, None]).sum(dim=1)
    k_star = below + (threshold > 0).to(torch.int64)
    return torch.clamp(k_star, min=min(min_keep, upper), max=upper)


def descending_order(scores: Tensor) -> Tensor:
    """(B, N) indices ordering each row by score descending, ties by smaller position first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def keep_first(order: Tensor, k: Tensor) -> Tensor:
    """(B, N) bool mask keeping the first k[b] positions of ``order[b]``."""
    in_top_k = torch.arange(order.shape[1], device=order.device)[None, :] < k[:, None]  # (B, N) sorted order
    return torch.zeros_like(in_top_k).scatter_(1, order, in_top_k)


def dtf_select(bits: Tensor, tau: float | Tensor, min_keep: int = 0, max_keep: int | None = None) -> Selection:
    """The reference DTF selection (vectorised torch, any device)."""
    h = validate_bits(bits)  # (B, N) float32
    batch, n = h.shape
    upper = validate_bounds(n, min_keep, max_keep)
    tau64 = validate_tau(tau, batch, h.device)
    order = descending_order(h)  # (B, N)
    q_sorted = torch.gather(fixed_point(h), 1, order)
    k = dtf_keep_counts(q_sorted, tau64, min_keep, upper)  # (B,)
    return Selection.from_mask(keep_first(order, k))
