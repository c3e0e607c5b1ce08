"""``tatok plugins`` and ``tatok compose``: see what is installed, and put a pipeline together."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch
from rich.table import Table

from tatok_cli.console import console
from tatok_core.contract.errors import SpecError
from tatok_core.contract.interfaces import PIPELINE_KINDS
from tatok_core.contract.registry import get_registry
from tatok_core.contract.spec import PipelineSpec, parse_option_assignment
from tatok_core.pipeline.tokenizer import Tokenizer


@click.command()
def plugins() -> None:
    """List every registered component by kind, with the package that provides it."""
    registry = get_registry()
    table = Table(title="TaTok components")
    for column in ("kind", "name", "package", "version", "summary"):
        table.add_column(column, overflow="fold")
    for entry in registry.entries():
        table.add_row(entry.kind, entry.name, entry.provider.package, entry.provider.version, entry.summary)
    console.print(table)
    shipped = registry.pretrained()
    if shipped:
        console.print("pretrained: " + ", ".join(f"{name} ({provider.package})" for name, (_, provider) in shipped.items()))


def _kind_option(kind: str) -> click.Option:
    flag = "--" + kind.replace("_", "-")
    return click.option(flag, kind, default=None, metavar="NAME", help=f"{kind} component (see `tatok plugins`)")


@click.command()
@_kind_option("encoder")
@_kind_option("global_tokenizer")
@_kind_option("quantizer")
@_kind_option("entropy")
@_kind_option("filter")
@_kind_option("decoder")
@click.option("--spec", "base", type=click.Path(dir_okay=False, path_type=Path), help="start from this spec file")
@click.option("--set", "assignments", multiple=True, metavar="KIND.OPTION=VALUE",
              help="set an option; VALUE is read as TOML (256, 0.5, true, [8,8,8]) or else as a string")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="write the spec (.toml or .json)")
@click.option("--check", is_flag=True, help="build the model and run one forward pass on a random batch")
@click.option("--image-size", default=64, show_default=True, help="image side for the summary and --check")
def compose(base: Path | None, assignments: tuple[str, ...], output: Path | None, check: bool, image_size: int,
            **names: str | None) -> None:
    """Compose a pipeline from named components, validate it, and print or write its spec."""
    spec = (PipelineSpec.load(base) if base else PipelineSpec()).updated(
        names, dict(parse_option_assignment(a) for a in assignments)
    )
    spec.check()
    model = Tokenizer(spec)
    table = Table(title="pipeline")
    for column in ("kind", "component", "parameters", "options"):
        table.add_column(column)
    counts = model.parameter_counts()
    for kind in PIPELINE_KINDS:
        component = spec.component(kind)
        table.add_row(kind, component.name, f"{counts[kind]:,}", ", ".join(f"{k}={v}" for k, v in component.options.items()))
    table.add_row("total", "", f"{sum(counts.values()):,}", "")
    console.print(table)
    console.print(f"max tokens per {image_size}×{image_size} image: {model.num_global} global + "
                  f"{model.max_tokens(image_size, image_size)} patch   spec digest: {spec.digest()}")
    if check:
        model.eval()
        images = torch.rand(2, model.encoder.channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        with torch.no_grad():
            out = model(images)
        elapsed = time.perf_counter() - start
        if out.reconstruction.shape != images.shape:
            raise SpecError(f"check failed: reconstruction {tuple(out.reconstruction.shape)} != input {tuple(images.shape)}")
        console.print(f"[green]check passed[/]: forward on {tuple(images.shape)} in {elapsed * 1000:.0f} ms, "
                      f"tokens kept per image {out.selection.lengths.tolist()} of {out.selection.num_patches}")
    if output:
        spec.save(output)
        console.print(f"wrote {output}")
    elif not check:
        console.print(spec.to_toml(), highlight=False, markup=False)


COMMANDS = [plugins, compose]
