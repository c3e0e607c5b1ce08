"""Photo by photo: a model's own filter at one matched fraction against a fixed-rate baseline.

    python benchmarks/per_photo_vs_baseline.py --operating-point runs/op14/operating_point.json \\
        --label tatok-small8-covered --fraction 0.25 --baseline runs/coarse16-11800/final

``operating_point.py`` compares set means (the own curve at the baseline's mean tokens). This says
where the difference comes from: the baseline keeps every token of each photo (decoded here, on the
same photos at the same side), the model's row is its ``own@fraction`` of that run, with the tokens each
kept. Where one threshold for the set leaves a photo with few or no patch tokens, the set's mean hides
a large loss on that photo behind gains on the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # ``python benchmarks/per_photo_vs_baseline.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import write_json  # noqa: E402
from benchmarks.operating_point import load_photos  # noqa: E402
from tatok_core.pipeline.tokenizer import Tokenizer  # noqa: E402
from tatok_core.workflows.inference import evaluating  # noqa: E402
from tatok_core.workflows.metrics import psnr  # noqa: E402


def own_rows(run: dict, label: str, fraction: float) -> dict[str, dict]:
    """The model's ``own`` rows at ``fraction`` of an operating_point.py JSON, by photo."""
    if label not in run["models"]:
        raise SystemExit(f"no model {label!r} in the operating point (has {sorted(run['models'])})")
    rows = {r["photo"]: r for r in run["models"][label]["rows"]
            if r["point"] == "own" and r["fraction"] is not None and abs(r["fraction"] - fraction) < 1e-9}
    if not rows:
        raise SystemExit(f"{label!r} has no own@{fraction:g} in the operating point (run it with --fractions)")
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operating-point", type=Path, required=True, help="operating_point.py's JSON")
    parser.add_argument("--label", required=True, help="the model's label in that JSON")
    parser.add_argument("--fraction", type=float, default=0.25, help="the own@ fraction to compare")
    parser.add_argument("--baseline", required=True, help="the fixed-rate model: a folder or shipped name")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/per_photo_vs_baseline.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = json.loads(args.operating_point.read_text())
    rows = own_rows(run, args.label, args.fraction)
    baseline = Tokenizer.from_pretrained(args.baseline)
    photos = []
    with evaluating(baseline):
        for photo in load_photos(run["data"], run["side"]):
            if photo.name not in rows:
                continue
            target = photo.image[None]  # (1, 3, H, W)
            tokens = baseline.encode(target)
            fixed = float(psnr(baseline.decode(tokens), target)[0])
            own = rows[photo.name]
            photos.append({"photo": photo.name, "own_kept": own["kept"], "baseline_kept": int(tokens.lengths[0]),
                           "own_psnr": own["psnr"], "baseline_psnr": fixed, "difference": own["psnr"] - fixed})
    if len(photos) != len(rows):
        raise SystemExit(f"found {len(photos)} of the {len(rows)} photos of {args.operating_point} in {run['data']}")
    mean = sum(p["difference"] for p in photos) / len(photos)
    report = {"label": args.label, "fraction": args.fraction, "baseline": args.baseline, "photos": photos,
              "mean_difference": mean, "wins": sum(p["difference"] > 0 for p in photos)}
    write_json(args.out, report)
    for p in photos:
        print(f"{p['photo']:>16}: own {p['own_kept']:4d} tokens {p['own_psnr']:6.2f} dB | baseline "
              f"{p['baseline_kept']:4d} tokens {p['baseline_psnr']:6.2f} dB | {p['difference']:+.2f}")
    print(f"mean {mean:+.2f} dB, own wins {report['wins']}/{len(photos)} → {args.out}")
    return report


if __name__ == "__main__":
    main()
