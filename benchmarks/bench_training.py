"""Training step time in float32 and under bfloat16 autocast, side by side in one run.

    python benchmarks/bench_training.py                                   # the default's first stage, 120 steps
    python benchmarks/bench_training.py --recipe recipes/small8-covered.toml --init runs/…/stage1/final

Why: a recipe's minutes are its budget (the default trains in at most an hour on a 2-core CPU), so a
faster step is more steps, not a shorter run. Both precisions train the same recipe from the same seed
on the same stream of crops; the seconds per step are taken from the history after its first logging
window (start-up and the first step's allocations excluded), and the two loss curves are compared line
by line so a speed-up that changed what is learned shows. CPUs with AVX512-BF16 or AMX run bfloat16
matrix products natively; without them autocast still works, usually slower (the JSON says which CPU).
Why a stage's speed-up can vanish: the record also times one linear layer (the encoder's MLP width)
forward and back over the same number of calls with a fixed and with a changing number of rows, as
the packed kept sets of the adaptive stage change every step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import environment, invocation, save_record  # noqa: E402
from tatok_core.contract.spec import PipelineSpec, parse_option_assignment  # noqa: E402
from tatok_core.workflows.training import Recipe, TrainConfig, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIRST_STAGE = REPO / "recipes" / "baselines" / "fixed.toml"
# the default's first stage, as recipes/small8-covered.toml records it
FIRST_STAGE_SETTINGS = ("global_tokenizer.anchored=4", "global_tokenizer.relative_positions=true")


def seconds_per_step(history: list[dict[str, float]]) -> float:
    """Wall seconds per step between the first and the last logged step."""
    if len(history) < 2:
        raise SystemExit("bench_training: need at least two logged steps; raise --steps")
    first, last = history[0], history[-1]
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def linear_seconds(rows: Sequence[int], bf16: bool, width: int = 192) -> float:
    """Seconds for one ``width`` → 4·``width`` linear layer forward and back, once per entry of ``rows``."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(width, 4 * width)
    start = time.perf_counter()
    for count in rows:
        x = torch.randn(count, width, requires_grad=True)  # (rows, width)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)  # (rows, 4·width)
        y.float().sum().backward()
    return time.perf_counter() - start


def shape_cost(calls: int = 60) -> dict[str, dict[str, float]]:
    """The linear layer's seconds with a fixed row count and with row counts drawn anew for every call
    (the same mean), per precision; one untimed warm-up call each."""
    changing = torch.randint(1024, 2049, (calls,), generator=torch.Generator().manual_seed(0)).tolist()
    fixed = [1536] * calls
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        linear_seconds(fixed[:1], bf16)
        out[name] = {"fixed_rows_s": linear_seconds(fixed, bf16), "changing_rows_s": linear_seconds(changing, bf16)}
    return out


def run(spec: PipelineSpec, config: TrainConfig, data: str, bf16: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_training_") as run_dir:
        result = train(spec, attrs.evolve(config, bf16=bf16), data, run_dir, progress=False)
    return {"seconds_per_step": seconds_per_step(result.history),
            "loss": [(line["step"], line["train_loss"]) for line in result.history]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=FIRST_STAGE)
    parser.add_argument("--set", dest="settings", action="append", default=None, metavar="KIND.OPTION=VALUE",
                        help="component options (default for the first stage's recipe: the default's, "
                        f"{' '.join(FIRST_STAGE_SETTINGS)})")
    parser.add_argument("--init", default="", help="weights to start from (train.init), e.g. a first stage")
    parser.add_argument("--data", default="builtin:photos:extended",
                        help="training data (builtin:photos without the Debian photos)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench_training.json")
    args = parser.parse_args(argv)
    recipe = Recipe.load(args.recipe)
    settings = args.settings if args.settings is not None else (
        FIRST_STAGE_SETTINGS if args.recipe.resolve() == FIRST_STAGE else ())
    if any(text.startswith("train.") for text in settings):
        parser.error("--set takes component options; the training settings are --steps, --threads, --init")
    spec = recipe.spec.updated({}, dict(parse_option_assignment(text) for text in settings))
    config = attrs.evolve(recipe.train, steps=args.steps, threads=args.threads, eval_data="", init=args.init,
                          warmup=min(recipe.train.warmup, args.steps // 4), checkpoint_every=args.steps)
    runs = {name: run(spec, config, args.data, bf16) for name, bf16 in (("fp32", False), ("bf16", True))}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    record = {
        "command": invocation(__file__, argv), "environment": environment(), "recipe": str(args.recipe),
        "settings": list(settings), "init": args.init, "data": args.data, "steps": args.steps,
        "batch_size": config.batch_size, "crop": config.crop, **runs,
        "bf16_over_fp32_time": bf16["seconds_per_step"] / fp32["seconds_per_step"],
        "loss_max_abs_difference": max(abs(a[1] - b[1]) for a, b in zip(fp32["loss"], bf16["loss"])),
        "linear_layer": shape_cost(),
    }
    native = ", ".join(record["environment"]["native_bf16"]) or "none"
    print(f"{args.recipe.name}, {args.steps} steps of {config.batch_size}×{config.crop}², {args.threads} threads "
          f"(native bf16: {native}): fp32 {fp32['seconds_per_step']:.3f} s/step, "
          f"bf16 {bf16['seconds_per_step']:.3f} s/step, ratio {record['bf16_over_fp32_time']:.2f}; "
          f"loss curves differ by at most {record['loss_max_abs_difference']:.4f}")
    print("one linear layer, fixed / changing row counts: " + "; ".join(
        f"{name} {t['fixed_rows_s']:.2f} / {t['changing_rows_s']:.2f} s" for name, t in record["linear_layer"].items()))
    save_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
