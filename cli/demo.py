"""``tatok demo``: the README's main job — the shipped tokenizer on the shipped held-out photos."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from tatok_cli.console import console
from tatok_cli.options import absolute_rule_options
from tatok_core.workflows.demo import run_demo
from tatok_core.workflows.rate_control import check_rate, with_rule
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer


@click.command()
@click.option("--model", default=DEFAULT_PRETRAINED, show_default=True, help="shipped name or saved directory")
@click.option("--tau", type=float, default=None, help="use the per-image DTF τ rule at this τ in [0, 1] (default: the model's own rule)")
@absolute_rule_options
@click.option("--max-side", default=256, show_default=True, help="downscale photos so the longest side fits")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("tatok-demo.png"),
              show_default=True, help="where to write the PNG panel")
def demo(model: str, tau: float | None, theta: float | None, epsilon: float | None, max_side: int,
         output: Path) -> None:
    """Tokenize the held-out photos with the shipped tokenizer: a table and a PNG panel."""
    start = time.perf_counter()
    check_rate(tau, None, theta=theta, epsilon=epsilon)  # before the model loads
    tokenizer = with_rule(Tokenizer.from_pretrained(model), tau=tau, theta=theta, epsilon=epsilon)
    report = run_demo(tokenizer, max_side=max_side, tau=tau, out=output)
    table = Table(title=f"{model}: whole held-out photos (never seen in training)")
    for column in ("image", "photo size", "tokenized at", "tokens kept / max", "kept", "PSNR (dB)"):
        table.add_column(column, justify="right" if column != "image" else "left")
    for shown, (height, width) in zip(report.shown, report.original_sizes):
        h, w = shown.image.shape[1:]
        table.add_row(shown.name, f"{height}×{width}", f"{h}×{w}", f"{shown.kept} / {shown.num_patches}",
                      f"{shown.kept / shown.num_patches:.0%}", f"{shown.psnr:.2f}")
    console.print(table)
    console.print(f"+ {tokenizer.num_global} global tokens per image; {shown.rate}; "
                  f"{time.perf_counter() - start:.1f} s")
    console.print(f"panel: {report.panel.resolve()}", highlight=False, soft_wrap=True)


COMMANDS = [demo]
