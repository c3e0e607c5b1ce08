"""The rate a real coder would write: token sets coded by a ``context`` prior, against JPEG and WebP.

    python benchmarks/coded_rate.py --operating-point runs/op14/operating_point.json \\
        --model tatok-small8-covered --model coarse16-11800=runs/coarse16-11800/final --out runs/coded_rate

TaTok counts a rate the plain way (``tatok_core/contract/bitrate.py``): every code at log2 V bits, the
kept positions by an enumerative code. An arithmetic coder driven by a prior over the tokens writes
−log2 p(tokens) bits (to within 2 bits), and neighbouring codes of a photo are far from independent.
For each model this benchmark

1. encodes the **training** photos (``--train-data``, at each of ``--train-sides``, and mirrored) with
   every token kept and — for a model whose filter drops tokens — with its own filter at one shared
   threshold per ``--train-fractions`` (so the prior learns the keep masks it will code);
2. trains a ``context`` prior (:mod:`tatok_plugins.context_prior`) on those token sets
   (:func:`tatok_core.workflows.generation.train_prior`; every model gets the same options, steps and
   seed), keeping the weights that code best the token sets of every ``--validate-every-photo``-th
   training photo, which it does not fit on (early stopping: a coarse grid's few codes are memorised);
3. codes the **held-out** whole photos — ``--operating-point``'s, at its side — at every token, the
   model's default and its own filter at one shared threshold per ``--fractions`` (as
   ``operating_point.py``'s ``own@f``), and reports per point PSNR, counted and coded bpp (globals,
   positions, codes), and the gap to JPEG / JPEG↓ / WebP↓ at the *coded* bpp, per photo from that run's
   codec curves (the best quality, and scale, reaching that rate).

Nothing is fitted on the held-out photos. ``--prior LABEL=DIR`` codes with a saved prior instead of
fitting one (steps 1–2 skipped; the default ships its own: ``plugins/pretrained/tatok-small8-covered/
context-prior``). The coded rate is a code length; with ``--files`` every coded point is also written as
a real compressed file (:class:`tatok_core.workflows.compression.ImageCoder`: a range coder driven by the
same prior), decoded back (the tokens must come back identical, or the run stops), and its size in
bytes is reported as ``file_bpp`` with the codec gaps at that rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # ``python benchmarks/coded_rate.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import environment, interp_y, invocation, save_figure, save_record  # noqa: E402
from benchmarks.operating_point import (ModelEvaluator, Photo, codec_curve, codec_envelope,  # noqa: E402
                                        jpeg_scan_size, load_photos, matched_methods, point_key,
                                        reference_methods)
from benchmarks.operating_point_figures import CODEC_COLOURS, CODEC_NAMES, codec_mean_curve, figure_grid  # noqa: E402
from tatok_core.contract.tokens import Tokens  # noqa: E402
from tatok_core.io.tokenfile import TokenDataset, TokenWriter  # noqa: E402
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer  # noqa: E402
from tatok_core.workflows import generation  # noqa: E402
from tatok_core.workflows.compression import ImageCoder, header_size  # noqa: E402
from tatok_core.workflows.encoding import token_meta  # noqa: E402
from tatok_core.workflows.inference import evaluating  # noqa: E402
from tatok_core.workflows.progress import progress_bar  # noqa: E402
from tatok_core.workflows.rate_control import calibrate_bits  # noqa: E402
from tatok_plugins.context_prior import ContextPrior  # noqa: E402

#: The codecs of ``operating_point.py`` compared at the coded rate.
CODECS = ("jpeg", "jpeg-scaled", "webp-scaled")
#: JPEG at its best downscale, its scan bytes alone: compared with a compressed file's payload.
SCAN_ONLY = "jpeg-scaled-scan"


def training_photos(data: str, sides: Sequence[int], every: int) -> tuple[list[Photo], list[Photo]]:
    """Every photo of ``data`` at each longest side, and mirrored (more token grids from the same photos),
    split by photo: every ``every``-th photo is for validation (early stopping), the others to fit on."""
    fit: list[Photo] = []
    validation: list[Photo] = []
    for side in sides:
        for index, photo in enumerate(load_photos(data, side)):
            (validation if index % every == every - 1 else fit).extend(
                [Photo(f"{photo.name}-{side}", photo.image), Photo(f"{photo.name}-{side}-m", photo.image.flip(-1))])
    return fit, validation


def analysed_photos(model: Tokenizer, photos: Sequence[Photo], device: torch.device, what: str,
                    progress: bool) -> ModelEvaluator:
    """``photos`` analysed once by ``model`` (codes and bits), with a progress bar: the slow part of a run."""
    with progress_bar(progress) as bar:
        task = bar.add_task(what, total=len(photos))
        return ModelEvaluator(model, photos, device, progress=lambda: bar.advance(task))


def training_tokens(model: Tokenizer, evaluator: ModelEvaluator, fractions: Sequence[float], path: Path) -> TokenDataset:
    """A token data set of ``evaluator``'s photos: every token kept, plus — when the model's filter drops
    tokens — its own filter at one shared threshold per kept fraction of the set."""
    photos = evaluator.photos
    bits = evaluator.bits()
    own = model.token_filter()
    everything = model.token_filter("all")
    rules = [("all", lambda b: everything.select(b))]
    if model.spec.filter.name != "all":
        for fraction in fractions:
            rate = calibrate_bits(own, bits, fraction * evaluator.mean_patches, tol=1.0)
            rules.append((f"own@{fraction:g}", lambda b, t=rate.threshold: own.select(b, t)))
    with TokenWriter(path, spec_digest=model.spec.digest(), tokenizer=model.name or "model",
                     meta=token_meta(model)) as writer:
        for i, photo in enumerate(photos):
            for name, select in rules:
                writer.write(evaluator.analysed[i].tokens(select(bits[i])), [(f"{photo.name}:{name}", 0)])
    return TokenDataset(path)


def coded_bits(prior: ContextPrior, tokens: Tokens) -> dict[str, float]:
    """Bits of one image's tokens under ``prior``, by part and in total."""
    with torch.no_grad():
        parts = {name: float(-nats.sum()) / math.log(2) for name, nats in prior.log_likelihood_parts(tokens).items()}
    return {**parts, "total": sum(parts.values())}


