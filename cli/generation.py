"""``tatok train-prior`` and ``tatok sample``: autoregressive priors over token sets, and images from them."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from tatok_cli.console import console
from tatok_core.workflows import generation
from tatok_core.contract.errors import GenerationError
from tatok_core.io.images import tile_images, write_image
from tatok_core.contract.spec import parse_option_assignment
from tatok_core.io.tokenfile import TokenDataset
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_grid(_: click.Context, __: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    rows, sep, cols = value.lower().partition("x")
    if not (sep and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise click.BadParameter(f"expected ROWSxCOLS such as 8x8, got {value!r}")
    return int(rows), int(cols)


@click.command("train-prior")
@click.argument("tokens", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory for the trained prior")
@click.option("--generator", "name", default="adaptive", show_default=True,
              help="generator component: adaptive (kept tokens + EOS), raster (every token), "
                   "context (local, in raster order: a code length), or a plugin's")
@click.option("--steps", default=2000, show_default=True, help="optimisation steps")
@click.option("--batch-size", default=32, show_default=True, help="images per step")
@click.option("--lr", default=3e-4, show_default=True, help="peak learning rate (warm-up, then cosine)")
@click.option("--seed", default=0, show_default=True, help="seeds the initialisation and the batches")
@click.option("--set", "assignments", multiple=True, metavar="OPTION=VALUE",
              help="generator option, e.g. width=256 or depth=6 (VALUE read as TOML)")
@click.option("--eval", "eval_tokens", type=click.Path(exists=True, path_type=Path),
              help="held-out token set (same tokenizer) to report bits/image on")
@click.option("--validation", "validation_tokens", type=click.Path(exists=True, path_type=Path),
              help="token set of other images (not --eval's): keep the weights that score best on it")
def train_prior(tokens: Path, out_dir: Path, name: str, steps: int, batch_size: int, lr: float, seed: int,
                assignments: tuple[str, ...], eval_tokens: Path | None, validation_tokens: Path | None) -> None:
    """Train an autoregressive prior on the token set TOKENS; report bits/image; save it in --out."""
    if (out_dir / generation.PRIOR_FILE).exists():
        raise GenerationError(f"{out_dir} already holds a prior; choose another --out")
    dataset = TokenDataset(tokens)
    held_out = TokenDataset(eval_tokens) if eval_tokens else None
    options = dict(parse_option_assignment(a) for a in assignments)
    torch.manual_seed(seed)
    prior = generation.build_generator(name, generation.dataset_facts(dataset), **options).to(_device())
    parameters = sum(p.numel() for p in prior.parameters())
    console.print(f"{name} prior, {parameters:,} parameters, on {len(dataset)} images of {dataset.metadata['tokenizer']}")
    validation = TokenDataset(validation_tokens) if validation_tokens else None
    result = generation.train_prior(prior, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                    validation=validation)
    summary = {"steps": result.steps, "seconds": result.seconds, "tokens": str(tokens),
               "train_bits_per_image": generation.nll_bits_per_image(prior, dataset)}
    if validation is not None:
        summary |= {"best_step": result.best_step, "validation_bits_per_image": result.validation_bits}
    if held_out is not None:
        summary["eval_bits_per_image"] = generation.nll_bits_per_image(prior, held_out)
    generation.save_prior(prior, out_dir, training=summary)
    scores = "  ".join(f"{k.removesuffix('_bits_per_image')} {summary[k]:.1f}" for k in summary if k.endswith("_bits_per_image"))
    console.print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; bits/image: {scores}")
    console.print(f"prior saved in {out_dir}")


@click.command()
@click.argument("prior", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", default=DEFAULT_PRETRAINED, show_default=True,
              help="tokenizer that decodes the samples: a shipped name or a saved directory")
@click.option("-n", "count", default=16, show_default=True, help="number of images")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file for the grid of samples")
@click.option("--temperature", default=1.0, show_default=True, help="> 0; lower is more conservative")
@click.option("--top-k", default=0, show_default=True,
              help="sample among the k most likely choices at every step (each position and code digit); 0 = all")
@click.option("--seed", default=0, show_default=True)
@click.option("--grid", callback=_parse_grid, metavar="ROWSxCOLS", help="patch grid (default: the prior's)")
def sample(prior: Path, model: str, count: int, output: Path, temperature: float, top_k: int, seed: int,
           grid: tuple[int, int] | None) -> None:
    """Sample images from the prior PRIOR and decode them with the tokenizer into one PNG grid."""
    device = _device()
    generator = generation.load_prior(prior, map_location=device)
    tokenizer = Tokenizer.from_pretrained(model).to(device)
    facts = generator.facts_in.values
    if facts.get("spec_digest") not in (None, tokenizer.spec.digest()):
        raise GenerationError(
            f"{prior} models tokens of tokenizer {facts.get('tokenizer')!r} (spec {facts['spec_digest']}); "
            f"{model} has spec {tokenizer.spec.digest()}: pass that tokenizer with --model"
        )
    start = time.perf_counter()
    tokens = generation.sample(generator, count, temperature=temperature, top_k=top_k, grid=grid, seed=seed)
    seconds = time.perf_counter() - start
    write_image(output, tile_images(tokenizer.decode(tokens)))
    console.print(f"{count} samples in {seconds:.2f} s ({count / seconds:.1f}/s), "
                  f"{float(tokens.lengths.double().mean()):.1f} of {tokens.num_patches} patch tokens per image "
                  f"on average → {output}")


COMMANDS = [train_prior, sample]
