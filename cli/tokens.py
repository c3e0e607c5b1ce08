"""``tatok encode | decode | eval | show``: images ↔ token files, rate-distortion curves, one image up close.

The tokenizer is the ``--model`` option (a shipped name or a directory written by ``save_pretrained``,
default ``tatok-small8-covered``), not a leading positional argument: in ``tatok encode [MODEL] INPUTS…`` a
model directory and an image folder could not be told apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from rich.table import Table

from tatok_cli.console import console, err_console
from tatok_cli.options import (absolute_rule_options, at_least, budget_options, refine_option, search_option,
                               with_refinement)
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.contract.errors import ImageReadError, TatokError
from tatok_core.io.images import read_image
from tatok_core.workflows.allocation import allocation_report
from tatok_core.io.images import fit_longest_side
from tatok_core.workflows.analysis import cannot_tokenize
from tatok_core.workflows.encoding import source_names
from tatok_core.workflows.rate_control import check_rate, check_tau, with_rule
from tatok_core.workflows.rate_distortion import (DEFAULT_METHODS, ORACLE_LEVELS, evaluate_rate_distortion,
                                                  save_rate_distortion)
from tatok_core.workflows.token_sets import decode_token_set, encode_token_set, ignored_rate_option
from tatok_core.workflows.panels import show_panel
from tatok_core.contract.spec import OptionValue, parse_option_assignment
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer
from tatok_core.workflows.training import World

model_option = click.option(
    "--model", "model_name", default=DEFAULT_PRETRAINED, show_default=True, metavar="NAME|DIR",
    help="shipped tokenizer name or a directory written by save_pretrained / `tatok train`",
)
batch_size_option = click.option("--batch-size", default=16, show_default=True, callback=at_least(1),
                                 help="images per forward pass")


def _load(name: str, device: torch.device | None = None) -> Tokenizer:
    default = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Tokenizer.from_pretrained(name).to(device or default)


def _print_skipped(failed: list[tuple[Path, str]]) -> None:
    for _, reason in failed:
        err_console.print(f"[yellow]skipped[/] {reason}", highlight=False, soft_wrap=True)


def _short(threshold: float) -> str:
    """The shortest text that gives back the same float32 (the precision every filter applies)."""
    return np.format_float_positional(np.float32(threshold), trim="-")


def _filter_options(assignments: tuple[str, ...]) -> dict[str, OptionValue]:
    """``--set filter.k=20`` → ``{"k": 20}``."""
    options = {}
    for key, value in map(parse_option_assignment, assignments):
        if not key.startswith("filter.") or key == "filter.":
            raise TatokError(f"--set takes filter.OPTION=VALUE here, got {key!r}")
        options[key.removeprefix("filter.")] = value
    return options


@click.command()
@model_option
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="new token directory (shards), or a single FILE.safetensors")
@click.option("--tau", type=float, help="per-image DTF τ rule at this τ in [0, 1] (default: the model's own rule and threshold)")
@absolute_rule_options
@budget_options
@click.option("--filter", "filter_name", metavar="NAME", help="token filter for this run (see `tatok plugins`)")
@click.option("--set", "assignments", multiple=True, metavar="filter.OPTION=VALUE",
              help="filter option, e.g. filter.k=32; filter.min_keep / filter.max_keep are the per-image floor / cap")
@batch_size_option
@click.option("--shard-size", default=4096, show_default=True, callback=at_least(1),
              help="images per shard; each full shard is kept when a run is interrupted")
@click.option("--resume", is_flag=True, help="continue an encode into -o that was killed or interrupted (same inputs)")
@click.option("--append", is_flag=True, help="add these images to the existing token set in -o (same model and rate)")
@refine_option
@search_option
@click.pass_context
def encode(ctx: click.Context, model_name: str, inputs: tuple[str, ...], output: Path, tau: float | None,
           theta: float | None, epsilon: float | None, budget: float | None, budget_mode: str,
           filter_name: str | None, assignments: tuple[str, ...], batch_size: int, shard_size: int, resume: bool,
           append: bool, refine_steps: int | None, search_sweeps: int | None) -> None:
    """Tokenize image files, folders or globs into a token file.

    Unreadable files are reported and skipped, the rest written, and the exit status is 1. Full
    shards are kept as they are written: after a kill or Ctrl-C, the same command with --resume
    continues where it stopped (a run without --resume discards the leftovers). Under
    `torchrun --nproc_per_node=N` each rank encodes every N-th file into its own shard; a --budget
    is then calibrated over all ranks' images together.
    """
    rate = dict(tau=tau, theta=theta, epsilon=epsilon, budget=budget, budget_mode=budget_mode)
    check_rate(tau, budget, theta=theta, epsilon=epsilon, budget_mode=budget_mode)
    options = _filter_options(assignments)
    world = World.from_environment()
    model = with_refinement(_load(model_name, world.device), refine_steps, search_sweeps=search_sweeps)
    model.token_filter(filter_name, **options)  # unknown filter or option: fail before reading any image
    ignored = ignored_rate_option(model, tau=tau, theta=theta, epsilon=epsilon, budget=budget,
                                  filter=filter_name, filter_options=options)
    if ignored:
        raise TatokError(ignored)
    sources = source_names(inputs)[world.rank :: world.size]
    distributed = world.size > 1
    run = encode_token_set(
        model, sources, output, tokenizer=model.name or model_name, **rate, filter=filter_name,
        filter_options=options, batch_size=batch_size, shard_size=shard_size, append=append, resume=resume,
        rank=world.rank if distributed else None, world_size=world.size if distributed else None,
        progress=world.is_main, before_encoding=dist.barrier if distributed else None,
    )  # the barrier: every rank has checked the target before any rank's shard lands there
    report = run.report
    if run.discarded:
        err_console.print(f"[yellow]discarded[/] {run.discarded} images left by an interrupted encode into {output} "
                          "(--resume continues such a run)", highlight=False, soft_wrap=True)
    if report.calibration is not None and world.is_main:
        c = report.calibration
        console.print(f"calibrated {c.mode} {_short(c.threshold)}: {c.mean_tokens:.2f} patch tokens per image on average "
                      f"(budget {c.budget:g}, {c.iterations} bisection steps)", highlight=False, soft_wrap=True)
    applied = (f"{report.mode} {_short(report.threshold)}" if report.threshold is not None
               else f"filter {filter_name or model.spec.filter.name}")
    where = f"rank {world.rank}: " if distributed else ""
    resumed = f" after {run.resumed} kept from the interrupted run" if run.resumed else ""
    console.print(f"{where}encoded {report.encoded} images{resumed} into {output} ({report.mean_tokens:.1f} patch + "
                  f"{model.num_global} global tokens per image, {applied})", highlight=False, soft_wrap=True)
    _print_skipped(report.failed)
    if report.failed:
        err_console.print(f"[bold red]{len(report.failed)} file(s) could not be encoded[/]", highlight=False)
        ctx.exit(1)


@click.command()
@model_option
@click.argument("tokens", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the PNGs (existing files are kept unless --overwrite)")
@batch_size_option
@click.option("--overwrite", is_flag=True, help="replace PNGs of the same names already in the folder")
@click.option("--allow-foreign-weights", is_flag=True,
              help="decode tokens that other weights made (same architecture): risks wrong images")
def decode(model_name: str, tokens: Path, output: Path, batch_size: int, overwrite: bool,
           allow_foreign_weights: bool) -> None:
    """Decode a token file back into PNGs at the original sizes, named after the source files.

    The token set must be whole (every shard its manifest lists, nothing else) and made by this very
    model: tokens of other weights are refused unless --allow-foreign-weights.
    """
    model = _load(model_name)
    written = decode_token_set(model, tokens, output, batch_size=batch_size, overwrite=overwrite,
                               allow_foreign_weights=allow_foreign_weights, progress=True)
    console.print(f"decoded {len(written)} images into {output}", highlight=False)


def _floats(option: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TatokError(f"{option} takes comma-separated numbers, got {text!r}") from None


@click.command("eval")
@model_option
@click.option("--data", default="builtin:photos:heldout", show_default=True,
              help="builtin:photos[:heldout|:all], or a folder/glob of images")
@click.option("--taus", default="0.5,0.7,0.9,1.0", show_default=True,
              help="per-image τ of the model's own filter; every other method is matched to its mean counts")
@click.option("--filters", default=",".join(DEFAULT_METHODS), show_default=True,
              help="methods: model (the spec's filter at τ), theta / epsilon (one shared threshold), "
                   "topk / random / raster (k = the model's mean count), all, or any filter by name")
@click.option("--oracle", is_flag=True, help="add the per-image oracle allocation (an upper bound; many decodes)")
@click.option("--oracle-levels", type=int, callback=at_least(1),
              help=f"with --oracle: each image decoded at this many + 1 top-k counts, 0 … N  [default: {ORACLE_LEVELS}]")
@click.option("--crop", type=int, help="evaluate fixed crops of this side  [default: 64]")
@click.option("--count", type=int, help="number of fixed crops  [default: 32]")
@click.option("--whole", is_flag=True, help="evaluate whole images instead of crops")
@click.option("--longest-side", type=int, help="with --whole: downscale each image so its longest side is this")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="folder for rate_distortion.json and rate_distortion.png")
@click.option("--batch-size", default=32, show_default=True, callback=at_least(1), help="images per forward pass")
@refine_option
@search_option
def eval_(model_name: str, data: str, taus: str, filters: str, oracle: bool, oracle_levels: int | None, crop: int | None,
          count: int | None, whole: bool, longest_side: int | None, output: Path | None, batch_size: int,
          refine_steps: int | None, search_sweeps: int | None) -> None:
    """Rate-distortion: PSNR and SSIM against tokens kept and bits per pixel, at matched mean counts.

    Bits per pixel count the codes, the global tokens and which tokens were kept (log2(N+1) + log2 C(N, k)
    per image). Also reported: how the kept fraction follows image complexity (Spearman with JPEG size and
    mean gradient) and each method's per-image PSNR against topk at the same count, with win counts.
    """
    tau_values = [check_tau(t) for t in _floats("--taus", taus)]
    names = [name.strip() for name in filters.split(",") if name.strip()]
    if not tau_values or not names:
        raise TatokError("--taus and --filters must each name at least one value")
    if whole and (crop is not None or count is not None):
        raise TatokError("--whole evaluates whole images: drop --crop/--count")
    if longest_side is not None and (not whole or longest_side < 1):
        raise TatokError(f"--longest-side takes a side >= 1 and needs --whole (got {longest_side})")
    if oracle_levels is not None and not oracle:
        raise TatokError("--oracle-levels sets the oracle's counts: add --oracle")
    crop, count = 64 if crop is None else crop, 32 if count is None else count
    oracle_levels = ORACLE_LEVELS if oracle_levels is None else oracle_levels
    model = with_refinement(_load(model_name), refine_steps, search_sweeps=search_sweeps)
    skipped: list[tuple[Path, str]] = []
    try:
        source = ImageSource(data, on_skip=skipped.extend)
    except ImageReadError as exc:
        raise ImageReadError(f"{exc}: {skipped[0][1]}" if skipped else str(exc)) from exc
    _print_skipped(skipped)
    if whole:
        images: list[Tensor] = [im if longest_side is None else fit_longest_side(im, longest_side) for im in source.images]
        for name, image in zip(source.names, images):
            reason = cannot_tokenize(model, image)
            if reason:
                raise TatokError(f"cannot evaluate {name}: {reason}")
        setting: dict[str, Any] = {"whole": True, "longest_side": longest_side}
    else:
        if crop < model.patch_size or count < 1:
            raise TatokError(f"--crop must be >= the patch size {model.patch_size} and --count >= 1 "
                             f"(got {crop}, {count})")
        images = list(fixed_crops(source.images, crop, count))
        setting = {"crop": crop, "count": count}
    points = evaluate_rate_distortion(model, images, tau_values, names, oracle=oracle, oracle_levels=oracle_levels,
                                      batch_size=batch_size, progress=True)
    report = allocation_report(points, images)
    title = f"rate-distortion on {data} ({len(images)} images, model filter {model.spec.filter.name!r})"
    quality, rate = Table(title=title), Table(title="bits per pixel, by what they say")
    for column in ("method", "setting", "at", "tokens", "bpp", "PSNR", "SSIM", "ρ jpeg", "ρ grad"):
        quality.add_column(column, justify="left" if column in ("method", "setting", "at") else "right")
    for column in ("method", "setting", "codes", "globals", "positions", "total"):
        rate.add_column(column, justify="left" if column in ("method", "setting") else "right")
    rho = {(r["filter"], r["setting"], r["matched"]): r for r in report["spearman"]}
    for p in points:
        r = rho.get((p.filter, p.setting, p.matched), {})
        quality.add_row(p.filter, p.setting, (p.matched or "").removeprefix("tau="), f"{p.mean_tokens:.1f}",
                        f"{p.bpp:.3f}", f"{p.psnr:.2f}", f"{p.ssim:.3f}",
                        *(f"{r[key]:+.2f}" if r.get(key) is not None else "–" for key in ("jpeg_bpp", "mean_gradient")))
        rate.add_row(p.filter, p.setting, f"{p.bpp_codes:.4f}", f"{p.bpp_globals:.4f}", f"{p.bpp_side:.4f}",
                     f"{p.bpp:.4f}")
    console.print(quality)
    console.print(rate)
    if report["paired"]:
        versus = Table(title="per-image PSNR minus topk at the same matched count (dB)")
        for column in ("method", "setting", "at", "Δ tokens", "mean", "median", "wins", "losses"):
            versus.add_column(column, justify="left" if column in ("method", "setting", "at") else "right")
        for d in report["paired"]:
            versus.add_row(d["filter"], d["setting"], d["matched"].removeprefix("tau="), f"{d['tokens']:+.1f}",
                           f"{d['psnr_mean']:+.2f}",
                           f"{d['psnr_median']:+.2f}", str(d["psnr_wins"]), str(d["psnr_losses"]))
        console.print(versus)
    if output is not None:
        info = {"model": model.name, "spec_digest": model.spec.digest(), "model_filter": model.spec.filter.name,
                "data": data, "images": len(images), "names": list(source.names) if whole else None, **setting,
                "taus": tau_values, "filters": names, "oracle": oracle, "oracle_levels": oracle_levels if oracle else None,
                "refine_steps": model.refinement[0], "search_sweeps": model.search_sweeps,
                "bpp_counts": "codes: log2(codebook) per kept code; globals: num_global·log2(codebook); "
                              "positions: log2(N+1) + log2 C(N, k) per image (log2(N+1) when positions follow from k)",
                "allocation": report}
        for path in save_rate_distortion(points, output, info):
            console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@click.command()
@model_option
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write")
@click.option("--tau", type=float, help="use the per-image DTF τ rule at this τ in [0, 1] (default: the model's own rule)")
@absolute_rule_options
def show(model_name: str, image: Path, output: Path, tau: float | None, theta: float | None,
         epsilon: float | None) -> None:
    """Draw one image, the tokens DTF keeps (bits per patch), the reconstruction and its error."""
    check_rate(tau, None, theta=theta, epsilon=epsilon)  # before the image and the model load
    picture = read_image(image)
    model = with_rule(_load(model_name), tau=tau, theta=theta, epsilon=epsilon)
    reason = cannot_tokenize(model, picture)
    if reason:
        raise TatokError(f"cannot tokenize {image}: {reason}")
    shown = show_panel(model, picture, tau, output)
    console.print(f"{image}: kept {shown.kept}/{shown.num_patches} patch tokens ({shown.rate}), reconstruction "
                  f"{shown.psnr:.2f} dB; wrote {output}", highlight=False, soft_wrap=True)


COMMANDS = [encode, decode, eval_, show]
