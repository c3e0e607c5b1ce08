"""Selections the decoder could make itself: what dropping the position bits would buy, and cost.

    python benchmarks/decoder_side_selection.py --data builtin:photos:extended --limit 12 --out runs/decoder_side

A file says which positions are kept (the keep flags: ~19 % of the default's file). If the decoder could
rank the positions itself, from what it already has, a file would carry only each image's count. The
ranking then cannot read the image: the model's ``chain`` ranking measures the decode's error at probe
counts and reranks, so it cannot be reproduced. Measured here, per photo and at each kept fraction
(top-k, the same count for every photo), with the model's encoder tokens:

* ``chain`` — the model's ranking; its file codes the keep flags (the coding prior's bits, all parts);
* ``detail`` — decoder-side: the coverage order (the model's own ``coverage`` rings and decay) of the
  globals-only decode's detail (mean squared gradient per patch), which the decoder computes first;
* ``seeded`` — decoder-side: a random order from a seed both sides know;
* ``static-error`` — not decoder-side, a bound for any static ranking: the coverage order of the globals-only
  decode's *true* error, never reranked (what a perfect predictor of that error would give).

A decoder-side file costs the prior's bits less its keep flags' plus log2(N + 1) bits for the count.
Top-k at low fractions is a poor use of the chain ranking (a few tokens decode below globals only; the
model's shared θ keeps none on some photos), so the orders are compared at equal mean bits with the
best per-photo choice among each order's measured points, globals only included — the same allocation
for every order.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor

if __package__ in (None, ""):  # ``python benchmarks/decoder_side_selection.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import photo_run, save_record, table  # noqa: E402
from benchmarks.coded_rate import coded_bits  # noqa: E402
from benchmarks.operating_point import load_photos  # noqa: E402
from tatok_core.contract.interfaces import Grid  # noqa: E402
from tatok_core.contract.selection import Selection  # noqa: E402
from tatok_core.pipeline.tokenizer import Tokenizer, pretrained_folder  # noqa: E402
from tatok_core.workflows import generation  # noqa: E402
from tatok_core.workflows.allocation import oracle_allocation  # noqa: E402
from tatok_core.workflows.analysis import Analysed  # noqa: E402
from tatok_core.workflows.compression import CODING_PRIOR  # noqa: E402
from tatok_core.workflows.metrics import psnr  # noqa: E402
from tatok_core.workflows.progress import progress_bar  # noqa: E402
from tatok_plugins.entropy_chain import coverage_order  # noqa: E402
from tatok_plugins.entropy_residual import patch_squared_error  # noqa: E402

DECODER_SIDE = ("detail", "seeded")
BPP_UNIT = 1e-5  # the allocation's resolution in bits per pixel
ORDERS = ("chain", *DECODER_SIDE, "static-error")


def patch_detail(image: Tensor, patch_size: int) -> Tensor:
    """(B, N) mean squared horizontal + vertical gradient of the grey image (B, C, H, W) per patch."""
    grey = image.mean(1, keepdim=True)  # (B, 1, H, W)
    across = F.pad((grey[..., :, 1:] - grey[..., :, :-1]) ** 2, (0, 1))  # (B, 1, H, W)
    down = F.pad((grey[..., 1:, :] - grey[..., :-1, :]) ** 2, (0, 0, 0, 1))  # (B, 1, H, W)
    return F.avg_pool2d(across + down, patch_size).flatten(1)


def orders(model: Tokenizer, padded: Tensor, base: Tensor, bits: Tensor, grid: Grid, seed: int) -> dict[str, Tensor]:
    """(N,) each ranking of one image's positions, best first."""
    n = bits.shape[1]
    kernel = getattr(model.entropy, "kernel", None)
    if kernel is None:
        raise SystemExit(f"{model.spec.entropy.name!r} estimator without coverage rings: this compares coverage orders")
    nothing = torch.zeros(1, n, dtype=torch.bool)

    def covered(worth: Tensor) -> Tensor:  # (1, N) → (N,)
        return coverage_order(worth.float(), nothing, n, grid, kernel)[0]

    return {"chain": bits[0].argsort(descending=True, stable=True),
            "detail": covered(patch_detail(base, model.patch_size)),
            "seeded": torch.randperm(n, generator=torch.Generator().manual_seed(seed)),
            "static-error": covered(patch_squared_error(padded, base, model.patch_size))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tatok-small8-covered")
    parser.add_argument("--prior", type=Path, default=None, help="coding prior folder (default: the model's shipped one)")
    parser.add_argument("--data", default="builtin:photos:extended")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.25,0.35,0.5,0.75,1")
    parser.add_argument("--seed", type=int, default=0, help="the seeded order's seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("runs/decoder_side"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fractions = sorted({0.0, *(float(f) for f in args.fractions.split(","))})  # 0: globals only
    prior = generation.load_prior(args.prior or pretrained_folder(args.model) / CODING_PRIOR)
    model = Tokenizer.from_pretrained(args.model).eval()
    model.check_prior_models_codes(prior)
    photos = load_photos(args.data, args.side, args.limit)
    rows: dict[str, dict[str, list[dict[str, float]]]] = {o: {f"{f:g}": [] for f in fractions} for o in ORDERS}
    with progress_bar(args.progress) as bar:
        task = bar.add_task("decoder-side selection", total=len(photos))
        for photo in photos:
            image = photo.image[None]  # (1, C, H, W)
            with torch.no_grad():
                analysis = model.analyse(image)
            analysed = Analysed(analysis.globals_.codes, analysis.patches.codes, analysis.entropy.bits.float(),
                                analysis.grid, analysis.image_size)  # the encoder's tokens, for every set
            n = analysed.bits.shape[1]
            ranked = orders(model, analysis.images, analysis.base_reconstruction, analysed.bits, analysis.grid,
                            args.seed)
            for name, order in ranked.items():
                for fraction in fractions:
                    keep = torch.zeros(1, n, dtype=torch.bool)  # (1, N)
                    keep[0, order[:round(fraction * n)]] = True
                    tokens = analysed.tokens(Selection.from_mask(keep))
                    parts = coded_bits(prior, tokens)
                    bits = parts["total"] - parts["positions"] + math.log2(n + 1) if name in DECODER_SIDE else parts["total"]
                    with torch.no_grad():
                        quality = float(psnr(model.decode(tokens), image)[0])
                    rows[name][f"{fraction:g}"].append({"psnr": quality, "bpp": bits / photo.pixels,
                                                        "positions_bpp": parts["positions"] / photo.pixels})
            bar.advance(task)
    summary = summarise(rows, fractions)
    console = Console()
    for view, what in (("topk", "top-k: mean PSNR @ mean bpp per kept fraction"),
                       ("allocated", "allocated per photo at the chain's top-k bpp: mean PSNR")):
        header = ["order", *(f"{f:g}" for f in fractions)]
        body = [[name, *(f"{point['psnr']:.2f}" + (f" @ {point['bpp']:.3f}" if view == "topk" else "")
                         for point in summary[name][view].values())] for name in ORDERS]
        console.print(table(f"{args.model} on {len(photos)} photos of {args.data}, {args.side} px — {what}",
                            header, body))
    record = {**photo_run(__file__, argv, args, [p.name for p in photos]), "summary": summary, "rows": rows}
    return save_record(args.out / "decoder_side_selection.json", record)


def summarise(rows: dict[str, dict[str, list[dict[str, float]]]], fractions: list[float]) -> dict[str, dict[str, Any]]:
    """Per order: ``topk`` — mean PSNR and bpp at each fraction; ``allocated`` — at the chain's top-k mean bpp
    of each fraction, the best mean PSNR a per-photo choice among the order's measured points (globals only
    included) reaches at that mean bpp (:func:`oracle_allocation`: what a shared θ aims at, with the measured curves),
    the same treatment for every order, so the comparison is at equal bits."""
    targets = {key: float(np.mean([p["bpp"] for p in points])) for key, points in rows["chain"].items()}
    summary: dict[str, dict[str, Any]] = {}
    for name, by_fraction in rows.items():
        per_photo = list(zip(*by_fraction.values()))  # photo → its points, one per fraction
        rates = [[p["bpp"] for p in points] for points in per_photo]
        quality = [[p["psnr"] for p in points] for points in per_photo]
        allocated = {}
        for key, target in targets.items():
            choice = oracle_allocation(rates, quality, target, unit=BPP_UNIT)
            allocated[key] = {"bpp": float(np.mean([r[j] for r, j in zip(rates, choice)])),
                              "psnr": float(np.mean([q[j] for q, j in zip(quality, choice)]))}
        summary[name] = {
            "topk": {key: {"psnr": float(np.mean([p["psnr"] for p in points])),
                           "bpp": float(np.mean([p["bpp"] for p in points])),
                           "positions_bpp": float(np.mean([p["positions_bpp"] for p in points]))}
                     for key, points in by_fraction.items()},
            "allocated": allocated}
    return summary


if __name__ == "__main__":
    main()
