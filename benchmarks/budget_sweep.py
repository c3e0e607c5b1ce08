"""Budgets calibrated over a set, one per percent: does any leave a photo under its globals-only picture?

    python benchmarks/budget_sweep.py --data builtin:photos:extended --limit 12 --out runs/budget_sweep

`tatok encode --budget` calibrates ONE θ for a set to within half a token of the mean count; the step
nearest the budget may stop one photo part-way down its ranking. Where a few kept tokens decode worse
than the globals alone (a dip: the decoder switches its canvas off around them), a stop inside the dip
leaves that photo under the picture its globals give for free. For each budget from ``--low`` to
``--high`` percent of the tokens (the encoder's tokens and the filter's sets, unsearched: the choice of count is what is measured) this
reports the set's mean PSNR, the kept fraction reached, and the photos more than ``--margin`` dB under
their globals-only decode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

if __package__ in (None, ""):  # ``python benchmarks/budget_sweep.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import photo_run, save_record, table  # noqa: E402
from benchmarks.operating_point import load_photos  # noqa: E402
from tatok_core.contract.selection import Selection  # noqa: E402
from tatok_core.pipeline.tokenizer import Tokenizer  # noqa: E402
from tatok_core.workflows.analysis import Analysed  # noqa: E402
from tatok_core.workflows.metrics import psnr  # noqa: E402
from tatok_core.workflows.rate_control import calibrate_bits  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tatok-small8-covered")
    parser.add_argument("--data", default="builtin:photos:extended")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--low", type=int, default=3, help="first budget, percent of the tokens")
    parser.add_argument("--high", type=int, default=30, help="last budget, percent of the tokens")
    parser.add_argument("--margin", type=float, default=0.5, help="dB under globals only that counts as under")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/budget_sweep"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Tokenizer.from_pretrained(args.model).eval()
    photos = load_photos(args.data, args.side, args.limit)
    with torch.no_grad():
        analysed = [Analysed.of(model, photo.image[None], refine_steps=0, search_sweeps=0) for photo in photos]
        nothing = [float(psnr(model.decode(a.tokens(Selection.from_mask(torch.zeros_like(a.bits, dtype=torch.bool)))),
                              photo.image[None])[0]) for photo, a in zip(photos, analysed)]
        bits = [a.bits for a in analysed]
        mean_tokens = float(np.mean([b.shape[1] for b in bits]))
        own = model.token_filter()
        budgets = []
        for percent in range(args.low, args.high + 1):
            rate = calibrate_bits(own, bits, percent / 100 * mean_tokens)
            quality = [float(psnr(model.decode(a.tokens(own.select(a.bits, rate.threshold))), photo.image[None])[0])
                       for photo, a in zip(photos, analysed)]
            under = {photo.name: round(q - alone, 2) for photo, q, alone in zip(photos, quality, nothing)
                     if q < alone - args.margin}
            budgets.append({"percent": percent, "fraction": rate.mean_tokens / mean_tokens,
                            "psnr": float(np.mean(quality)), "under_globals_only": under})
    body = [[f"{b['percent']} %", f"{b['fraction']:.3f}", f"{b['psnr']:.2f}",
             ", ".join(f"{name} {gap:+.1f}" for name, gap in b["under_globals_only"].items()) or "—"] for b in budgets]
    Console().print(table(f"{args.model}: one θ per budget over {len(photos)} photos of {args.data}, {args.side} px",
                          ["budget", "kept", "PSNR", f"under globals only by > {args.margin:g} dB"], body))
    record = {**photo_run(__file__, argv, args, [p.name for p in photos]), "globals_only_psnr": nothing,
              "budgets": budgets}
    return save_record(args.out / "budget_sweep.json", record)


if __name__ == "__main__":
    main()
