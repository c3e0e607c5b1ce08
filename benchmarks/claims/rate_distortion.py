"""Claim 1 — adaptive vs fixed rate: rate–distortion on held-out photos.

Two comparisons, each on fixed held-out crops and on whole held-out photos (longest side 256):

* **Filters on one trained model** (the model under test, e.g. tatok-tiny): DTF at a sweep of budgets
  (τ calibrated so the mean kept patch tokens hit each budget) against fixed-count filters keeping
  k = round(DTF's mean) tokens of *every* image — ``topk`` (most bits first, not adaptive), ``random``,
  ``raster`` (a truncated fixed-rate sequence) — plus ``all``.
* **Tokenizers at equal training cost**: the recipe trained with DTF vs the same recipe trained with
  filter ``all`` (the classic fixed-rate tokenizer), the same step budget. Reported as the token saving
  at equal PSNR: "DTF reaches the fixed-rate PSNR with X× fewer tokens", reading the DTF curve
  (linear between points) where it first reaches the fixed-rate PSNR.

Floor (printed, not asserted): at equal mean tokens DTF ≥ random + 1 dB, averaged over the budgets that
keep between 10 % and 75 % of the patch tokens.

    python -m benchmarks.claims.rate_distortion [--quick|--full] [--model tatok-tiny] [--out runs/claims]
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.claims.common import (
    Analysed,
    Context,
    analyse,
    calibrate,
    curve,
    adaptive_filter,
    environment,
    floor,
    heldout_crops,
    load_photos,
    model_facts,
    point,
    save_figure,
    score,
    standalone,
    table,
    write_json,
    x_reaching,
)
from tatok_core.pipeline.tokenizer import Tokenizer

BASELINES = ("topk", "random", "raster")
DESCRIPTION = "Claim 1: rate-distortion of DTF vs fixed-count filters and vs a fixed-rate tokenizer"


def rd_points(model: Tokenizer, label: str, analysed: Analysed, budgets: Sequence[float],
              baselines: Sequence[str] = BASELINES, include_all: bool = True) -> list[dict[str, Any]]:
    """DTF at each budget (fraction of N), each baseline at DTF's matched mean count, and ``all``."""
    n = analysed.mean_patches
    dtf = adaptive_filter(model)
    points = []
    for budget in budgets:
        tau = calibrate(model, analysed, budget * n)
        if tau is None:
            continue
        points.append(point(score(model, analysed, lambda b: dtf.select(b.bits, tau)),
                            model=label, filter="dtf", budget=budget, tau=tau, setting=f"tau={tau:.4g}"))
    for dtf_point in [p for p in points if p["filter"] == "dtf"]:
        k = round(dtf_point["mean_tokens"])
        for name in baselines:
            chosen = model.token_filter(name, k=k)
            points.append(point(score(model, analysed, lambda b: chosen.select(b.bits),
                                      getattr(chosen, "positions_from_count", False)),
                                model=label, filter=name, budget=dtf_point["budget"], k=k, setting=f"k={k}"))
    if include_all:
        keep_all = model.baseline_filter("keep-all")
        points.append(point(score(model, analysed, lambda b: keep_all.select(b.bits)),
                            model=label, filter="all", budget=1.0, setting="all"))
    return points


def _select(points: Sequence[dict[str, Any]], model: str, filter: str) -> list[dict[str, Any]]:
    return [p for p in points if p["model"] == model and p["filter"] == filter]


