"""Dynamic Token Filtering: the reference definition every backend is tested against.

Three rules share one ordering and one set of bounds. Per image, with bits h ∈ R^N (h ≥ 0) and bounds
min_keep ≤ max_keep, π orders tokens by h descending, ties by smaller position first, and the rule picks
a count k*; then k = clamp(k*, min_keep, min(max_keep, N)) and the kept set is {π1 … πk}.

* ``tau`` (per image, relative): k* is the smallest k with C_k ≥ τ·T, C_k = h_π1 + … + h_πk, T = C_N
  (k* = 0 when τ·T = 0). τ ∈ [0, 1].
* ``theta`` (absolute, per token): k* = #{i : h_i > θ} — every token holding more than θ bits. θ ≥ 0.
* ``epsilon`` (absolute, per image): k* is the smallest k with T − C_k ≤ ε — the fewest tokens such that
  the information dropped is at most ε bits. ε ≥ 0.

θ and ε are in bits, so one value means the same thing in every image: a budget over a set calibrates
one of them and rich images get more tokens (:func:`tatok_core.workflows.rate_control.calibrate_threshold`).

**Exact arithmetic.** Floating-point cumulative sums depend on summation order, so two backends
(torch's CPU cumsum, a sequential Triton loop, a GPU tree scan) can decide k differently near the
threshold. We therefore sum in *integer fixed point*: with e the binary exponent of the row maximum
(max < 2^e) and P = :func:`fixed_point_bits` (N) — 40 for N ≤ 8192, then one bit less per doubling of N
so that N·2^P ≤ 2^53 — q_i = floor(h_i · s) with s = 2^(P−e), as int64. The scaling is an exact power of
two, q < 2^P, and every partial sum is an exact integer below 2^53, so it converts to float64 exactly:
there is no token cap. Integer sums are order-free.

* τ: threshold = float64(Σq) · float64(float32(τ)); k* = #{k : C_k < threshold} + [threshold > 0].
* ε: the absolute threshold is put on the *same* scale as q: ε_s = float64(float32(ε)) · s, a
  multiplication by a power of two and so exact; D_k = Σq − C_k is an exact integer and
  k* = #{k ∈ 1…N : D_k > ε_s} + [Σq > ε_s]. (On h the dropped information then exceeds ε by at most the
  rounding, (N − k)·2^(e−P) bits: < 2^-13 of the row maximum.)
* θ: no sum at all — float32(h_i) > float32(θ) is one exact comparison on every backend (non-negative
  float32 bit patterns even order like integers, which is how the kernel compares).

All guarantees hold exactly on q (τ, ε) or on float32 h (θ); a token whose h is below 2^-P of the row
maximum has q = 0 and counts as empty for τ and ε.

Inputs are validated at the boundary (NaN, ±inf, negative bits, τ outside [0, 1], θ or ε negative, NaN
or infinite, bad bounds raise :class:`~tatok_core.contract.errors.FilterInputError`) and cleaned identically in
every backend: bits and thresholds are taken as float32 and −0.0 becomes +0.0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tatok_core.contract.errors import FilterInputError
from tatok_core.contract.selection import Selection

#: The rules, by name: per-image relative τ, absolute per-token θ, absolute dropped-information ε.
MODES = ("tau", "theta", "epsilon")
MAX_FIXED_POINT_BITS = 40  # the precision up to N = 8192 (and so the q of every earlier release)
_EXACT_FLOAT64 = 53  # integers below 2^53 are exact in float64


def fixed_point_bits(num_tokens: int) -> int:
    """P, the fixed-point precision for rows of ``num_tokens`` tokens: the largest P ≤ 40 with N·2^P ≤ 2^53.

    Each q < 2^P, so the row total stays below 2^53 and every C_k is exact in float64, for any N.
    """
    return min(MAX_FIXED_POINT_BITS, _EXACT_FLOAT64 - max(0, int(num_tokens) - 1).bit_length())


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


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise FilterInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def validate_threshold(value: float | Tensor, batch_size: int, device: torch.device, mode: str = "tau") -> Tensor:
    """The rule's threshold as a (B,) float64 tensor holding float64(float32(value)), checked and cleaned.

    τ must lie in [0, 1]; θ and ε must be finite and ≥ 0 (−0.0 becomes +0.0, as for the bits).
    """
    name, allowed = (mode, "a number in [0, 1]") if mode == "tau" else (mode, "a finite number ≥ 0 (bits)")
    if isinstance(value, bool):
        raise FilterInputError(f"{name} must be {allowed}, got {value!r}")
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.expand(batch_size)
        if value.shape != (batch_size,):
            raise FilterInputError(f"{name} must be a scalar or have shape ({batch_size},), got {tuple(value.shape)}")
        v32 = value.detach().to(device=device, dtype=torch.float32)
    else:
        try:
            v32 = torch.full((batch_size,), float(value), dtype=torch.float32, device=device)
        except (TypeError, ValueError):
            raise FilterInputError(f"{name} must be {allowed}, got {value!r}") from None
    ok = (v32 >= 0) & (v32 <= 1) if mode == "tau" else (v32 >= 0) & torch.isfinite(v32)
    if v32.numel() and not bool(ok.all()):
        raise FilterInputError(f"{name} must be {allowed}, got {float(v32[~ok][0])!r}")
    return torch.where(v32 > 0, v32, torch.zeros((), dtype=v32.dtype, device=v32.device)).to(torch.float64)


def validate_tau(tau: float | Tensor, batch_size: int, device: torch.device) -> Tensor:
    """τ as a (B,) float64 tensor holding float64(float32(τ)), checked to lie in [0, 1]."""
    return validate_threshold(tau, batch_size, device, "tau")


def row_scale(h: Tensor) -> Tensor:
    """(B, 1) float64 s = 2^(P−e), e the exponent of each row's maximum (max < 2^e), P from N.

    Built from the IEEE-754 bit patterns so that every backend gets exactly the same power of two.
    """
    row_max = h.amax(dim=1, keepdim=True) if h.shape[1] else h.new_zeros(h.shape[0], 1)
    biased = (row_max.view(torch.int32) >> 23) & 0xFF  # float32 exponent field
    e = torch.clamp(biased, min=1).to(torch.int64) - 126  # row_max < 2^e, also for subnormals
    return ((1023 + fixed_point_bits(h.shape[1]) - e) << 52).view(torch.float64)


def fixed_point(h: Tensor) -> Tensor:
    """q = floor(h · 2^(P−e)) as int64, per row (h cleaned, float32, (B, N))."""
    return torch.floor(h.to(torch.float64) * row_scale(h)).to(torch.int64)


def dtf_keep_counts(q_sorted: Tensor, tau64: Tensor, min_keep: int, upper: int) -> Tensor:
    """k per row from fixed-point bits sorted descending (B, N) and τ (B,) float64."""
    cumulative = torch.cumsum(q_sorted, dim=1)  # (B, N) int64, exact
    total = cumulative[:, -1] if q_sorted.shape[1] else q_sorted.new_zeros(q_sorted.shape[0])
    threshold = total.to(torch.float64) * tau64  # (B,)
    below = (cumulative.to(torch.float64) < threshold[:, None]).sum(dim=1)
    k_star = below + (threshold > 0).to(torch.int64)
    return clamp_counts(k_star, min_keep, upper)


def epsilon_keep_counts(q_sorted: Tensor, epsilon_scaled: Tensor, min_keep: int, upper: int) -> Tensor:
    """k per row: the fewest tokens whose dropped fixed-point sum D_k = T − C_k is ≤ ε·s ((B,) float64)."""
    cumulative = torch.cumsum(q_sorted, dim=1)  # (B, N) int64, exact
    total = cumulative[:, -1:] if q_sorted.shape[1] else q_sorted.new_zeros(q_sorted.shape[0], 1)
    dropped = (total - cumulative).to(torch.float64)  # (B, N) D_1 … D_N, exact integers
    above = (dropped > epsilon_scaled[:, None]).sum(dim=1)
    k_star = above + (total[:, 0].to(torch.float64) > epsilon_scaled).to(torch.int64)
    return clamp_counts(k_star, min_keep, upper)


def theta_keep_counts(h: Tensor, theta64: Tensor, min_keep: int, upper: int) -> Tensor:
    """k per row: the number of tokens whose float32 bits exceed float32 θ ((B,) float64, exact)."""
    k_star = (h.to(torch.float64) > theta64[:, None]).sum(dim=1)  # float32 → float64 is exact
    return clamp_counts(k_star, min_keep, upper)


def clamp_counts(k_star: Tensor, min_keep: int, upper: int) -> Tensor:
    return torch.clamp(k_star, min=min(min_keep, upper), max=upper)


def descending_order(scores: Tensor) -> Tensor:
    """(B, N) indices ordering each row by score descending, ties by smaller position first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def keep_first(order: Tensor, k: Tensor) -> Tensor:
    """(B, N) bool mask keeping the first k[b] positions of ``order[b]``."""
    in_top_k = torch.arange(order.shape[1], device=order.device)[None, :] < k[:, None]  # (B, N) sorted order
    return torch.zeros_like(in_top_k).scatter_(1, order, in_top_k)


