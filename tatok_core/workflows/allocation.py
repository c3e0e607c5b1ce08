"""How a token budget is spread over images, and whether spreading it pays.

* :func:`oracle_allocation` — the per-image upper bound: each image decoded at several counts, then the
  counts chosen per image (Lagrangian) to maximise mean PSNR at a mean count. Not a rule a tokenizer can
  apply (it needs the original), the ceiling any allocating rule can reach with the same ranking.
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


def oracle_allocation(counts: Sequence[Sequence[int]], psnrs: Sequence[Sequence[float]], target: float) -> list[int]:
    """For each image i, the index of one of its candidate counts ``counts[i]`` (with ``psnrs[i]``) so that
    the mean chosen count is at most ``target`` and as close to it as the Lagrangian allows, maximising
    the mean PSNR: each image takes argmax_j psnr_ij − λ·count_ij, with λ bisected.

    Candidates should include a count ≤ target for every image (e.g. 0), or the mean may exceed it.
    """
    def choose(lam: float) -> list[int]:
        return [max(range(len(c)), key=lambda j: (p[j] - lam * c[j], -c[j])) for c, p in zip(counts, psnrs)]

    def mean_count(choice: list[int]) -> float:
        return float(np.mean([c[j] for c, j in zip(counts, choice)]))

    lo, hi = 0.0, 1.0
    while mean_count(choose(hi)) > target and hi < 1e12:  # λ large enough to fit the budget
        hi *= 2
    best = choose(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        choice = choose(mid)
        if mean_count(choice) <= target:
            hi, best = mid, choice
        else:
            lo = mid
        if math.isclose(lo, hi):
            break
    return best


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
