"""Markdown tables from `tatok eval -o DIR` records: RD with bits per pixel, kept count vs complexity, paired vs topk.

    python -m benchmarks.claims.eval_tables runs/amount/crops/rate_distortion.json [more.json …]

Model-agnostic: it reads only what `tatok eval` wrote (any --model), so rerunning the eval on a new model and
this script regenerates the docs/results.md tables.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.claims.report import md_table
from tatok_core.workflows.allocation import allocates


def _where(record: dict[str, Any]) -> str:
    if record.get("whole"):
        side = record.get("longest_side")
        return f"{record['images']} whole photos" + (f", longest side {side}" if side else "")
    return f"{record['images']} crops of {record['crop']}²"


def tables(record: dict[str, Any]) -> str:
    """The three tables of one eval record, under a heading naming the data and the model."""
    points = record["points"]
    rho = {(r["filter"], r["setting"], r["matched"]): r for r in record["allocation"]["spearman"]}
    rows = []
    for p in points:
        r = rho.get((p["filter"], p["setting"], p["matched"]), {}) if allocates(p["per_image"]["tokens"]) else {}
        kept = p["per_image"]["tokens"]
        rows.append([p["filter"], p["setting"], (p["matched"] or "").removeprefix("tau="), p["mean_tokens"],
                     f"{min(kept):.0f}–{max(kept):.0f}",
                     *(f"{p[key]:.3f}" for key in ("bpp", "bpp_codes", "bpp_globals", "bpp_side")), p["psnr"],
                     f"{p['ssim']:.3f}", r.get("jpeg_bpp"), r.get("mean_gradient")])
    out = [f"**{record['data']}, {_where(record)}** — model `{record['model']}` (filter `{record['model_filter']}`)", "",
           md_table(["method", "setting", "at τ", "tokens", "range", "bpp", "codes", "globals", "positions", "PSNR", "SSIM",
                     "ρ JPEG", "ρ grad"], rows, left=3), ""]
    paired = [[d["filter"], d["setting"], d["matched"].removeprefix("tau="), d["tokens"], d["psnr_mean"], d["psnr_median"],
               f"{d['psnr_wins']}/{d['psnr_images']}"] for d in record["allocation"]["paired"]
              if d["filter"] not in ("random", "raster")]
    out += ["Per-image PSNR minus topk at the same matched count (dB):", "",
            md_table(["method", "setting", "at τ", "Δ tokens", "mean", "median", "wins"], paired, left=3), ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="rate_distortion.json files written by `tatok eval -o`")
    args = parser.parse_args(argv)
    print("\n".join(tables(json.loads(path.read_text())) for path in args.records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