def codec_gaps(codecs: dict, photo: str, bpp: float, psnr: float,
               names: Sequence[str] = CODECS) -> dict[str, float | None]:
    """PSNR − each codec's best PSNR at the same bpp on this photo (None where the codec does not reach it)."""
    gaps: dict[str, float | None] = {}
    for codec in names:
        at = interp_y(*codec_envelope(codecs[codec]["per_photo"][photo], "psnr"), bpp)
        gaps[codec] = None if at is None else psnr - at
    return gaps


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Means over the photos of one point; each codec gap (row key ``RATE_gap``) over the photos it
    reaches, with their count, as ``CODEC_gap_RATE`` and ``CODEC_photos_RATE``."""
    means = ("kept", "psnr", "counted_bpp", "coded_bpp", "file_bpp", "payload_bpp", "write_s", "read_s", "globals",
             "positions", "codes")
    summary: dict[str, Any] = {key: float(np.mean([r[key] for r in rows])) for key in means if key in rows[0]}
    kept = sum(r["kept"] for r in rows)
    summary["code_bits_per_kept"] = sum(r["codes"] for r in rows) / max(kept, 1)
    for rate in (key.removesuffix("_gap") for key in rows[0] if key.endswith("_gap")):
        for codec in rows[0][f"{rate}_gap"]:
            gaps = [r[f"{rate}_gap"][codec] for r in rows if r[f"{rate}_gap"][codec] is not None]
            summary[f"{codec}_gap_{rate}"] = float(np.mean(gaps)) if gaps else None
            summary[f"{codec}_photos_{rate}"] = len(gaps)
    return summary


def scan_only_jpeg(photos: Sequence[Photo], qualities: Sequence[int]) -> dict:
    """JPEG at its best downscale counting only its scan bytes (:func:`jpeg_scan_size`), per photo: the
    codec whose tables ship with it, compared with a compressed file's payload (its prior ships too)."""
    return {"per_photo": {photo.name: codec_curve(photo.image, "jpeg-scaled", qualities, size_of=jpeg_scan_size)
                          for photo in photos}}


