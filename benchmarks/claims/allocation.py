"""Claim 3 — allocation: simple images get few tokens, busy images many.

DTF at the model's default τ on every built-in photo (downscaled so the longest side is 256; the held-out
ones flagged) and on the held-out crops. Per image: patch tokens kept (and the kept fraction, as whole
photos differ in N), and three content measures of the luminance:

* ``hist_entropy`` — Shannon entropy (bits) of the image's 64-bin histogram;
* ``patch_entropy`` — mean entropy of each p×p patch's 16-bin histogram (what the training-free
  ``pixel`` estimator measures);
* ``gradient_energy`` — mean squared Sobel gradient magnitude.

Reported: Pearson and Spearman correlation of the kept count (crops) / fraction (photos) with each
measure, and PNGs of the photos sorted by tokens kept (dropped patches dimmed) and of the scatter.
With 5 held-out photos a correlation is anecdotal; the crops and all 17 photos carry the statistics.

    python -m benchmarks.claims.allocation [--quick|--full] [--model tatok-tiny] [--out runs/claims]
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from skimage.filters import sobel
from torch import Tensor

from benchmarks.claims.common import (
    Context,
    analyse,
    adaptive_filter,
    environment,
    heldout_crops,
    load_photos,
    model_facts,
    save_figure,
    standalone,
    table,
    write_json,
)
from tatok_core.workflows.data import HELDOUT_PHOTOS

DESCRIPTION = "Claim 3: tokens kept per image vs image content"
MEASURES = ("hist_entropy", "patch_entropy", "gradient_energy")


def luminance(image: Tensor) -> np.ndarray:
    x = image.float().clamp(0, 1).numpy()
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def _entropy(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(np.minimum((values * bins).astype(np.int64), bins - 1).ravel(), minlength=bins)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def content(image: Tensor, patch: int) -> dict[str, float]:
    """Content measures of one (3, H, W) image in [0, 1]."""
    gray = luminance(image)
    h, w = (gray.shape[0] // patch) * patch, (gray.shape[1] // patch) * patch
    patches = gray[:h, :w].reshape(h // patch, patch, w // patch, patch).swapaxes(1, 2).reshape(-1, patch * patch)
    return {
        "hist_entropy": _entropy(gray, 64),
        "patch_entropy": float(np.mean([_entropy(p, 16) for p in patches])) if len(patches) else math.nan,
        "gradient_energy": float(np.mean(sobel(gray) ** 2)),
    }


def correlations(kept: Sequence[float], measures: dict[str, Sequence[float]]) -> dict[str, dict[str, float | None]]:
    """Pearson r and Spearman ρ of ``kept`` with each measure (None when undefined: n < 3 or constant)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, values in measures.items():
        x, y = np.asarray(kept, dtype=float), np.asarray(values, dtype=float)
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            out[name] = {"pearson": None, "spearman": None, "n": len(x)}
            continue
        out[name] = {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0]), "n": len(x)}
    return out


