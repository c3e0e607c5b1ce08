"""What test-time refinement buys and costs: PSNR, coded bits and encode time per setting, side by side.

    python benchmarks/refinement.py --data builtin:photos:extended --limit 12 \\
        --settings 0,5:0.005,10:0.005,20:0.005,10:0.01,20:0.05,10::60 --out runs/refinement

For each whole photo (longest side ``--side``) the model analyses once; then for each setting
``STEPS[:LR[:BPP_WORTH]]`` (``0``: the encoder's tokens; LR empty: the spec's) and each rule — every
token, the model's own filter and a per-photo top-k at ``--topk-fraction`` of the tokens — the kept set's
tokens are made as ``Tokenizer.encode`` makes them, decoded and scored: PSNR, its distance to every token
at the same setting (what a budget loses), and the bits the model's shipped context prior codes them in
(what a compressed file holds, to within the coder's few bits). The sets are the filters' own
(``--search-sweeps 0``, the default: refinement alone) or, with ``--search-sweeps S``, chosen again by S
sweeps of the set search first, as the default encodes. Long settings (``0,10,40,160``) estimate the
most that fitting a set's tokens can add for this decoder. Refinement for pixels makes each set's tokens
fit the image better but moves codes away from what the prior expects: the trade is PSNR against bits.
A BPP_WORTH in dB per bpp makes it rate-aware (``refine_bpp_worth``: −PSNR + worth · bpp under that
prior, as ``tatok compress`` refines); without one a setting refines for pixels only, whatever the spec
says. ``--timing-repeats`` whole encodes per setting (median seconds per photo, in one run; ``--device
cuda`` on a GPU; 0: not timed) give its cost. Pick settings on training photos; report on held-out ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rich.console import Console

if __package__ in (None, ""):  # ``python benchmarks/refinement.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import photo_run, save_record, table  # noqa: E402
from benchmarks.coded_rate import coded_bits  # noqa: E402
from benchmarks.compression_speed import add_coder_arguments  # noqa: E402
from benchmarks.operating_point import load_photos  # noqa: E402
from tatok_core.pipeline.tokenizer import Tokenizer, pretrained_folder  # noqa: E402
from tatok_core.workflows import generation  # noqa: E402
from tatok_core.workflows.analysis import Analysed  # noqa: E402
from tatok_core.workflows.compression import CODING_PRIOR  # noqa: E402
from tatok_core.workflows.metrics import psnr  # noqa: E402
from tatok_core.workflows.progress import progress_bar  # noqa: E402


class Setting(NamedTuple):
    """One way of making the tokens: refinement steps, Adam's step (None: the spec's, its rate-aware one
    when the setting weighs bits) and what a bit per pixel of the coding prior is worth in dB (0: pixels
    only, whatever the spec says)."""

    steps: int
    lr: float | None = None
    bpp_worth: float = 0.0

    @property
    def label(self) -> str:
        if self.steps == 0:
            return "encoder"
        return (f"{self.steps} steps" + (f" @ {self.lr:g}" if self.lr is not None else "")
                + (f", bpp = {self.bpp_worth:g} dB" if self.bpp_worth else ""))


def parse_settings(text: str) -> list[Setting]:
    """``"0,10:0.005,10::60"`` → the encoder's tokens, 10 steps at 0.005, 10 steps at the spec's step
    weighing one bit per pixel as 60 dB."""
    settings = []
    for item in text.split(","):
        steps, lr, worth = (item.split(":") + ["", ""])[:3]
        settings.append(Setting(int(steps), float(lr) if lr else None, float(worth) if worth else 0.0))
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_coder_arguments(parser)
    parser.add_argument("--settings", default="0,10:0.005,20:0.005,20:0.05",
                        help="STEPS[:LR[:BPP_WORTH]] list (0: the encoder's; a bpp's worth in dB makes refinement rate-aware)")
    parser.add_argument("--topk-fraction", type=float, default=0.25,
                        help="the top-k rule's kept fraction (default 0.25)")
    parser.add_argument("--search-sweeps", type=int, default=0,
                        help="set-search sweeps choosing each rule's set first (default 0: the filters' sets)")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="timed whole encodes per setting (median; 0: not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the tokenizer and its prior run")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("runs/refinement"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prior = generation.load_prior(args.prior or pretrained_folder(args.model) / CODING_PRIOR, map_location=device)
    model = Tokenizer.from_pretrained(args.model, map_location=device).with_coding_prior(prior)
    photos = load_photos(args.data, args.side, args.limit)
    settings = parse_settings(args.settings)
    rules = {"all": lambda bits: model.baseline_filter("keep-all").select(bits),
             "own": lambda bits: model.token_filter().select(bits),
             f"topk@{args.topk_fraction:g}": lambda bits: model.token_filter(
                 "topk", k=round(args.topk_fraction * bits.shape[1])).select(bits)}
    rows: dict[str, dict[str, list[dict[str, float]]]] = {s.label: {rule: [] for rule in rules} for s in settings}
    seconds: dict[str, list[float]] = {s.label: [] for s in settings}
    with progress_bar(args.progress) as bar:
        task = bar.add_task("refinement", total=len(photos) * len(settings))
        for photo in photos:
            image = photo.image[None].to(device)  # (1, C, H, W)
            for setting in settings:
                lr = {} if setting.lr is None else {"refine_lr": setting.lr, "refine_coded_lr": setting.lr}
                refining = model.with_pipeline_options(refine_steps=setting.steps, refine_coded_steps=setting.steps,
                                                       refine_bpp_worth=setting.bpp_worth, **lr)
                analysed = Analysed.of(refining, image, search_sweeps=args.search_sweeps)
                for rule, select in rules.items():
                    tokens = analysed.tokens(select(analysed.bits))
                    rows[setting.label][rule].append({
                        "kept": int(tokens.lengths[0]), "psnr": float(psnr(refining.decode(tokens), image)[0]),
                        "bits": coded_bits(prior, tokens)["total"]})
                times = []
                for _ in range(args.timing_repeats):
                    start = time.perf_counter()
                    refining.encode(image, search_sweeps=args.search_sweeps)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - start)
                if times:
                    seconds[setting.label].append(statistics.median(times))
                bar.advance(task)
    base = settings[0].label
    summary: dict[str, dict[str, Any]] = {}
    for name, by_rule in rows.items():
        summary[name] = {"encode_s": float(np.mean(seconds[name])) if seconds[name] else None}
        for rule, points in by_rule.items():
            reference = rows[base][rule]
            summary[name][rule] = {
                "kept": float(np.mean([p["kept"] for p in points])),
                "psnr": float(np.mean([p["psnr"] for p in points])),
                "bits": float(np.mean([p["bits"] for p in points])),
                "psnr_gain": float(np.mean([p["psnr"] - r["psnr"] for p, r in zip(points, reference)])),
                "bits_added": float(np.mean([p["bits"] - r["bits"] for p, r in zip(points, reference)])),
                "psnr_below_all": float(np.mean([p["psnr"] - a["psnr"] for p, a in zip(points, by_rule["all"])])),
            }
    searched = f", sets searched ({args.search_sweeps} sweeps)" if args.search_sweeps else ""
    console = Console()
    for rule in rules:  # one table per rule: settings down, what they buy and cost across
        body = [[name, s["encode_s"], f"{s[rule]['kept']:.0f}", s[rule]["psnr"], f"{s[rule]['psnr_gain']:+.2f}",
                 f"{s[rule]['psnr_below_all']:+.2f}", f"{s[rule]['bits']:.0f}", f"{s[rule]['bits_added']:+.0f}"]
                for name, s in summary.items()]
        console.print(table(f"{args.model}, {rule}: refinement on {len(photos)} photos of {args.data}, "
                            f"{args.side} px{searched}",
                            ["setting", "encode s", "kept", "PSNR", "+dB", "− all", "bits", "+bits"], body))
    record = {**photo_run(__file__, argv, args, [p.name for p in photos]), "summary": summary, "rows": rows}
    return save_record(args.out / "refinement.json", record)


if __name__ == "__main__":
    main()
