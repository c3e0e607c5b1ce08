"""``tatok compress | decompress``: images ↔ compressed files (a range coder driven by the model's prior)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from tatok_cli.console import console, err_console
from tatok_cli.options import (absolute_rule_options, at_least, bpp_worth_option, budget_options, refine_option,
                               with_refinement)
from tatok_cli.tokens import model_option
from tatok_core.workflows.compression import SUFFIX, ImageCoder, compress_files, decompress_files
from tatok_core.workflows.encoding import source_names
from tatok_core.workflows.rate_control import check_rate, with_rule

prior_option = click.option("--prior", type=click.Path(file_okay=False, path_type=Path),
                            help="the saved context prior to code with  [default: the model's context-prior/]")


@click.command()
@model_option
@prior_option
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help=f"folder for the compressed files (NAME{SUFFIX})")
@click.option("--tau", type=float, help="per-image DTF τ rule at this τ in [0, 1] (default: the model's own rule)")
@absolute_rule_options
@budget_options
@click.option("--longest-side", type=int, callback=at_least(1), help="downscale each image so its longest side is this")
@refine_option
@bpp_worth_option
@click.pass_context
def compress(ctx: click.Context, model_name: str, prior: Path | None, inputs: tuple[str, ...], output: Path,
             tau: float | None, theta: float | None, epsilon: float | None, budget: float | None, budget_mode: str,
             longest_side: int | None, refine_steps: int | None, bpp_worth: float | None) -> None:
    """Compress images into files: the kept tokens, range-coded under the model's prior.

    Decode them with `tatok decompress` and the same model and prior, on this machine or another: the
    coder sees only rounded logits, so both ends compute the same probabilities (a damaged file, or the
    rare one whose probabilities still differ, is refused by its checksum).
    """
    check_rate(tau, budget, theta=theta, epsilon=epsilon, budget_mode=budget_mode)
    loaded = ImageCoder.from_pretrained(model_name, prior=prior)
    tokenizer = with_refinement(loaded.tokenizer, refine_steps, bpp_worth)
    coder = ImageCoder(with_rule(tokenizer, tau=tau, theta=theta, epsilon=epsilon), loaded.prior)
    report = compress_files(coder, source_names(inputs), output, tau=tau, budget=budget, budget_mode=budget_mode,
                            longest_side=longest_side, progress=True)
    if report.calibration is not None:
        c = report.calibration
        console.print(f"calibrated {c.mode} {c.threshold:.6g}: {c.mean_tokens:.2f} patch tokens per image on average "
                      f"(budget {c.budget:g})", highlight=False, soft_wrap=True)
    table = Table(title=f"{model_name}: compressed")
    for column in ("image", "size", "tokens kept / max", "bytes", "bpp"):
        table.add_column(column, justify="left" if column == "image" else "right")
    for file in report.written:
        height, width = file.image_size
        table.add_row(file.path.name, f"{height}×{width}", f"{file.kept} / {file.num_patches}", str(file.size),
                      f"{file.bpp:.3f}")
    console.print(table)
    for reason in report.failed:
        err_console.print(f"[yellow]skipped[/] {reason}", highlight=False, soft_wrap=True)
    if report.failed:
        ctx.exit(1)


@click.command()
@model_option
@prior_option
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the PNGs")
@click.option("--overwrite", is_flag=True, help="replace PNGs of the same names already in the folder")
def decompress(model_name: str, prior: Path | None, files: tuple[Path, ...], output: Path, overwrite: bool) -> None:
    """Decode compressed files back into PNGs (the same model and prior that compressed them)."""
    coder = ImageCoder.from_pretrained(model_name, prior=prior)
    written = decompress_files(coder, files, output, overwrite=overwrite, progress=True)
    console.print(f"decoded {len(written)} file(s) into {output}", highlight=False)


COMMANDS = [compress, decompress]