def fit_prior(label: str, model: Tokenizer, args: argparse.Namespace, device: torch.device) -> tuple[ContextPrior, dict]:
    """Steps 1–2 of the module docs: a ``context`` prior fitted on the training photos' token sets."""
    with tempfile.TemporaryDirectory() as scratch:
        with evaluating(model):
            fit, held = training_photos(args.train_data, args.train_sides, args.validate_every_photo)
            dataset, validation = (
                training_tokens(model, analysed_photos(model, photos, device, f"{label}: {name}", args.progress),
                                args.train_fractions, Path(scratch) / name)
                for photos, name in ((fit, "fit"), (held, "validation")))
        prior = generation.build_generator("context", generation.dataset_facts(dataset), width=args.width)
        trained = generation.train_prior(prior.to(device), dataset, steps=args.steps, batch_size=args.batch_size,
                                         lr=args.lr, seed=args.seed, progress=args.progress, validation=validation)
        train_bits = generation.nll_bits_per_image(prior, dataset)
        record = {"options": {"width": args.width}, "steps": trained.steps, "best_step": trained.best_step,
                  "validation": trained.validation, "validation_bits": trained.validation_bits,
                  "seconds": trained.seconds, "train_bits_per_image": train_bits, "train_images": len(dataset)}
    if args.save_priors:
        generation.save_prior(prior, args.save_priors / label, training={
            "command": "python benchmarks/coded_rate.py", "train_data": args.train_data, "train_sides": args.train_sides,
            "train_fractions": args.train_fractions, "refine_steps": model.refine_steps,
            "refine_lr": model.refine_lr, "search_sweeps": model.search_sweeps, "steps": trained.steps, "best_step": trained.best_step,
            "train_bits_per_image": train_bits,
            "validation_bits_per_image": trained.validation_bits})
    return prior, record  # type: ignore[return-value]


def file_bytes(coder: ImageCoder, tokens: Tokens, name: str) -> tuple[bytes, float, float]:
    """``tokens`` written as a compressed file, which must decode to the very same tokens; with the seconds
    the range coder took to write and to read it (the prior's walk, one CPU thread)."""
    start = time.perf_counter()
    data = coder.compress_tokens(tokens)
    middle = time.perf_counter()
    back = coder.decompress_tokens(data, name)
    end = time.perf_counter()
    tokens = tokens.to("cpu")
    same = all(torch.equal(getattr(tokens, t), getattr(back, t)) for t in ("global_codes", "codes", "positions"))
    if not same or back.image_size != tokens.image_size:
        raise SystemExit(f"{name}: the compressed file decoded to other tokens")
    return data, middle - start, end - middle


