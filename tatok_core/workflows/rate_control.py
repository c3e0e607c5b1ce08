"""Rate control: which rule and threshold a filter applies, and ONE threshold calibrated for a whole set.

* :func:`check_rate` — one of τ, θ, ε or a budget; :func:`rule_filter` — the model's filter under that rule.
* :func:`calibrate_bits` — ONE threshold for a whole set of images (cached bits) at which the filter keeps
  a target *mean* number of patch tokens per image: an absolute θ or ε (the default meaning of a budget:
  images that hold more information get more tokens) or a per-image τ (every image keeps a similar share).
* :func:`calibrate_threshold` / :func:`calibrate_tau` — the same from images, analysing each once.

The nesting guarantees make the kept count monotone in τ, θ and ε, so bisection on stored bits finds a
budget's threshold without touching the network again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from tatok_core.contract.errors import SpecError, TatokError
from tatok_core.contract.interfaces import TokenFilter
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.inference import evaluating


#: Bisection halvings: 24 reach the float32 resolution at which DTF applies τ.
MAX_BISECTION_STEPS = 24


def check_tau(tau: float) -> float:
    """τ as a float in [0, 1], or a one-line error."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise TatokError(f"tau must be a number in [0, 1], got {tau!r}")
    return float(tau)


def check_bits_threshold(name: str, value: float) -> float:
    """θ or ε (bits) as a finite float ≥ 0, or a one-line error naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TatokError(f"{name} must be a finite number of bits >= 0, got {value!r}")
    return float(value)


#: What a budget calibrates: one shared θ (default), one shared ε, or one shared per-image τ.
BUDGET_MODES = ("theta", "epsilon", "tau")


def check_rate(tau: float | None, budget: float | None, *, theta: float | None = None,
               epsilon: float | None = None, budget_mode: str = "theta") -> str | None:
    """Rate control is ONE of τ, θ, ε or a budget (mean patch tokens per image, > 0), or none (the filter's
    default). Returns the rule it selects ("tau", "theta", "epsilon"; None for the filter's default)."""
    given = [name for name, value in (("tau", tau), ("theta", theta), ("epsilon", epsilon), ("budget", budget))
             if value is not None]
    if len(given) > 1:
        raise TatokError(f"{' and '.join(given)} exclude each other: give one of them")
    if budget_mode not in BUDGET_MODES:
        raise TatokError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got {budget_mode!r}")
    if tau is not None:
        check_tau(tau)
        return "tau"
    for name, value in (("theta", theta), ("epsilon", epsilon)):
        if value is not None:
            check_bits_threshold(name, value)
            return name
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise TatokError(f"budget must be a number of patch tokens per image > 0, got {budget!r}")
        return budget_mode
    return None


def rule_filter(model: Tokenizer, mode: str | None, filter: str | None = None,
                filter_options: Mapping[str, Any] | None = None) -> TokenFilter:
    """The model's filter (or ``filter``) switched to rule ``mode`` ("tau", "theta", "epsilon"; None: as is).

    The spec's filter plays the role; only a DTF-family filter (one with a ``mode`` option) has the
    absolute rules, so asking another for θ or ε is a one-line error; τ is :meth:`Tokenizer.tau_filter`
    (a filter without rules keeps its own).
    """
    options = dict(filter_options or {})
    if mode is None:
        return model.token_filter(filter, **options)
    if mode == "tau":
        return model.tau_filter(filter, **options)
    try:
        return model.token_filter(filter, **{**options, "mode": mode})
    except SpecError as exc:
        raise TatokError(f"filter {filter or model.spec.filter.name!r} has no {mode} rule (no 'mode' option): "
                         f"use --budget-mode tau or a DTF-family filter ({exc})") from None


def with_rule(model: Tokenizer, *, tau: float | None = None, theta: float | None = None,
              epsilon: float | None = None) -> Tokenizer:
    """``model`` with its filter switched to the absolute rule θ or ε at the given bits, when one is given
    (one of τ, θ, ε at most: :func:`check_rate`) — what ``tatok demo/show --theta`` draw; otherwise
    ``model`` itself (a τ is applied per call, not here). Only the filter changes (weights are shared); a
    filter without absolute rules is the one-line error of :func:`rule_filter`."""
    mode = check_rate(tau, None, theta=theta, epsilon=epsilon)
    if mode not in ("theta", "epsilon"):
        return model
    rule_filter(model, mode)
    return model.with_component("filter", model.spec.filter.name, mode=mode, **{mode: theta if mode == "theta" else epsilon})


def applied_rule(token_filter: TokenFilter) -> tuple[str | None, float | None]:
    """(rule, default threshold) of a filter: ("tau", 0.9) for DTF's default; (None, None) for count filters."""
    mode = getattr(token_filter, "mode", "tau" if hasattr(token_filter, "tau") else None)
    value = getattr(token_filter, "threshold", getattr(token_filter, "tau", None))
    return (mode, value) if value is not None else (None, None)


@attrs.frozen
class RateResult:
    """A calibrated threshold of rule ``mode``, the mean patch tokens per image it keeps, the steps taken."""

    threshold: float
    mean_tokens: float
    iterations: int
    budget: float
    mode: str = "tau"

    @property
    def tau(self) -> float | None:
        """The calibrated τ (None when the rule is θ or ε)."""
        return self.threshold if self.mode == "tau" else None


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over every rank of the default process group (float64, exact for counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t)
    return t.tolist()


def _max_across_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _float32_lattice(value: float) -> int:
    """The float32 ≥ ``value`` ≥ 0 as its bit pattern: non-negative float32 patterns order like the values."""
    f = np.float32(value)
    if float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    return int(np.array(f, dtype=np.float32).view(np.int32))


def _lattice_value(pattern: int) -> float:
    return float(np.array(pattern, dtype=np.int32).view(np.float32))


def calibrate_bits(
    token_filter: TokenFilter,
    bits: Sequence[Tensor],
    budget: float,
    *,
    tol: float = 0.5,
    max_iter: int | None = None,
    distributed: bool = False,
) -> RateResult:
    """ONE threshold of the filter's rule for every image in ``bits`` (batches (B, N)) so that the mean kept
    count is within ``tol`` of ``budget`` (or the closest the step function allows).

    The rule is ``token_filter.mode`` ("tau" for a filter without modes). τ is bisected in [0, 1] by
    dyadic halvings (:data:`MAX_BISECTION_STEPS`); θ and ε are bisected over the float32 values in
    [0, the largest token bits (θ) or image total (ε)] by their bit patterns — every float32 the filter can
    apply, so ≤ 31 steps find the exact step of the count. The floor and cap are the filter's ``min_keep``
    and ``max_keep``. With ``distributed`` every rank of the process group must call this: the range and
    every count are all-reduced, so the mean is over all ranks' images and every rank gets the same value.
    """
    check_rate(None, budget)
    mode = getattr(token_filter, "mode", "tau")

    def mean_at(threshold: float) -> float:
        kept = sum(int(token_filter.select(b, threshold).lengths.sum()) for b in bits)
        count = sum(b.shape[0] for b in bits)
        kept, count = _sum_across_ranks([kept, count]) if distributed else (kept, count)
        if count == 0:
            raise TatokError("cannot calibrate a budget on zero images")
        return kept / count

    if mode == "tau":
        ends, midpoint = (0.0, 1.0), lambda lo, hi: (lo + hi) / 2  # dyadic: exact in float32, short to print
        steps_allowed = MAX_BISECTION_STEPS if max_iter is None else max_iter
    else:
        largest = max((float((b.amax() if mode == "theta" else b.sum(dim=1).amax())) for b in bits if b.numel()),
                      default=0.0)
        largest = _max_across_ranks(largest) if distributed else largest
        ends = (0.0, _lattice_value(_float32_lattice(largest)))
        midpoint = lambda lo, hi: _lattice_value((_float32_lattice(lo) + _float32_lattice(hi)) // 2)  # noqa: E731
        steps_allowed = 32 if max_iter is None else max_iter
    (lo, hi), means = ends, [mean_at(ends[0]), mean_at(ends[1])]
    low, high = min(means), max(means)
    if not low <= budget <= high:
        raise TatokError(f"budget {budget:g} tokens per image is outside what these images can reach: "
                         f"{low:.2f} to {high:.2f} patch tokens on average ({mode} from {lo:g} to {hi:g})")
    increasing = means[1] >= means[0]  # τ: more tokens as it grows; θ, ε: fewer
    best = min((abs(means[0] - budget), lo, means[0]), (abs(means[1] - budget), hi, means[1]))
    steps = 0
    while best[0] > tol and steps < steps_allowed:
        mid = midpoint(lo, hi)
        if mid in (lo, hi):  # the float32 lattice is exhausted: best is the exact step nearest the budget
            break
        steps += 1
        mean = mean_at(mid)
        best = min(best, (abs(mean - budget), mid, mean))
        lo, hi = (mid, hi) if (mean < budget) == increasing else (lo, mid)
    return RateResult(threshold=best[1], mean_tokens=best[2], iterations=steps, budget=float(budget), mode=mode)


def calibrate_threshold(
    model: Tokenizer,
    images_or_batches: Tensor | Iterable[Tensor],
    budget: float,
    mode: str = "theta",
    *,
    tol: float = 0.5,
    max_iter: int | None = None,
    batch_size: int = 32,
    filter: str | None = None,
    **filter_options: Any,
) -> RateResult:
    """The ONE threshold of rule ``mode`` ("theta", "epsilon" or "tau") at which the model's filter keeps
    ``budget`` patch tokens per image on average over these images.

    ``images_or_batches``: a (B, C, H, W) tensor (split into ``batch_size`` chunks) or an iterable of
    such batches (sizes may differ between batches). Bits are computed once per image; see
    :func:`calibrate_bits` for the search. ``min_keep``/``max_keep`` filter options are the per-image
    floor and cap.
    """
    check_rate(None, budget, budget_mode=mode)
    batches = images_or_batches.split(batch_size) if isinstance(images_or_batches, Tensor) else images_or_batches
    token_filter = rule_filter(model, mode, filter, filter_options)
    with evaluating(model) as device:
        bits = [model.analyse(batch.to(device)).entropy.bits for batch in batches]
        return calibrate_bits(token_filter, bits, budget, tol=tol, max_iter=max_iter)


def calibrate_tau(
    model: Tokenizer,
    images_or_batches: Tensor | Iterable[Tensor],
    budget: float,
    *,
    tol: float = 0.5,
    max_iter: int = MAX_BISECTION_STEPS,
    batch_size: int = 32,
    filter: str | None = None,
    **filter_options: Any,
) -> RateResult:
    """The per-image τ at which the model's filter keeps ``budget`` patch tokens per image on average."""
    return calibrate_threshold(model, images_or_batches, budget, "tau", tol=tol, max_iter=max_iter,
                               batch_size=batch_size, filter=filter, **filter_options)