def run(ctx: Context) -> dict[str, Any]:
    s, model = ctx.settings, ctx.model
    ctx.console.rule("[bold]allocation")
    dtf = adaptive_filter(model)
    tau = getattr(dtf, "tau", None)
    names, photos = load_photos(s, "builtin:photos:all")
    crops = heldout_crops(s)
    result: dict[str, Any] = {"part": "allocation", "mode": s.mode, "environment": environment(),
                              "model": model_facts(model, ctx.model_label), "tau": tau, "sets": {}}
    masks = {}
    for key, images in (("photos", photos), ("crops", list(crops))):
        analysed = analyse(model, images if key == "photos" else crops, s.batch_size)
        kept = [0] * analysed.count
        bits = [0.0] * analysed.count
        for batch in analysed.batches:
            selection = dtf.select(batch.bits)
            for j, i in enumerate(batch.indices):
                kept[i] = int(selection.lengths[j])
                bits[i] = float(batch.bits[j].mean())
                if key == "photos":
                    masks[i] = (selection.keep[j].reshape(batch.grid).numpy(), batch.grid)
        patches = analysed.patches
        rows = []
        for i, image in enumerate(images):
            rows.append({"name": names[i] if key == "photos" else f"crop {i} ({HELDOUT_PHOTOS[i % len(HELDOUT_PHOTOS)]})",
                         "heldout": (names[i] in HELDOUT_PHOTOS) if key == "photos" else True,
                         "kept": kept[i], "patches": patches[i], "fraction": kept[i] / patches[i],
                         "mean_bits": bits[i], **content(image, model.patch_size)})
        result["sets"][key] = {"images": rows}
    # correlations: crops by count (equal N), photos by fraction (their N differ)
    crop_rows = result["sets"]["crops"]["images"]
    photo_rows = result["sets"]["photos"]["images"]
    held = [r for r in photo_rows if r["heldout"]]
    groups = {
        f"held-out crops {s.crop}×{s.crop} (kept count)": (crop_rows, "kept"),
        "held-out photos (kept fraction)": (held, "fraction"),
        "all photos (kept fraction)": (photo_rows, "fraction"),
    }
    result["correlations"] = {
        label: correlations([r[key] for r in rows], {m: [r[m] for r in rows] for m in (*MEASURES, "mean_bits")})
        for label, (rows, key) in groups.items()
    }
    ctx.console.print(table(f"allocation: DTF at τ = {tau} on whole photos (model {ctx.model_label})",
                            ["photo", "kept", "of N", "fraction", "hist H", "patch H", "gradient energy", "bits/token"],
                            [[r["name"] + (" *" if r["heldout"] else ""), r["kept"], r["patches"], f"{r['fraction']:.1%}",
                              r["hist_entropy"], r["patch_entropy"], f"{r['gradient_energy']:.4f}", r["mean_bits"]]
                             for r in sorted(photo_rows, key=lambda r: r["fraction"])]))
    ctx.console.print("[dim]* held-out photo")
    ctx.console.print(table("allocation: correlation of tokens kept with content (Pearson r / Spearman ρ)",
                            ["images", "n", *MEASURES, "model bits/token"],
                            [[label, next(iter(c.values()))["n"],
                              *[_pair(c[m]) for m in (*MEASURES, "mean_bits")]] for label, c in result["correlations"].items()]))
    write_json(ctx.out_dir / "allocation.json", result)
    plot_photos(names, photos, masks, photo_rows, model.patch_size, tau, ctx.out_dir / "allocation.png")
    plot_scatter(result, ctx.out_dir / "allocation_scatter.png")
    return result


def _pair(c: dict[str, Any]) -> str:
    if c["pearson"] is None:
        return "—"
    return f"{c['pearson']:+.2f} / {c['spearman']:+.2f}"


def plot_photos(names: Sequence[str], photos: Sequence[Tensor], masks: dict[int, Any], rows: Sequence[dict[str, Any]],
                patch: int, tau: Any, path: Any) -> Any:
    """The photos sorted by kept fraction, dropped patches dimmed."""
    from matplotlib.figure import Figure

    order = sorted(range(len(photos)), key=lambda i: rows[i]["fraction"])
    cols = min(6, len(order))
    nrows = -(-len(order) // cols)
    figure = Figure(figsize=(2.6 * cols, 2.9 * nrows), dpi=100, layout="constrained")
    axes = figure.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for slot, i in enumerate(order):
        ax = axes[slot // cols][slot % cols]
        image = photos[i].permute(1, 2, 0).numpy()
        keep, grid = masks[i]
        full = np.kron(keep, np.ones((patch, patch)))[: image.shape[0], : image.shape[1]]
        shown = image * (0.25 + 0.75 * full[..., None])
        ax.imshow(shown, interpolation="nearest")
        r = rows[i]
        ax.set_title(f"{names[i]}{' (held-out)' if r['heldout'] else ''}\n{r['kept']}/{r['patches']} = {r['fraction']:.0%}",
                     fontsize=8)
    figure.suptitle(f"DTF at τ = {tau}: photos sorted by tokens kept (dimmed: dropped patches)")
    return save_figure(figure, path)


def plot_scatter(result: dict[str, Any], path: Any) -> Any:
    from matplotlib.figure import Figure

    crops = result["sets"]["crops"]["images"]
    photos = result["sets"]["photos"]["images"]
    figure = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, measure in zip(axes[:2], ("gradient_energy", "hist_entropy")):
        ax.scatter([r[measure] for r in crops], [r["kept"] for r in crops], s=12, alpha=0.7)
        ax.set_xlabel(measure.replace("_", " "))
        ax.set_ylabel("patch tokens kept (DTF)")
        ax.set_title(f"held-out crops: kept vs {measure.replace('_', ' ')}", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for heldout, marker in ((True, "o"), (False, "s")):
        chosen = [r for r in photos if r["heldout"] == heldout]
        ax.scatter([r["gradient_energy"] for r in chosen], [r["fraction"] for r in chosen], marker=marker,
                   facecolors="C0" if heldout else "none", edgecolors="C0", label="held-out" if heldout else "train")
        for r in chosen:
            ax.annotate(r["name"], (r["gradient_energy"], r["fraction"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("gradient energy")
    ax.set_ylabel("fraction of patch tokens kept")
    ax.set_title("whole photos", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(figure, path)


if __name__ == "__main__":
    raise SystemExit(standalone(run, DESCRIPTION))