def measure(label: str, source: str, args: argparse.Namespace, codecs: dict, device: torch.device) -> dict:
    model = Tokenizer.from_pretrained(source).to(device)
    if args.refine_steps is not None:  # every model alike, its prior's training tokens too
        model = model.with_pipeline_options(refine_steps=args.refine_steps)
    if args.search_sweeps is not None:  # every model alike
        model = model.with_pipeline_options(search_sweeps=args.search_sweeps)
    if label in args.prior:
        prior, prior_record = generation.load_prior(args.prior[label]), {"loaded": str(args.prior[label])}
    else:
        prior, prior_record = fit_prior(label, model, args, device)
    if args.bpp_worth is not None:
        model = model.with_pipeline_options(refine_bpp_worth=args.bpp_worth)
    model = model.with_coding_prior(prior.to(device))  # the held-out tokens refined as `tatok compress` makes them
    coder = ImageCoder(model, prior) if args.files else None
    with evaluating(model):
        evaluator = analysed_photos(model, load_photos(args.heldout_data, args.side), device, f"{label}: held-out",
                                    args.progress)
        if coder is not None:
            codecs = {**codecs, SCAN_ONLY: scan_only_jpeg(evaluator.photos, codecs["jpeg-scaled"]["qualities"])}
        methods = [m for m in reference_methods(evaluator) if m.name != "globals"]
        for fraction in args.fractions:
            methods += [m for m in matched_methods(evaluator, fraction, args.seed)[0] if m.name == "own"]
        points: dict[str, Any] = {}
        with progress_bar(args.progress) as bar:
            task = bar.add_task(f"{label}: coding", total=len(methods) * len(evaluator.photos))
            for method in methods:
                rows = []
                for i, photo in enumerate(evaluator.photos):
                    selection = method.select(i, evaluator.bits()[i])
                    if method.searched:  # with --search-sweeps: the set encode keeps, scored and coded alike
                        selection = evaluator.searched(i, selection)
                    score, _ = evaluator.score(i, selection, keeps_all=method.keeps_all)
                    tokens = evaluator.analysed[i].tokens(selection, search=False)
                    bits = coded_bits(prior, tokens.to(device))
                    coded_bpp = bits["total"] / photo.pixels
                    row = {"photo": photo.name, "kept": score.kept, "psnr": score.psnr, "counted_bpp": score.bpp,
                           "coded_bpp": coded_bpp, **{k: bits[k] for k in ("globals", "positions", "codes")},
                           "counted_gap": codec_gaps(codecs, photo.name, score.bpp, score.psnr),
                           "coded_gap": codec_gaps(codecs, photo.name, coded_bpp, score.psnr)}
                    if coder is not None:
                        data, row["write_s"], row["read_s"] = file_bytes(coder, tokens, f"{photo.name} {method.name}")
                        row["file_bpp"] = 8 * len(data) / photo.pixels
                        row["payload_bpp"] = 8 * (len(data) - header_size(data)) / photo.pixels
                        row["file_gap"] = codec_gaps(codecs, photo.name, row["file_bpp"], score.psnr)
                        row["payload_gap"] = codec_gaps(codecs, photo.name, row["payload_bpp"], score.psnr, [SCAN_ONLY])
                    rows.append(row)
                    bar.advance(task)
                points[point_key(method.name, method.fraction)] = {"summary": summarise(rows), "rows": rows}
    steps, lr = model.refinement  # how the held-out tokens were made (rate-aware when worth > 0)
    result = {"label": label, "source": source, "prior": prior_record, "points": points,
              "refinement": {"steps": steps, "lr": lr, "bpp_worth": model.refine_bpp_worth},
              "search_sweeps": model.search_sweeps}
    if coder is not None:
        result["codecs"] = {SCAN_ONLY: codecs[SCAN_ONLY]}  # of these photos, for the figure
    return result