def summarise(points: Sequence[dict[str, Any]], n: float, floor_range: tuple[float, float]) -> dict[str, Any]:
    """Gaps at matched tokens, token savings at equal PSNR, and the equal-training-cost comparison."""
    summary: dict[str, Any] = {"mean_patches": n}
    dtf = {p["budget"]: p for p in _select(points, "shipped", "dtf")}
    gaps: dict[str, list[dict[str, float]]] = {}
    for name in BASELINES:
        rows = []
        for p in _select(points, "shipped", name):
            d = dtf.get(p["budget"])
            if d is not None:
                rows.append({"budget": p["budget"], "tokens": d["mean_tokens"], "baseline_tokens": p["mean_tokens"],
                             "psnr_gap": d["psnr"] - p["psnr"], "ssim_gap": d["ssim"] - p["ssim"]})
        gaps[name] = rows
    summary["gaps"] = gaps
    lo, hi = floor_range
    in_range = [g for g in gaps.get("random", []) if lo <= g["tokens"] / n <= hi]
    summary["floor_points"] = len(in_range)
    summary["dtf_minus_random_db"] = float(np.mean([g["psnr_gap"] for g in in_range])) if in_range else None
    summary["dtf_minus_topk_db"] = _mean_gap(gaps.get("topk", []), n, floor_range)
    summary["dtf_minus_raster_db"] = _mean_gap(gaps.get("raster", []), n, floor_range)

    # Token saving vs random on the same model: tokens DTF needs for each random point's PSNR.
    dtf_curve = curve([*_select(points, "shipped", "dtf"), *_select(points, "shipped", "all")])
    ratios = []
    for p in _select(points, "shipped", "random"):
        if lo <= p["mean_tokens"] / n <= hi:
            t = x_reaching(*dtf_curve, p["psnr"])
            if t:
                ratios.append(p["mean_tokens"] / t)
    summary["saving_vs_random"] = float(np.median(ratios)) if ratios else None

    # Equal training cost: DTF-trained curve vs the fixed-rate tokenizer with every token.
    fixed_all = _select(points, "fixed-rate", "all")
    trained = [*_select(points, "dtf-trained", "dtf"), *_select(points, "dtf-trained", "all")]
    if fixed_all and trained:
        f = fixed_all[0]
        equal = {"fixed_tokens": f["mean_tokens"], "fixed_psnr": f["psnr"], "fixed_ssim": f["ssim"]}
        for metric in ("psnr", "ssim"):
            xs, ys = curve(trained, metric)
            t = x_reaching(xs, ys, f[metric])
            equal[f"dtf_tokens_at_fixed_{metric}"] = t
            equal[f"saving_{metric}"] = f["mean_tokens"] / t if t else None
            equal[f"dtf_best_{metric}"] = max(ys)
        dtf_all = _select(points, "dtf-trained", "all")
        equal["dtf_all_psnr"] = dtf_all[0]["psnr"] if dtf_all else None
        summary["equal_cost"] = equal
    return summary


def _mean_gap(rows: Sequence[dict[str, float]], n: float, floor_range: tuple[float, float]) -> float | None:
    lo, hi = floor_range
    values = [g["psnr_gap"] for g in rows if lo <= g["tokens"] / n <= hi]
    return float(np.mean(values)) if values else None


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    console = ctx.console
    crops = heldout_crops(s)
    names, photos = load_photos(s)
    sets = {
        "crops": (f"{len(crops)} held-out crops {s.crop}×{s.crop}", crops),
        "photos": (f"{len(photos)} held-out photos, longest side {s.photo_side}", photos),
    }
    trained, trained_info = ctx.variant("dtf")
    fixed, fixed_info = ctx.variant("fixed")
    result: dict[str, Any] = {
        "part": "rate_distortion", "mode": s.mode, "environment": environment(),
        "models": {"shipped": model_facts(ctx.model, ctx.model_label), "dtf-trained": trained_info, "fixed-rate": fixed_info},
        "budgets": list(s.budgets), "floor_range": list(s.floor_range), "sets": {},
    }
    floors = []
    for key, (description, images) in sets.items():
        console.rule(f"[bold]rate–distortion: {description}")
        analysed = analyse(ctx.model, images, s.batch_size)
        points = rd_points(ctx.model, "shipped", analysed, s.budgets)
        if trained is ctx.model:
            points += [{**p, "model": "dtf-trained"} for p in points if p["filter"] in ("dtf", "all")]
        else:
            points += rd_points(trained, "dtf-trained", analyse(trained, images, s.batch_size), s.budgets, ())
        points += rd_points(fixed, "fixed-rate", analyse(fixed, images, s.batch_size), s.budgets, ())
        summary = summarise(points, analysed.mean_patches, s.floor_range)
        result["sets"][key] = {"description": description, "names": names if key == "photos" else None,
                               "patches": analysed.patches, "points": points, "summary": summary}
        print_set(ctx, key, result["sets"][key], fixed_info["steps"])
        gap = summary["dtf_minus_random_db"]
        floors.append(floor(f"DTF ≥ random + 1 dB at equal mean tokens ({key})", gap, 1.0,
                            f"mean PSNR gap over {summary['floor_points']} budgets keeping "
                            f"{s.floor_range[0]:.0%}–{s.floor_range[1]:.0%} of the tokens"))
    result["floors"] = floors
    write_json(ctx.out_dir / "rate_distortion.json", result)
    plot(result, ctx.out_dir / "rate_distortion.png")
    return result


