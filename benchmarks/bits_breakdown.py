"""Where a token set's bits go, and what an entropy coder would save on them (a measurement).

    python benchmarks/bits_breakdown.py --out runs/bits_breakdown.json   # the default tokenizer, ~4 min

TaTok counts a rate the plain way (``tatok_core/contract/bitrate.py``): every code at log2 V, the kept
positions by an enumerative code (log2(N + 1) + log2 C(N, k)). This benchmark measures two codes a real
coder could use instead, **fitted on the training photos and scored on the held-out photos**:

* codes: a static table of code frequencies (add-½), factorised over the quantizer's ``code_factors``
  (one small table per FSQ channel) or joint (one entry per code) — tables the model would ship;
* positions: a context-adaptive binary code of the keep mask in raster order, the context being how
  many of the four causal neighbours (W, NW, N, NE) were kept, each context's probability learnt as the
  mask is coded (Krichevsky–Trofimov). Its length has a closed form in each context's counts, which an
  arithmetic coder reaches within 2 bits; nothing is fitted, so it needs no training photos.

The masks are the model's own filter with one threshold of its rule for the held-out set at each mean
kept fraction (as ``operating_point.py``'s ``own@f``). With ``--operating-point`` (that benchmark's JSON
for the same model and photos) it also says what the every-token point would score against JPEG at the
same bpp if its codes were sent with the joint tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # ``python benchmarks/bits_breakdown.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import environment, interp_y, invocation, write_json  # noqa: E402
from tatok_core.contract.bitrate import token_bits  # noqa: E402
from benchmarks.operating_point import load_photos  # noqa: E402
from tatok_core.contract.interfaces import mixed_radix_digits  # noqa: E402
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer  # noqa: E402
from tatok_core.workflows.inference import evaluating  # noqa: E402
from tatok_core.workflows.rate_control import calibrate_bits  # noqa: E402


def kt_code_bits(zeros: Tensor, ones: Tensor) -> Tensor:
    """Length in bits of an adaptive Krichevsky–Trofimov code of a binary sequence with these counts
    (order-free: log2 of Γ(n+1)·π / (Γ(n0+½)·Γ(n1+½)))."""
    n0, n1 = zeros.double(), ones.double()
    nats = torch.lgamma(n0 + n1 + 1) + math.log(math.pi) - torch.lgamma(n0 + 0.5) - torch.lgamma(n1 + 0.5)
    return nats / math.log(2)


def mask_context_bits(keep: Tensor, grid: tuple[int, int]) -> float:
    """Bits of one (N,) keep mask coded in raster order, context = kept count among W, NW, N, NE."""
    kept = keep.reshape(1, 1, *grid).double()  # (1, 1, gh, gw)
    padded = F.pad(kept, (1, 1, 1, 0))  # one row above, one column each side: outside counts as dropped
    context = (padded[..., 1:, :-2] + padded[..., :-1, :-2] + padded[..., :-1, 1:-1] + padded[..., :-1, 2:]).long()
    ones = torch.bincount(context[kept.bool()], minlength=5)  # (5,)
    total = torch.bincount(context.flatten(), minlength=5)  # (5,)
    return float(kt_code_bits(total - ones, ones).sum())


def table_bits(fit: Tensor, score: Tensor, factors: Sequence[int]) -> dict[str, float]:
    """Mean bits per code of ``score`` under add-½ tables fitted on ``fit``: uniform, factorised, joint."""
    size = math.prod(factors)
    digits_fit, digits_score = mixed_radix_digits(fit, tuple(factors)), mixed_radix_digits(score, tuple(factors))
    factorised = torch.zeros(score.numel(), dtype=torch.float64)
    for channel, factor in enumerate(factors):
        counts = torch.bincount(digits_fit[:, channel], minlength=factor).double() + 0.5  # (factor,)
        factorised -= torch.log2(counts / counts.sum())[digits_score[:, channel]]
    counts = torch.bincount(fit, minlength=size).double() + 0.5  # (V,)
    joint = -torch.log2(counts / counts.sum())[score]
    return {"uniform": math.log2(size), "factorised": float(factorised.mean()), "joint": float(joint.mean())}


def jpeg_gap_with_tables(operating_point: Path, label: str, patch_bits: float, global_bits: float) -> dict:
    """Every token − JPEG at the same bpp per photo, with the counted bits and with the codes at the given
    bits per code (the photos where JPEG reaches that rate; ``operating_point.py``'s JSON and curves)."""
    run = json.loads(operating_point.read_text())
    if label not in run["models"]:
        raise SystemExit(f"{operating_point}: no model {label!r} (has {sorted(run['models'])})")
    model, curves = run["models"][label], run["codecs"]["jpeg"]["per_photo"]
    counted, coded = [], []
    for row in (r for r in model["rows"] if r["point"] == "all"):
        curve = sorted(curves[row["photo"]], key=lambda q: q["bpp"])
        xs, ys = [q["bpp"] for q in curve], [q["psnr"] for q in curve]
        pixels = row["bits"] / row["bpp"]
        bpp = (row["kept"] * patch_bits + row["num_global"] * global_bits) / pixels
        for rate, gaps in ((row["bpp"], counted), (bpp, coded)):
            jpeg = interp_y(xs, ys, rate)
            if jpeg is not None:
                gaps.append(row["psnr"] - jpeg)
    return {"counted": sum(counted) / max(len(counted), 1), "counted_photos": len(counted),
            "tables": sum(coded) / max(len(coded), 1), "tables_photos": len(coded)}


def analyse_set(model: Tokenizer, data: str, side: int) -> list:
    """Per photo the model's analysis (codes, bits, grid), photos fitted to the longest side."""
    with evaluating(model):
        return [model.analyse(photo.image[None]) for photo in load_photos(data, side)]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_PRETRAINED, help="shipped name or model folder")
    parser.add_argument("--train-data", default="builtin:photos:extended", help="photos the tables are fitted on")
    parser.add_argument("--heldout-data", default="builtin:photos:extended:heldout", help="photos they are scored on")
    parser.add_argument("--side", type=int, default=256, help="longest side of every photo")
    parser.add_argument("--fractions", default="0.2,0.25,0.35,0.5", help="mean kept fractions of the masks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--operating-point", type=Path, help="operating_point.py's JSON: the JPEG gap with the tables")
    parser.add_argument("--label", help="the model's label in that JSON (default: --model)")
    parser.add_argument("--out", type=Path, default=Path("runs/bits_breakdown.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Tokenizer.from_pretrained(args.model)
    factors = tuple(model.quantizer.code_factors)
    codes_only = model.with_component("entropy", "pixel")  # codes do not depend on the estimator: a cheap pass
    fitted = analyse_set(codes_only, args.train_data, args.side)
    heldout = analyse_set(model, args.heldout_data, args.side)
    patch_fit = torch.cat([a.patches.codes.flatten() for a in fitted])
    global_fit = torch.cat([a.globals_.codes.flatten() for a in fitted])
    patch_score = torch.cat([a.patches.codes.flatten() for a in heldout])
    global_score = torch.cat([a.globals_.codes.flatten() for a in heldout])
    report: dict = {
        "command": invocation(__file__, argv),
        "model": args.model, "environment": environment(),
        "photos": {"fitted": len(fitted), "scored": len(heldout)},
        "patch_code_bits": table_bits(patch_fit, patch_score, factors),
        "global_code_bits": table_bits(global_fit, global_score, factors),
        "positions": [],
    }
    bits = [a.entropy.bits.detach().cpu() for a in heldout]
    own = model.token_filter()
    for fraction in (float(f) for f in args.fractions.split(",")):
        target = fraction * sum(b.shape[1] for b in bits) / len(bits)
        threshold = calibrate_bits(own, bits, target, tol=1.0).threshold
        enumerative, context, kept = [], [], []
        for analysis, photo_bits in zip(heldout, bits):
            selection = own.select(photo_bits, threshold)
            counted = token_bits(selection.lengths, selection.num_patches, 0, 1, analysis.image_size)
            enumerative.append(float(counted.side[0]))  # the side bits TaTok counts
            context.append(mask_context_bits(selection.keep[0], tuple(analysis.grid)))
            kept.append(int(selection.lengths[0]))
        report["positions"].append({
            "fraction": fraction, "mean_kept": sum(kept) / len(kept),
            "enumerative_bits": sum(enumerative) / len(enumerative), "context_bits": sum(context) / len(context),
        })
    if args.operating_point:
        report["all_minus_jpeg"] = jpeg_gap_with_tables(args.operating_point, args.label or args.model,
                                                        report["patch_code_bits"]["joint"],
                                                        report["global_code_bits"]["joint"])
    write_json(args.out, report)
    patch, glob = report["patch_code_bits"], report["global_code_bits"]
    print(f"patch codes, bits per code: uniform {patch['uniform']:.2f}, factorised {patch['factorised']:.2f}, "
          f"joint {patch['joint']:.2f}; globals: factorised {glob['factorised']:.2f}, joint {glob['joint']:.2f}")
    for row in report["positions"]:
        print(f"positions at {row['fraction']:.0%} (k = {row['mean_kept']:.0f}): enumerative "
              f"{row['enumerative_bits']:.0f} bits, context {row['context_bits']:.0f} bits per photo")
    if "all_minus_jpeg" in report:
        gap = report["all_minus_jpeg"]
        print(f"every token − JPEG at the same bpp: {gap['counted']:+.2f} dB counted ({gap['counted_photos']} photos), "
              f"{gap['tables']:+.2f} dB with the joint tables ({gap['tables_photos']} photos)")
    print(f"→ {args.out}")
    return report


if __name__ == "__main__":
    main()