def coded_figure(report: dict, codecs_record: dict, path: Path) -> Path:
    """PSNR against bpp (set means): each model's points coded (filled, solid), counted (hollow, dotted)
    and, with ``--files``, as compressed files (crosses, dashed) — the own filter's curve and every
    token — with the codecs' mean curves."""
    figure, axes = figure_grid(1, 1, (8.0, 5.6))
    ax = axes[0, 0]
    shown = []
    for m, (label, model) in enumerate(report["models"].items()):
        points = sorted((p["summary"] for k, p in model["points"].items() if k.startswith("own@") or k == "all"),
                        key=lambda s: s["coded_bpp"])
        shown += points
        psnr = [s["psnr"] for s in points]
        ax.plot([s["coded_bpp"] for s in points], psnr, "-o", color=f"C{m}", label=f"{label}: coded")
        ax.plot([s["counted_bpp"] for s in points], psnr, ":o", color=f"C{m}", markerfacecolor="none",
                label=f"{label}: counted")
        if "file_bpp" in points[0]:
            ax.plot([s["file_bpp"] for s in points], psnr, "--x", color=f"C{m}", label=f"{label}: compressed files")
    for codec in CODECS:
        xs, ys = codec_mean_curve(codecs_record, codec, "psnr")
        ax.plot(xs, ys, color=CODEC_COLOURS[codec], linewidth=2, label=f"{CODEC_NAMES[codec]} (Pillow)")
    scan_only = next((model for model in report["models"].values() if "codecs" in model), None)
    if scan_only is not None:
        xs, ys = codec_mean_curve(scan_only, SCAN_ONLY, "psnr")
        ax.plot(xs, ys, color=CODEC_COLOURS["jpeg-scaled"], linewidth=2, linestyle="--",
                label="JPEG, best downscale, scan bytes only (tables not counted)")
    ax.set_xscale("log")
    ax.set_xlim(0.7 * min(s["coded_bpp"] for s in shown), 2 * max(s["counted_bpp"] for s in shown))  # the models' range
    ax.set_ylim(min(s["psnr"] for s in shown) - 2, max(s["psnr"] for s in shown) + 4)
    ax.set_xlabel("bits per pixel (mean over photos, log scale)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"held-out whole photos, longest side {report['side']} px: the rate a coder writes")
    return save_figure(figure, path)


def parse_models(values: Sequence[str] | None) -> list[tuple[str, str]]:
    """``label=source`` or a bare source (its own label)."""
    return [tuple(v.split("=", 1)) if "=" in v else (v, v) for v in (values or [DEFAULT_PRETRAINED])]  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="label=source or a shipped name (repeatable; default: the default)")
    parser.add_argument("--operating-point", type=Path, required=True, help="operating_point.py's JSON (codec curves)")
    parser.add_argument("--train-data", default="builtin:photos:extended")
    parser.add_argument("--train-sides", default="192,256,320")
    parser.add_argument("--train-fractions", default="0.1,0.2,0.35,0.5,0.75")
    parser.add_argument("--validate-every-photo", type=int, default=5,
                        help="every n-th training photo validates the prior (early stopping) instead of fitting it")
    parser.add_argument("--fractions", default="0.2,0.25,0.35,0.5")
    parser.add_argument("--width", type=int, default=96, help="the context prior's width")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refine-steps", type=int,
                        help="test-time refinement steps for every model (default: each spec's own)")
    parser.add_argument("--search-sweeps", type=int,
                        help="set-search sweeps for every model (default: each spec's own, as `tatok compress`)")
    parser.add_argument("--bpp-worth", type=float, metavar="DB",
                        help="rate-aware refinement of the held-out tokens: one bpp under the prior is worth DB dB "
                             "(default: the spec's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("runs/coded_rate"))
    parser.add_argument("--save-priors", type=Path, help="save each model's fitted prior in DIR/LABEL (load_prior)")
    parser.add_argument("--prior", action="append", default=[], metavar="LABEL=DIR",
                        help="code LABEL's tokens with the prior saved in DIR instead of fitting one (repeatable)")
    parser.add_argument("--files", action="store_true",
                        help="also write every coded point as a compressed file, decode it back, report its bpp")
    args = parser.parse_args(argv)
    if any("=" not in value for value in args.prior):
        parser.error("--prior takes LABEL=DIR")
    args.prior = dict(value.split("=", 1) for value in args.prior)
    args.train_sides = [int(s) for s in args.train_sides.split(",")]
    args.train_fractions = [float(f) for f in args.train_fractions.split(",")]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = json.loads(args.operating_point.read_text())
    args.side, args.heldout_data = run["side"], run["data"]  # the photos its codec curves are of
    report: dict[str, Any] = {
        "command": invocation(__file__, argv),
        "environment": environment(), "side": args.side, "operating_point": str(args.operating_point),
        "models": {},
    }
    for label, source in parse_models(args.model):
        report["models"][label] = result = measure(label, source, args, run["codecs"], torch.device("cpu"))
        prior = result["prior"]
        print(f"{label}: context prior loaded from {prior['loaded']}" if "loaded" in prior else
              f"{label}: context prior {prior['seconds']:.0f} s, weights of step {prior['best_step']}, "
              f"{prior['train_bits_per_image']:.0f} bits per training token set, "
              f"{prior['validation_bits']:.0f} per validation set")
        rate = "file" if args.files else "coded"
        for key, point in result["points"].items():
            s = point["summary"]
            gaps = ", ".join(f"{c} {s[f'{c}_gap_{rate}']:+.2f} ({s[f'{c}_photos_{rate}']})"
                             if s[f"{c}_gap_{rate}"] is not None else f"{c} —" for c in CODECS)
            files = (f" → file {s['file_bpp']:.3f} (payload {s['payload_bpp']:.3f}: JPEG↓ scan only "
                     + (f"{s[f'{SCAN_ONLY}_gap_payload']:+.2f} ({s[f'{SCAN_ONLY}_photos_payload']}))"
                        if s[f"{SCAN_ONLY}_gap_payload"] is not None else "—)") if args.files else "")
            print(f"  {key:>9}: kept {s['kept']:6.1f}  PSNR {s['psnr']:.2f}  bpp counted {s['counted_bpp']:.3f} → coded "
                  f"{s['coded_bpp']:.3f}{files} ({s['code_bits_per_kept']:.2f} bits/code)  vs codecs at {rate} bpp: {gaps}")
    args.out.mkdir(parents=True, exist_ok=True)
    coded_figure(report, run, args.out / "coded_rate.png")
    return save_record(args.out / "coded_rate.json", report)


if __name__ == "__main__":
    main()
