"""Claim 2 — why global tokens: information insufficiency and redundancy of patch tokens.

**Insufficiency** (global + patch vs patch-only). The recipe trained twice at the same step budget: as
is (M global tokens + patch tokens) and with ``global_tokenizer = "none"`` (patch tokens only; its
encoder gets the global tokenizer's transformer blocks so both quantize features of equal depth). They
are compared at equal **total** token count T — globals count as tokens: the global model keeps T − M
patch tokens, the patch-only model T, each chosen by its own DTF (τ calibrated per budget).

**Redundancy**, on the model under test with its weights frozen:

* *Conditional entropy.* Two entropy priors of the model's own kind are trained from the same
  initialisation, for the same steps, on the same cached codes of training crops: one sees the quantized
  global tokens (``entropy.condition_on_globals = true``), one sees only positions (``false``). Their
  cross-entropy on held-out images, in bits per patch token, estimates H(patch | globals, position) and
  H(patch | position); the difference is what the globals explain. The code itself has
  log2(codebook size) bits.
* *Dropping tokens.* PSNR as tokens are dropped lowest-entropy first (``topk`` and DTF), at random, or
  highest-entropy first (``bottomk``), at equal kept fractions, with the share of the bits dropped.

Floor (printed, not asserted): global + patch ≥ patch-only at equal total tokens (mean PSNR gap ≥ 0).

    python -m benchmarks.claims.ablations [--quick|--full] [--model tatok-tiny] [--out runs/claims]
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.claims.common import (
    Analysed,
    Context,
    analyse,
    calibrate,
    adaptive_filter,
    environment,
    floor,
    heldout_crops,
    load_photos,
    model_facts,
    point,
    random_scores,
    rank_select,
    save_figure,
    score,
    standalone,
    table,
    write_json,
)
from tatok_core.workflows.data import ImageSource, RandomCrops, batches, fixed_crops
from tatok_core.contract.interfaces import EntropyContext
from tatok_core.pipeline.tokenizer import Tokenizer

DESCRIPTION = "Claim 2: information insufficiency (global vs patch-only) and redundancy of patch tokens"
DROP_ORDERS = ("dtf", "topk", "random", "bottomk")


# -- insufficiency ---------------------------------------------------------------------------------
def equal_total_points(model: Tokenizer, label: str, analysed: Analysed, totals: Sequence[float]) -> list[dict[str, Any]]:
    """DTF at each total budget T = fraction · N: the model keeps T − M patch tokens on average."""
    n, m = analysed.mean_patches, model.num_global
    dtf = adaptive_filter(model)
    points = []
    for fraction in totals:
        total = fraction * n
        if total - m < 1:
            continue
        tau = calibrate(model, analysed, total - m)
        if tau is None:
            continue
        p = point(score(model, analysed, lambda b: dtf.select(b.bits, tau)), model=label, filter="dtf",
                  budget=fraction, tau=tau, num_global=m)
        p["total_tokens"] = p["mean_tokens"] + m
        points.append(p)
    keep_all = model.baseline_filter("keep-all")
    p = point(score(model, analysed, lambda b: keep_all.select(b.bits)), model=label, filter="all", budget=None, num_global=m)
    p["total_tokens"] = p["mean_tokens"] + m
    points.append(p)
    return points


def insufficiency(ctx: Context, sets: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    s = ctx.settings
    glob, glob_info = ctx.variant("dtf")
    patch, patch_info = ctx.variant("patch-only")
    out: dict[str, Any] = {"models": {"global+patch": {**glob_info, "num_global": glob.num_global},
                                      "patch-only": {**patch_info, "num_global": patch.num_global}}, "sets": {}}
    for key, (description, images) in sets.items():
        a_glob, a_patch = analyse(glob, images, s.batch_size), analyse(patch, images, s.batch_size)
        points = equal_total_points(glob, "global+patch", a_glob, s.total_budgets)
        points += equal_total_points(patch, "patch-only", a_patch, s.total_budgets)
        gaps = []
        for g in (p for p in points if p["model"] == "global+patch" and p["filter"] == "dtf"):
            q = next((p for p in points if p["model"] == "patch-only" and p["budget"] == g["budget"]), None)
            if q is not None:
                gaps.append({"budget": g["budget"], "total_tokens": g["total_tokens"], "patch_only_tokens": q["total_tokens"],
                             "psnr_gap": g["psnr"] - q["psnr"], "ssim_gap": g["ssim"] - q["ssim"]})
        out["sets"][key] = {"description": description, "mean_patches": a_glob.mean_patches, "points": points, "gaps": gaps,
                            "mean_psnr_gap": float(np.mean([g["psnr_gap"] for g in gaps])) if gaps else None,
                            "mean_ssim_gap": float(np.mean([g["ssim_gap"] for g in gaps])) if gaps else None}
        rows = []
        for g in gaps:
            gp = next(p for p in points if p["model"] == "global+patch" and p["budget"] == g["budget"])
            pp = next(p for p in points if p["model"] == "patch-only" and p["budget"] == g["budget"])
            rows.append([f"{g['budget']:.0%}", g["total_tokens"], gp["psnr"], pp["psnr"], g["psnr_gap"], gp["ssim"], pp["ssim"]])
        for label in ("global+patch", "patch-only"):
            a = next(p for p in points if p["model"] == label and p["filter"] == "all")
            rows.append([f"all ({label})", a["total_tokens"], a["psnr"] if label == "global+patch" else None,
                         a["psnr"] if label == "patch-only" else None, None, None, None])
        ctx.console.print(table(f"insufficiency, {description}: equal total tokens (M = {glob.num_global} globals "
                                f"count as tokens), {glob_info['steps']} training steps each",
                                ["total / N", "total tokens", "global+patch", "patch-only", "gap dB",
                                 "SSIM g+p", "SSIM patch"], rows))
    return out


# -- redundancy: conditional entropy -----------------------------------------------------------------
@torch.no_grad()
def cache_features(model: Tokenizer, images: Tensor, batch_size: int) -> dict[str, Any]:
    """Quantized global vectors and patch codes of ``images`` (same size) from the frozen model."""
    glob, codes = [], []
    grid = None
    for chunk in images.split(batch_size):
        a = model.analyse(chunk)
        glob.append(a.globals_.vectors.float())
        codes.append(a.patches.codes)
        grid = a.grid
    return {"globals": torch.cat(glob), "codes": torch.cat(codes), "grid": grid}


def _context(features: dict[str, Any], rows: Tensor | slice) -> EntropyContext:
    g, c = features["globals"][rows], features["codes"][rows]
    empty = g.new_zeros(g.shape[0], 0)
    return EntropyContext(empty, features["grid"], g, empty.long(), g.new_zeros(c.shape[0], c.shape[1], 0), c)


@torch.no_grad()
def cross_entropy(prior: torch.nn.Module, features: dict[str, Any], batch_size: int = 64) -> float:
    """Mean bits per patch token of the prior on cached features."""
    prior.eval()
    total, count = 0.0, 0
    for start in range(0, len(features["codes"]), batch_size):
        rows = slice(start, start + batch_size)
        estimate = prior(_context(features, rows))
        n = features["codes"][rows].numel()
        total += float(estimate.loss) * n
        count += n
    return total / max(count, 1)


def _rows(features: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    return {"globals": features["globals"][rows], "codes": features["codes"][rows], "grid": features["grid"]}


def train_prior(model: Tokenizer, features: dict[str, Any], condition_on_globals: bool, steps: int,
                batch: int, lr: float, seed: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """A fresh prior of the model's entropy kind (same options) trained on frozen cached features.

    A tenth of the cached training crops is held back as validation; the weights with the lowest
    validation bits (checked ten times per run) are kept, so neither prior wins by memorising crops.
    """
    spec = model.spec.updated({}, {"entropy.condition_on_globals": condition_on_globals})
    torch.manual_seed(seed)
    prior = Tokenizer(spec).entropy.train()
    count = len(features["codes"])
    split = max(1, count // 10) if count > 1 else 0
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    validation = _rows(features, order[:split]) if split else features
    train_rows = order[split:]
    optimizer = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, steps)))))
    g = torch.Generator().manual_seed(seed)
    every = max(1, steps // 10)
    best = (math.inf, 0, {k: v.detach().clone() for k, v in prior.state_dict().items()})
    losses: list[float] = []
    for step in range(1, steps + 1):
        rows = train_rows[torch.randint(len(train_rows), (min(batch, len(train_rows)),), generator=g)]
        loss = prior(_context(features, rows)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            bits = cross_entropy(prior, validation)
            prior.train()
            if bits < best[0]:
                best = (bits, step, {k: v.detach().clone() for k, v in prior.state_dict().items()})
    prior.load_state_dict(best[2])
    tail = losses[-max(1, len(losses) // 10):]
    return prior.eval(), {"train_bits": float(np.mean(tail)) if tail else math.nan, "validation_bits": best[0],
                          "best_step": best[1]}


def conditional_entropy(ctx: Context, photos: list[Tensor]) -> dict[str, Any]:
    s, model = ctx.settings, ctx.model
    out: dict[str, Any] = {"code_bits": math.log2(model.quantizer.codebook_size), "num_global": model.num_global,
                           "entropy": model.spec.entropy.name}
    if model.spec.entropy.name != "prior" or model.num_global == 0:
        out["skipped"] = "needs a model with global tokens and the 'prior' entropy estimator"
        ctx.console.print(f"[yellow]conditional entropy skipped: {out['skipped']}")
        return out
    crop = ctx.recipe.train.crop
    start = time.perf_counter()
    stream = RandomCrops(ImageSource("builtin:photos").images, crop, seed=s.seed + 1)
    train_images = next(batches(stream, s.prior_crops))
    train_features = cache_features(model, train_images, s.batch_size)
    eval_sets = {
        f"crops {crop}×{crop}": torch.stack([c for c in fixed_crops(ImageSource("builtin:photos:heldout").images, crop,
                                                                      4 * s.crops, seed=s.seed)]),
        f"crops {s.crop}×{s.crop}": heldout_crops(s),
    }
    eval_features = {k: cache_features(model, v, s.batch_size) for k, v in eval_sets.items()}
    for i, photo in enumerate(photos):  # whole photos differ in size: one "set" per photo, averaged below
        eval_features[f"photo {i}"] = cache_features(model, photo[None], 1)
    priors = {}
    for label, flag in (("with_globals", True), ("without_globals", False)):
        prior, record = train_prior(model, train_features, flag, s.prior_steps, s.prior_batch, ctx.recipe.train.lr, s.seed)
        priors[label] = {**record, "module": prior}
    shipped = model.entropy
    rows = {}
    for key, features in eval_features.items():
        rows[key] = {label: cross_entropy(p["module"], features) for label, p in priors.items()}
        rows[key]["shipped_prior"] = cross_entropy(shipped, features)
    sets: dict[str, dict[str, float]] = {k: v for k, v in rows.items() if not k.startswith("photo ")}
    photo_rows = [v for k, v in rows.items() if k.startswith("photo ")]
    if photo_rows:
        sets["whole photos"] = {label: float(np.mean([r[label] for r in photo_rows])) for label in photo_rows[0]}
    for values in sets.values():
        values["explained_bits"] = values["without_globals"] - values["with_globals"]
        values["explained_share"] = values["explained_bits"] / values["without_globals"] if values["without_globals"] else None
    out.update({
        "train_crop": crop, "train_crops": s.prior_crops, "steps": s.prior_steps, "seconds": time.perf_counter() - start,
        "training": {label: {k: v for k, v in p.items() if k != "module"} for label, p in priors.items()}, "sets": sets,
    })
    ctx.console.print(table(
        f"redundancy: bits per patch token (code = {out['code_bits']:.0f} bits), priors trained {s.prior_steps} steps "
        f"on {s.prior_crops} frozen-model training crops",
        ["held-out set", "H(patch | globals, pos)", "H(patch | pos)", "explained by globals", "share", f"{ctx.model_label} prior"],
        [[k, v["with_globals"], v["without_globals"], v["explained_bits"], None if v["explained_share"] is None
          else f"{v['explained_share']:.1%}", v["shipped_prior"]] for k, v in sets.items()]))
    return out


# -- redundancy: dropping tokens -------------------------------------------------------------------------
def drop_points(model: Tokenizer, analysed: Analysed, fractions: Sequence[float], seed: int) -> list[dict[str, Any]]:
    """PSNR at each kept fraction for each drop order (per image k = round(fraction · N))."""
    dtf = adaptive_filter(model)
    points = []
    for fraction in fractions:
        def counts(b: Any, f: float = fraction) -> Tensor:
            return torch.full((b.bits.shape[0],), round(f * b.num_patches), dtype=torch.int64)

        choosers = {
            "topk": lambda b: rank_select(b.bits, counts(b)),
            "random": lambda b: rank_select(random_scores(b.bits, seed), counts(b)),
            "bottomk": lambda b: rank_select(-b.bits, counts(b)),
        }
        tau = calibrate(model, analysed, fraction * analysed.mean_patches)
        if tau is not None:
            choosers["dtf"] = lambda b: dtf.select(b.bits, tau)
        for order in DROP_ORDERS:
            if order in choosers:
                points.append(point(score(model, analysed, choosers[order]), order=order, fraction=fraction,
                                    tau=tau if order == "dtf" else None))
    return points


def dropping(ctx: Context, sets: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    s = ctx.settings
    out: dict[str, Any] = {"orders": {"dtf": "DTF, τ calibrated to the mean fraction (adaptive per image)",
                                      "topk": "lowest-entropy tokens dropped first", "random": "random tokens dropped",
                                      "bottomk": "highest-entropy tokens dropped first"}, "sets": {}}
    for key, (description, images) in sets.items():
        if key == "photos" and not s.drop_on_photos:
            continue
        analysed = analyse(ctx.model, images, s.batch_size)
        points = drop_points(ctx.model, analysed, s.drop_fractions, s.seed)
        every = [p["psnr"] for p in points if p["order"] == "topk" and p["fraction"] == 1.0]  # = every token kept
        for p in points:
            p["psnr_drop"] = (every[0] - p["psnr"]) if every else None
        out["sets"][key] = {"description": description, "points": points}
        rows = []
        for fraction in s.drop_fractions:
            at = {p["order"]: p for p in points if p["fraction"] == fraction}
            rows.append([f"{fraction:.0%}", *[at[o]["psnr"] if o in at else None for o in DROP_ORDERS],
                         *[1 - at[o]["bits_kept"] if o in at else None for o in ("topk", "random", "bottomk")]])
        ctx.console.print(table(f"redundancy, {description}: PSNR as tokens are dropped (model {ctx.model_label})",
                                ["kept", "DTF", "low-entropy dropped (topk)", "random dropped", "high-entropy dropped",
                                 "bits dropped topk", "random", "bottomk"], rows))
    return out


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    crops = heldout_crops(s)
    names, photos = load_photos(s)
    sets = {"crops": (f"{len(crops)} held-out crops {s.crop}×{s.crop}", crops),
            "photos": (f"{len(photos)} held-out photos, longest side {s.photo_side}", photos)}
    ctx.console.rule("[bold]ablations")
    result: dict[str, Any] = {"part": "ablations", "mode": s.mode, "environment": environment(),
                              "model": model_facts(ctx.model, ctx.model_label)}
    result["insufficiency"] = insufficiency(ctx, sets)
    result["conditional_entropy"] = conditional_entropy(ctx, photos)
    result["dropping"] = dropping(ctx, sets)
    result["floors"] = [
        floor(f"global+patch ≥ patch-only at equal total tokens ({key})", data["mean_psnr_gap"], 0.0,
              f"mean PSNR gap (dB) over {len(data['gaps'])} budgets")
        for key, data in result["insufficiency"]["sets"].items()
    ]
    write_json(ctx.out_dir / "ablations.json", result)
    plot(result, ctx.out_dir / "ablations.png")
    return result


def plot(result: dict[str, Any], path: Any) -> Any:
    from matplotlib.figure import Figure

    insufficiency_sets = result["insufficiency"]["sets"]
    drop_sets = result["dropping"]["sets"]
    panels = len(insufficiency_sets) + len(drop_sets) + 1
    nrows = 1 if panels <= 3 else 2
    ncols = -(-panels // nrows)
    figure = Figure(figsize=(5.5 * ncols, 4.4 * nrows), dpi=100, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_axis_off()
    i = 0
    for data in insufficiency_sets.values():
        ax = axes[i]
        for label, colour in (("global+patch", "C0"), ("patch-only", "C3")):
            pts = sorted((p for p in data["points"] if p["model"] == label and p["filter"] == "dtf"), key=lambda p: p["total_tokens"])
            ax.plot([p["total_tokens"] for p in pts], [p["psnr"] for p in pts], marker="o", color=colour, label=f"{label} (DTF)")
            a = [p for p in data["points"] if p["model"] == label and p["filter"] == "all"]
            ax.plot([a[0]["total_tokens"]], [a[0]["psnr"]], marker="*", markersize=10, color=colour, linestyle="none",
                    label=f"{label}: all tokens")
        ax.set_xlabel("total tokens per image (globals + patches)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"insufficiency: {data['description']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        i += 1
    for data in drop_sets.values():
        ax = axes[i]
        for order, colour in zip(DROP_ORDERS, ("C0", "C1", "C2", "C3")):
            pts = sorted((p for p in data["points"] if p["order"] == order), key=lambda p: p["fraction"])
            ax.plot([p["fraction"] for p in pts], [p["psnr"] for p in pts], marker="o", color=colour,
                    label=result["dropping"]["orders"][order])
        ax.set_xlabel("fraction of patch tokens kept")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"redundancy: {data['description']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        i += 1
    ax = axes[i]
    ce = result["conditional_entropy"]
    if "sets" in ce:
        labels = list(ce["sets"])
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [ce["sets"][k]["without_globals"] for k in labels], 0.4, label="H(patch | position)", color="C3")
        ax.bar(x + 0.2, [ce["sets"][k]["with_globals"] for k in labels], 0.4, label="H(patch | globals, position)", color="C0")
        ax.axhline(ce["code_bits"], color="k", linestyle=":", label=f"code: {ce['code_bits']:.0f} bits")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("bits per patch token (held-out)")
        ax.legend(fontsize=7)
    ax.set_title("redundancy: what the global tokens explain", fontsize=9)
    return save_figure(figure, path)


if __name__ == "__main__":
    raise SystemExit(standalone(run, DESCRIPTION))