def select_by_rule(
    bits: Tensor, mode: str, threshold: float | Tensor, min_keep: int = 0, max_keep: int | None = None
) -> Selection:
    """The reference selection of any DTF-family rule (``mode`` in :data:`MODES`; vectorised torch, any device).

    ``threshold`` is τ, θ or ε: a float, or a scalar / (B,) tensor with one value per image.
    """
    validate_mode(mode)
    h = validate_bits(bits)  # (B, N) float32
    batch, n = h.shape
    upper = validate_bounds(n, min_keep, max_keep)
    value = validate_threshold(threshold, batch, h.device, mode)  # (B,) float64
    order = descending_order(h)  # (B, N)
    if mode == "theta":
        k = theta_keep_counts(h, value, min_keep, upper)
    else:
        q_sorted = torch.gather(fixed_point(h), 1, order)  # (B, N) int64
        if mode == "tau":
            k = dtf_keep_counts(q_sorted, value, min_keep, upper)
        else:
            k = epsilon_keep_counts(q_sorted, value * row_scale(h)[:, 0], min_keep, upper)  # ε·s, exact
    return Selection.from_mask(keep_first(order, k))


def dtf_select(bits: Tensor, tau: float | Tensor, min_keep: int = 0, max_keep: int | None = None) -> Selection:
    """The reference DTF selection at a per-image τ (vectorised torch, any device)."""
    return select_by_rule(bits, "tau", tau, min_keep, max_keep)


def theta_select(bits: Tensor, theta: float | Tensor, min_keep: int = 0, max_keep: int | None = None) -> Selection:
    """Keep every token holding more than θ bits (within the bounds)."""
    return select_by_rule(bits, "theta", theta, min_keep, max_keep)


def epsilon_select(bits: Tensor, epsilon: float | Tensor, min_keep: int = 0, max_keep: int | None = None) -> Selection:
    """Keep the fewest highest-bits tokens such that the dropped tokens hold at most ε bits (within the bounds)."""
    return select_by_rule(bits, "epsilon", epsilon, min_keep, max_keep)
