"""``tatok train``: run a recipe (or a bare spec) on built-in photos or a folder of images."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import click

from tatok_cli.console import console
from tatok_cli.options import at_least
from tatok_core.contract.errors import SpecError
from tatok_core.contract.spec import OptionValue, parse_option_assignment
from tatok_core.workflows.training import (RECONSTRUCTION_LOSSES, Recipe, TrainConfig, World, resumed_config,
                                           train as run_training)

#: Lower bounds of numeric [train] settings: (bound, whether the bound itself is allowed).
_LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "batch_size": (1, True), "crop": (1, True), "lr": (0, False), "min_lr_ratio": (0, True), "warmup": (0, True),
    "weight_decay": (0, True), "grad_clip": (0, False), "quantizer_weight": (0, True), "entropy_weight": (0, True),
    "eval_every": (1, True), "eval_crops": (1, True), "checkpoint_every": (1, True), "threads": (0, True),
}
_CHOICES: dict[str, tuple[str, ...]] = {"reconstruction": RECONSTRUCTION_LOSSES}


def check_train_setting(key: str, value: OptionValue) -> None:
    """Refuse a ``train.KEY=VALUE`` of the wrong type or range, naming it (TrainConfig's defaults give the types)."""
    fields = {f.name: f for f in attrs.fields(TrainConfig)}
    if key not in fields or not isinstance(fields[key].default, (bool, int, float, str)):
        return  # TrainConfig.from_dict names unknown settings with the known ones
    kind = type(fields[key].default)
    ok_type = (int, float) if kind is float else (kind,)
    if not isinstance(value, ok_type) or (isinstance(value, bool) and kind is not bool):
        raise SpecError(f"train.{key}={value!r}: expected {'a number' if kind is float else kind.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"train.{key}={value!r}: expected a finite number")
    if key in _LOWER_BOUNDS and not isinstance(value, bool):
        bound, inclusive = _LOWER_BOUNDS[key]
        if value < bound or (value == bound and not inclusive):
            raise SpecError(f"train.{key}={value!r}: must be {'>=' if inclusive else '>'} {bound}")
    if key == "min_lr_ratio" and value > 1:
        raise SpecError(f"train.{key}={value!r}: must be <= 1")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise SpecError(f"train.{key}={value!r}: choose one of {', '.join(_CHOICES[key])}")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", default="builtin:photos", show_default=True,
              help="builtin:photos[:heldout|:all], a folder (recursive) or glob of images, or tar shards "
                   "such as 'shards/train-{0000..0003}.tar'")
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="run directory")
@click.option("--steps", type=int, help="override [train] steps")
@click.option("--batch-size", type=int, callback=at_least(1), help="override [train] batch_size (per process)")
@click.option("--workers", type=int, help="override [train] workers: DataLoader processes per training process")
@click.option("--set", "assignments", multiple=True, metavar="train.SETTING=VALUE|KIND.OPTION=VALUE",
              help="override a training setting or a component option")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
def train(recipe: Path, data: str, run_dir: Path, steps: int | None, batch_size: int | None, workers: int | None,
          assignments: tuple[str, ...], resume: bool) -> None:
    """Train a tokenizer. Under `torchrun --nproc_per_node=N` the same command trains data-parallel."""
    loaded = Recipe.load(recipe)
    train_overrides = {"steps": steps, "batch_size": batch_size, "workers": workers}
    spec_overrides = {}
    for key, value in map(parse_option_assignment, assignments):
        if key.startswith("train."):
            train_overrides[key.removeprefix("train.")] = value
        else:
            spec_overrides[key] = value
    given = {k: v for k, v in train_overrides.items() if v is not None}
    for key, value in given.items():
        check_train_setting(key, value)
    # --resume continues the run's own plan (steps, schedule, …); only options given now change it
    config = (resumed_config(run_dir, loaded.train, given) if resume
              else TrainConfig.from_dict({**attrs.asdict(loaded.train), **given}))
    spec = loaded.spec.updated({}, spec_overrides)
    spec.check()
    world = World.from_environment()
    result = run_training(spec, config, data, run_dir, resume=resume, world=world)
    if world.is_main:
        summary = "  ".join(f"{k} {v:.2f}" for k, v in result.final_eval.items() if k != "step")
        console.print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min  {summary}")
        console.print(f"model saved in {result.run_dir / 'final'}")
    if result.skipped:
        console.print(f"skipped {result.skipped} unreadable sample(s) on rank {world.rank} (named above)")


COMMANDS = [train]
