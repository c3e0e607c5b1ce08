"""How a token budget is spread over images, and whether spreading it pays.

* :func:`oracle_allocation` — the per-image upper bound: each image decoded at several counts, then the
  counts chosen per image (exactly, by dynamic programming) to maximise mean PSNR at a mean count. Not a
  rule a tokenizer can apply (it needs the original), the ceiling any allocating rule can reach with the
  same ranking at those counts.
* :func:`image_complexity` — content measures an allocation should follow: JPEG bits per pixel at a fixed
  quality (Pillow) and the mean luminance gradient magnitude.
* :func:`spearman` and :func:`paired` — rank correlation of kept fractions with complexity, and the
  per-image difference of one method against another at the same matched count, with win counts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from tatok_core.contract.registry import get_registry

#: JPEG quality of the complexity measure (Pillow's default).
JPEG_QUALITY = 75


def image_complexity(image: Tensor) -> dict[str, float]:
    """``jpeg_bpp`` (bits per pixel of a quality-75 JPEG) and ``mean_gradient`` (mean |∇ luminance|, per
    pixel, luminance in [0, 1]) of one (3, H, W) image in [0, 1]."""
    pixels = (image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    gray = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0  # (H, W)
    dy, dx = np.gradient(gray)
    return {"jpeg_bpp": 8 * buffer.tell() / (pixels.shape[0] * pixels.shape[1]),
            "mean_gradient": float(np.hypot(dx, dy).mean())}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ (ties → average ranks); None when undefined (fewer than 3 values or a constant)."""
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def paired(values: Sequence[float], reference: Sequence[float]) -> dict[str, float | int]:
    """Per-image ``values − reference``: mean, median, wins (> 0), losses (< 0), ties and images."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return {"mean": float(diff.mean()), "median": float(np.median(diff)), "wins": int((diff > 0).sum()),
            "losses": int((diff < 0).sum()), "ties": int((diff == 0).sum()), "images": len(diff)}


#: The largest dynamic-programming table :func:`oracle_allocation` builds (images × budget cells) before it
#: counts in coarser units.
MAX_ALLOCATION_CELLS = 20_000_000


def oracle_allocation(counts: Sequence[Sequence[float]], psnrs: Sequence[Sequence[float]], target: float,
                      *, unit: float = 1.0) -> list[int]:
    """For each image i, the index of one of its candidate counts ``counts[i]`` (with ``psnrs[i]``) such
    that the mean chosen count is at most ``target`` and the mean PSNR is the highest any such choice
    reaches (ties: the fewest tokens) — by dynamic programming over the total count (a multiple-choice
    knapsack), so also the choices off each image's convex hull, which a Lagrangian cannot reach.

    Counts are whole multiples of ``unit`` (token counts: 1); others (bits per pixel, say) are rounded
    *up* to a unit and the budget down, so the mean never exceeds ``target``. Exact while the table
    (images × budget in units of the counts' greatest common divisor) has at most
    :data:`MAX_ALLOCATION_CELLS` cells; beyond, counts are rounded up to a coarser unit (still within the
    budget, optimal for the rounded counts). Candidates should include a count ≤ target for every image
    (e.g. 0); if none fits, each image takes its smallest count.
    """
    costs = [np.ceil(np.asarray(c, dtype=float) / unit - 1e-9).astype(np.int64) for c in counts]  # (J_i,) units
    budget = int(math.floor(target * len(costs) / unit + 1e-9))
    step = max(int(np.gcd.reduce(np.concatenate(costs))), 1)
    step *= max(1, math.ceil(len(costs) * (budget // step + 1) / MAX_ALLOCATION_CELLS))
    costs, budget = [-(-c // step) for c in costs], budget // step  # rounded up; the budget down
    if budget < sum(int(c.min()) for c in costs):
        return [int(np.argmin(c)) for c in costs]
    best = np.full(budget + 1, -np.inf)  # best[b]: the highest total PSNR of the images so far at total b
    best[0] = 0.0
    picks = []  # per image, (budget + 1,): its candidate on the way to best[b]
    for cost, quality in zip(costs, psnrs):
        reached, pick = np.full(budget + 1, -np.inf), np.zeros(budget + 1, dtype=np.int32)
        for j, (c, q) in enumerate(zip(cost.tolist(), quality)):
            if c <= budget:
                candidate = np.full(budget + 1, -np.inf)
                candidate[c:] = best[:budget + 1 - c] + q
                better = candidate > reached
                reached[better], pick[better] = candidate[better], j
        best = reached
        picks.append(pick)
    total = int(np.argmax(best))  # the first maximum: the smallest total among equal PSNRs
    choice = []
    for cost, pick in zip(reversed(costs), reversed(picks)):
        choice.append(int(pick[total]))
        total -= int(cost[choice[-1]])
    return choice[::-1]


def allocates(tokens: Sequence[float]) -> bool:
    """Whether a method's per-image counts differ at all: a fixed count (topk, raster, all) allocates
    nothing, and its kept *fraction* varies only with the image size, which says nothing about content."""
    return len(set(tokens)) > 1


def allocation_report(points: Sequence, images: Sequence[Tensor], reference: str | None = None) -> dict[str, list]:
    """Kept fraction k/N vs complexity (Spearman) for every method that allocates (:func:`allocates`), and
    each method's per-image PSNR minus the ``reference`` method's at the same matched count (``points``:
    :class:`tatok_core.workflows.rate_distortion.RDPoint`). The fraction, not the count, so that photos of different sizes compare.
    ``reference`` is a method label; by default the registered filter of role "top-k"."""
    reference = reference or get_registry().name_for_role("filter", "top-k")
    measures = [image_complexity(image) for image in images]
    correlation = [
        {"filter": p.filter, "setting": p.setting, "matched": p.matched,
         **{key: spearman(p.per_image["fraction"], [m[key] for m in measures]) for key in ("jpeg_bpp", "mean_gradient")}}
        for p in points if allocates(p.per_image["tokens"])
    ]
    baseline = {p.matched: p for p in points if p.filter == reference}
    differences = [
        {"filter": p.filter, "setting": p.setting, "matched": p.matched, "vs": f"{reference} {baseline[p.matched].setting}",
         "tokens": p.mean_tokens - baseline[p.matched].mean_tokens,
         **{f"psnr_{key}": value for key, value in paired(p.per_image["psnr"], baseline[p.matched].per_image["psnr"]).items()}}
        for p in points if p.filter != reference and p.matched in baseline
    ]
    return {"complexity": measures, "spearman": correlation, "paired": differences}