def print_set(ctx: Context, key: str, data: dict[str, Any], steps: int) -> None:
    points, summary = data["points"], data["summary"]
    n = summary["mean_patches"]
    by = {(p["model"], p["filter"], p["budget"]): p for p in points}
    rows = []
    for d in _select(points, "shipped", "dtf"):
        b = d["budget"]
        base = [by.get(("shipped", name, b), {}).get("psnr") for name in BASELINES]
        rnd = by.get(("shipped", "random", b))
        rows.append([f"{b:.0%}", f"{d['tau']:.4f}", d["mean_tokens"], d["psnr"], *base,
                     None if rnd is None else d["psnr"] - rnd["psnr"], d["ssim"], None if rnd is None else rnd["ssim"]])
    a = by.get(("shipped", "all", 1.0))
    if a:
        rows.append(["all", "—", a["mean_tokens"], a["psnr"], None, None, None, None, a["ssim"], None])
    ctx.console.print(table(f"{data['description']}: model {ctx.model_label} (N = {n:.0f} patch tokens), PSNR dB",
                            ["budget", "τ", "tokens", "DTF", "topk", "random", "raster", "DTF−random", "SSIM DTF", "SSIM random"],
                            rows))
    eq = summary.get("equal_cost")
    rows = [[p["model"], p["setting"], p["mean_tokens"], p["psnr"], p["ssim"]]
            for p in points if p["model"] in ("dtf-trained", "fixed-rate")]
    ctx.console.print(table(f"{data['description']}: equal training cost ({steps} steps each)",
                            ["model", "setting", "tokens", "PSNR", "SSIM"], rows))
    if eq:
        if eq["saving_psnr"]:
            ctx.console.print(f"DTF reaches the fixed-rate PSNR ({eq['fixed_psnr']:.2f} dB at {eq['fixed_tokens']:.0f} "
                              f"tokens) with {eq['dtf_tokens_at_fixed_psnr']:.0f} tokens: "
                              f"[bold]{eq['saving_psnr']:.2f}× fewer[/]")
        else:
            ctx.console.print(f"DTF does not reach the fixed-rate PSNR ({eq['fixed_psnr']:.2f} dB): its best is "
                              f"{eq['dtf_best_psnr']:.2f} dB")
    if summary["saving_vs_random"]:
        ctx.console.print(f"on {ctx.model_label}, DTF matches random's PSNR with "
                          f"[bold]{summary['saving_vs_random']:.2f}× fewer[/] tokens (median over budgets)")


def plot(result: dict[str, Any], path: Any) -> Any:
    from matplotlib.figure import Figure

    sets = result["sets"]
    figure = Figure(figsize=(11, 4.2 * len(sets)), dpi=100, layout="constrained")
    axes = figure.subplots(len(sets), 2, squeeze=False)
    styles = {("shipped", "dtf"): dict(color="C0", marker="o", label="DTF"),
              ("shipped", "topk"): dict(color="C1", marker="^", label="top-k (fixed k)"),
              ("shipped", "random"): dict(color="C2", marker="s", label="random k"),
              ("shipped", "raster"): dict(color="C3", marker="v", label="raster k"),
              ("dtf-trained", "dtf"): dict(color="C4", marker="o", linestyle="--", label="DTF-trained (short), DTF"),
              ("fixed-rate", "dtf"): dict(color="C5", marker="x", linestyle=":", label="fixed-rate-trained, DTF")}
    for row, (key, data) in enumerate(sets.items()):
        points = data["points"]
        for col, metric in enumerate(("psnr", "ssim")):
            ax = axes[row][col]
            for (model, name), style in styles.items():
                chosen = _select(points, model, name)
                if chosen and not (model == "dtf-trained" and result["models"]["dtf-trained"].get("trained_here") is False):
                    xs, ys = curve(chosen, metric)
                    ax.plot(xs, ys, **style)
            for model, marker, colour in (("shipped", "*", "C0"), ("dtf-trained", "P", "C4"), ("fixed-rate", "D", "k")):
                a = _select(points, model, "all")
                if a:
                    ax.plot([a[0]["mean_tokens"]], [a[0][metric]], marker=marker, color=colour, markersize=10,
                            linestyle="none", label=f"{model}: all tokens")
            ax.set_xlabel("patch tokens per image (mean)")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"{data['description']}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    return save_figure(figure, path)


if __name__ == "__main__":
    raise SystemExit(standalone(run, DESCRIPTION))
