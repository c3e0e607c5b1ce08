"""``tatok compress | decompress``: images ↔ compressed files (a range coder driven by the model's prior)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from tatok_cli.console import console, err_console
from tatok_cli.options import at_least
from tatok_cli.tokens import model_option
from tatok_core.contract.errors import ImageReadError, TatokError
from tatok_core.io.images import write_image
from tatok_core.workflows.compression import SUFFIX, ImageCoder
from tatok_core.workflows.encoding import source_names
from tatok_core.workflows.rate_control import check_rate, with_rule

prior_option = click.option("--prior", type=click.Path(file_okay=False, path_type=Path),
                            help="the saved context prior to code with  [default: the model's context-prior/]")


def _coder(model_name: str, prior: Path | None) -> ImageCoder:
    return ImageCoder.from_pretrained(model_name, prior=prior)


@click.command()
@model_option
@prior_option
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help=f"folder for the compressed files (NAME{SUFFIX})")
@click.option("--tau", type=float, help="per-image DTF τ rule at this τ in [0, 1] (default: the model's own rule)")
@click.option("--theta", type=float, help="absolute rule: keep every token holding more than THETA bits")
@click.option("--epsilon", type=float, help="absolute rule: keep the fewest tokens dropping at most EPSILON bits")
@click.option("--longest-side", type=int, callback=at_least(1), help="downscale each image so its longest side is this")
@click.pass_context
def compress(ctx: click.Context, model_name: str, prior: Path | None, inputs: tuple[str, ...], output: Path,
             tau: float | None, theta: float | None, epsilon: float | None, longest_side: int | None) -> None:
    """Compress images into files: the kept tokens, range-coded under the model's prior.

    Decode them with `tatok decompress` on the same tatok, torch build and kind of CPU: the decoder must
    compute the prior's probabilities bit for bit (a file decoded elsewhere is refused by its checksum).
    """
    check_rate(tau, None, theta=theta, epsilon=epsilon)
    coder = _coder(model_name, prior)
    coder = ImageCoder(with_rule(coder.tokenizer, tau=tau, theta=theta, epsilon=epsilon), coder.prior)
    table = Table(title=f"{model_name}: compressed")
    for column in ("image", "size", "tokens kept / max", "bytes", "bpp"):
        table.add_column(column, justify="left" if column == "image" else "right")
    failed = []
    for path, name in source_names(inputs):
        try:
            written = coder.compress_file(path, output / Path(name).with_suffix(SUFFIX), tau=tau,
                                          longest_side=longest_side)
        except ImageReadError as exc:
            failed.append(str(exc))
            continue
        height, width = written.image_size
        table.add_row(name, f"{height}×{width}", f"{written.kept} / {written.num_patches}", str(written.size),
                      f"{written.bpp:.3f}")
    console.print(table)
    for reason in failed:
        err_console.print(f"[yellow]skipped[/] {reason}", highlight=False, soft_wrap=True)
    if failed:
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
    targets = [output / file.with_suffix(".png").name for file in files]
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None and not overwrite:
        raise TatokError(f"{clash} already exists (--overwrite replaces it)")
    coder = _coder(model_name, prior)
    for file, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(target, coder.decompress_file(file))
    console.print(f"decoded {len(files)} file(s) into {output}", highlight=False)


COMMANDS = [compress, decompress]
