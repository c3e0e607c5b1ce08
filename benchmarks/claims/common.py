"""Shared pieces of the claims suite: settings per mode, the run context, data, one-pass analysis,
scoring, curve interpolation and output files.

Every measurement follows one pattern: run the expensive half of the pipeline (:meth:`Tokenizer.analyse`:
encoder, global tokens, quantizer, entropy model) **once** per image, keep codes and bits, then re-run
only the token filter and the decoder for each operating point. Scores are per image and kept in the
JSON, so any summary can be recomputed without running a model again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from tatok_core.workflows import analysis
from tatok_core.workflows.batching import group_by_size
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.contract.bitrate import token_bits
from tatok_core.ops.dtf.reference import descending_order, keep_first
from tatok_core.contract.errors import TatokError
from tatok_core.io.images import fit_longest_side
from tatok_core.contract.interfaces import TokenFilter
from tatok_core.workflows.metrics import psnr, ssim
from tatok_core.contract.selection import Selection
from tatok_core.contract.registry import get_registry
from tatok_core.io.atomic import atomic_write_text
from tatok_core.workflows.plotting import save_figure  # noqa: F401  (the claims modules draw through it)
from tatok_core.contract.spec import PipelineSpec
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.training import FINAL, Recipe, TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "runs" / "claims"
DEFAULT_RECIPE = REPO / "recipes" / "tiny.toml"
DEFAULT_MODEL = "tatok-tiny"
HELDOUT = "builtin:photos:heldout"


# -- settings ------------------------------------------------------------------------------------
@attrs.frozen
class Settings:
    """How much of everything a mode measures. ``train_steps`` None means the recipe's own steps."""

    mode: str
    crop: int  # side of the held-out evaluation crops
    crops: int  # how many (round-robin over the held-out photos, fixed seed)
    photo_side: int  # whole photos are downscaled so the longest side is at most this
    budgets: tuple[float, ...]  # RD sweep: target mean kept patch tokens, as fractions of N
    total_budgets: tuple[float, ...]  # insufficiency ablation: total tokens (globals + patches) / N
    drop_fractions: tuple[float, ...]  # redundancy ablation: fractions of patch tokens kept
    drop_on_photos: bool  # also run the drop curves on whole photos (slow: one decode per point per photo)
    train_steps: int | None  # steps of the trained variants (fixed-rate, DTF, patch-only)
    prior_steps: int  # steps of the with/without-globals priors trained on the frozen model
    prior_crops: int  # training crops those priors see (features cached once)
    prior_batch: int
    throughput: tuple[tuple[int, int], ...]  # (side, batch) pairs
    min_run_time: float  # torch.utils.benchmark per measurement, seconds
    batch_size: int = 32
    seed: int = 0
    floor_range: tuple[float, float] = (0.1, 0.75)  # kept fractions where the DTF-vs-random floor is read


MODES: dict[str, Settings] = {
    # A tiny run that only checks the scripts work (tests/test_claims_smoke.py).
    "smoke": Settings(
        mode="smoke", crop=16, crops=2, photo_side=24, budgets=(0.5,), total_budgets=(0.75,),
        drop_fractions=(1.0, 0.5), drop_on_photos=False, train_steps=1, prior_steps=2, prior_crops=8,
        prior_batch=4, throughput=((16, 2),), min_run_time=0.0, batch_size=8, floor_range=(0.0, 1.0),
    ),
    # < 20 minutes on 2 cores: three short trainings (1000 steps each, ~3 min apiece) dominate.
    "quick": Settings(
        mode="quick", crop=64, crops=64, photo_side=256, budgets=(0.1, 0.2, 0.35, 0.5, 0.7, 0.85),
        total_budgets=(0.1, 0.25, 0.5, 0.75), drop_fractions=(1.0, 0.9, 0.75, 0.5, 0.25, 0.1),
        drop_on_photos=False, train_steps=1000, prior_steps=800, prior_crops=4096, prior_batch=32,
        throughput=((32, 64), (128, 8), (256, 2)), min_run_time=1.0,
    ),
    # The full recipe for every trained variant (hours on 2 cores), denser sweeps, more crops.
    "full": Settings(
        mode="full", crop=64, crops=256, photo_side=256,
        budgets=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        total_budgets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9), drop_fractions=(1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.25, 0.1, 0.05),
        drop_on_photos=True, train_steps=None, prior_steps=4000, prior_crops=16384, prior_batch=64,
        throughput=((32, 64), (128, 8), (256, 2)), min_run_time=3.0,
    ),
}


# -- the run context -------------------------------------------------------------------------------
VARIANTS = {
    "dtf": "the recipe as is (global tokens + DTF in training)",
    "fixed": "the recipe with filter 'all': every patch token kept in training (the classic fixed-rate tokenizer)",
    "patch-only": "the recipe with global_tokenizer 'none'; the encoder gains the global tokenizer's blocks "
                  "(equal depth before quantization)",
}


def variant_spec(spec: PipelineSpec, variant: str) -> PipelineSpec:
    """The recipe's spec changed as ``variant`` says (see :data:`VARIANTS`)."""
    if variant == "dtf":
        return spec
    if variant == "fixed":
        return spec.updated({"filter": get_registry().name_for_role("filter", "keep-all")}, {})
    if variant == "patch-only":
        extra = int(spec.global_tokenizer.options.get("depth", 2)) if spec.global_tokenizer.name == "learned" else 0
        depth = int(spec.encoder.options.get("depth", 4)) + extra
        options = {"encoder.depth": depth} if spec.encoder.name == "vit" and extra else {}
        return spec.updated({"global_tokenizer": "none"}, options)
    raise TatokError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


def variant_config(config: TrainConfig, steps: int | None) -> TrainConfig:
    """The recipe's training settings with ``steps`` overridden (warm-up at most a tenth of the run),
    evaluation and checkpoint only at the end (they would cost time, not change the weights)."""
    steps = config.steps if steps is None else steps
    warmup = max(1, min(config.warmup, steps // 10)) if steps != config.steps else config.warmup
    return attrs.evolve(config, steps=steps, warmup=warmup, eval_every=steps, checkpoint_every=steps)


@attrs.define
class Context:
    """What every part needs: the model under test, the recipe for trained variants, where to write."""

    settings: Settings
    model: Tokenizer
    model_label: str
    recipe: Recipe
    out_dir: Path
    console: Console = attrs.field(factory=Console)
    progress: bool = True
    models_dir: Path | None = None
    _variants: dict[str, tuple[Tokenizer, dict[str, Any]]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.models_dir is None:
            self.models_dir = self.out_dir / "models"

    @property
    def train_steps(self) -> int:
        return self.recipe.train.steps if self.settings.train_steps is None else self.settings.train_steps

    def variant(self, name: str) -> tuple[Tokenizer, dict[str, Any]]:
        """A model trained with the recipe changed as ``name`` says, at this mode's step budget.

        Trained once and kept under ``models_dir`` (reused by later runs with the same spec and
        settings). In full mode the "dtf" variant *is* the model under test when that model was
        trained from the same spec (the shipped tatok-tiny and recipes/tiny.toml).
        """
        if name in self._variants:
            return self._variants[name]
        spec = variant_spec(self.recipe.spec, name)
        config = variant_config(self.recipe.train, self.settings.train_steps)
        if name == "dtf" and config.steps == self.recipe.train.steps and spec.digest() == self.model.spec.digest():
            info = {"variant": name, "source": self.model_label, "steps": config.steps, "trained_here": False,
                    "spec_digest": spec.digest(), "description": VARIANTS[name]}
            self._variants[name] = (self.model, info)
            return self._variants[name]
        assert self.models_dir is not None
        run_dir = self.models_dir / f"{name}-{spec.digest()[:8]}-{config.steps}steps"
        record = run_dir / "claims_train.json"
        expected = {"spec": spec.to_dict(), "train": attrs.asdict(config)}
        if (run_dir / FINAL / "model.safetensors").is_file() and record.is_file() \
                and {k: v for k, v in json.loads(record.read_text()).items() if k in expected} == expected:
            seconds = json.loads(record.read_text())["seconds"]
            self.console.print(f"[dim]reusing {run_dir} ({name}, {config.steps} steps)")
        else:
            self.console.print(f"[bold]training variant {name!r}[/]: {VARIANTS[name]}; {config.steps} steps -> {run_dir}")
            resume = (run_dir / "checkpoint.pt").exists()
            result = train(spec, config, "builtin:photos", run_dir, resume=resume, progress=self.progress)
            seconds = result.seconds
            write_json(record, {**expected, "seconds": seconds, "final_eval": dict(result.final_eval)})
        model = Tokenizer.from_pretrained(run_dir / FINAL).eval()
        info = {"variant": name, "source": str(run_dir), "steps": config.steps, "trained_here": True,
                "seconds": seconds, "spec_digest": spec.digest(), "description": VARIANTS[name],
                "parameters": sum(p.numel() for p in model.parameters())}
        self._variants[name] = (model, info)
        return self._variants[name]


def invocation(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a benchmark run: ``python benchmarks/NAME.py`` and its arguments
    (``argv`` when called from Python, else the process's own)."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def environment() -> dict[str, Any]:
    """Machine facts recorded next to every number; ``native_bf16``: the CPU's bfloat16 instruction sets
    (AVX512-BF16, AMX), without which bfloat16 autocast is emulated."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    first_cpu = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in reversed(lines))}
    cpu = first_cpu.get("model name") or platform.processor() or platform.machine()
    native_bf16 = sorted(set(first_cpu.get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "native_bf16": native_bf16,
            "cores": os.cpu_count(),
            "python": platform.python_version(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def model_facts(model: Tokenizer, label: str) -> dict[str, Any]:
    return {"label": label, "spec_digest": model.spec.digest(), "num_global": model.num_global,
            "patch_size": model.patch_size, "filter": model.spec.filter.name,
            "parameters": sum(p.numel() for p in model.parameters())}


# -- data ------------------------------------------------------------------------------------------
def heldout_crops(settings: Settings) -> Tensor:
    """(crops, 3, crop, crop) fixed crops, round-robin over the held-out photos (never seen in training)."""
    return fixed_crops(ImageSource(HELDOUT).images, settings.crop, settings.crops, seed=settings.seed)


def load_photos(settings: Settings, data: str = HELDOUT) -> tuple[list[str], list[Tensor]]:
    """Whole photos of ``data``, downscaled so the longest side is ``photo_side``."""
    source = ImageSource(data)
    names = [Path(n).stem for n in source.names]
    return names, [fit_longest_side(im, settings.photo_side) for im in source.images]


# -- analysis once, filters many times ---------------------------------------------------------------
@attrs.frozen(eq=False)
class Batch(analysis.Analysed):
    """Same-size images analysed (codes and bits on the CPU: the core's
    :class:`~tatok_core.workflows.analysis.Analysed`), with their places in the evaluated set."""

    indices: list[int]  # positions of these images in the evaluated set
    images: Tensor  # (B, C, H, W) unpadded

    @property
    def num_patches(self) -> int:
        return self.bits.shape[1]


@attrs.frozen(eq=False)
class Analysed:
    batches: list[Batch]
    count: int

    @property
    def patches(self) -> list[int]:
        """N per image, in set order."""
        out = [0] * self.count
        for b in self.batches:
            for i in b.indices:
                out[i] = b.num_patches
        return out

    @property
    def mean_patches(self) -> float:
        return float(np.mean(self.patches))

    def bits(self) -> list[Tensor]:
        return [b.bits for b in self.batches]


@torch.no_grad()
def analyse(model: Tokenizer, images: Tensor | Sequence[Tensor], batch_size: int = 32) -> Analysed:
    """Run encoder → global tokens → quantizer → entropy once per image."""
    model.eval()
    batches = []
    for indices, batch in group_by_size(enumerate(images), batch_size):
        analysed = analysis.Analysed.of(model, batch)
        batches.append(Batch(**attrs.asdict(analysed, recurse=False), indices=indices, images=batch))
    return Analysed(batches, len(images))


Chooser = Callable[[Batch], Selection]


def rank_select(scores: Tensor, counts: Tensor) -> Selection:
    """Keep counts[b] tokens of row b, highest score first (ties: smaller position)."""
    counts = torch.minimum(counts.to(torch.int64), torch.tensor(scores.shape[1]))
    return Selection.from_mask(keep_first(descending_order(scores), counts))


def random_scores(bits: Tensor, seed: int) -> Tensor:
    return torch.rand(bits.shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def score(model: Tokenizer, analysed: Analysed, choose: Chooser, positions_from_count: bool = False) -> dict[str, list[float]]:
    """Per image: patch tokens kept, PSNR, SSIM, the share of the image's bits that were kept, and bits per
    pixel (:func:`tatok_core.contract.bitrate.token_bits`: codes + globals + which tokens were kept)."""
    keys = ("tokens", "psnr", "ssim", "bits_kept", "bpp", "bpp_side")
    out: dict[str, list[float]] = {key: [math.nan] * analysed.count for key in keys}
    for batch in analysed.batches:
        selection = choose(batch)
        reconstruction = model.decode(batch.tokens(selection)).cpu()
        cost = token_bits(selection.lengths, batch.num_patches, model.num_global, model.quantizer.codebook_size,
                          batch.image_size, positions_from_count=positions_from_count)
        values = {
            "bpp": cost.bpp(),
            "bpp_side": cost.bpp("side"),
            "tokens": selection.lengths.double(),
            "psnr": psnr(reconstruction, batch.images).double(),
            "ssim": ssim(reconstruction, batch.images),
            "bits_kept": (batch.bits * selection.keep).sum(1).double() / batch.bits.sum(1).double().clamp_min(1e-12),
        }
        for key, value in values.items():
            for j, i in enumerate(batch.indices):
                out[key][i] = float(value[j])
    return out


def point(per_image: dict[str, list[float]], **fields: Any) -> dict[str, Any]:
    """An operating point: its fields, means over images, and the per-image values."""
    means = {f"mean_{k}" if k == "tokens" else k: float(np.mean(v)) for k, v in per_image.items()}
    return {**fields, **means, "per_image": {k: [round(x, 5) for x in v] for k, v in per_image.items()}}


def adaptive_filter(model: Tokenizer) -> TokenFilter:
    """The filter under test, in its per-image τ rule (the claims sweep τ): the model's own when it has
    the entropy rules (its options), else the registered filter of role "entropy-rules" at its defaults."""
    own = model.tau_filter()
    return own if own.role == "entropy-rules" else model.baseline_filter("entropy-rules")


def calibrate(model: Tokenizer, analysed: Analysed, budget: float) -> float | None:
    """τ at which DTF keeps ``budget`` patch tokens per image on average (None: not reachable)."""
    from tatok_core.workflows.rate_control import calibrate_bits

    try:
        return calibrate_bits(adaptive_filter(model), analysed.bits(), budget).tau
    except TatokError:
        return None


# -- curves ----------------------------------------------------------------------------------------
def curve(points: Iterable[dict[str, Any]], key: str = "psnr") -> tuple[list[float], list[float]]:
    """(tokens, metric) sorted by tokens."""
    pairs = sorted((p["mean_tokens"], p[key]) for p in points)
    return [x for x, _ in pairs], [y for _, y in pairs]


def interp_y(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of the curve at x (None outside its range)."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, ys))


def x_reaching(xs: Sequence[float], ys: Sequence[float], y: float) -> float | None:
    """The fewest tokens at which the curve (linear between points) first reaches y (None: never)."""
    for i, (x1, y1) in enumerate(zip(xs, ys)):
        if y1 >= y:
            if i == 0:
                return float(x1)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x1 - x0) * (y - y0) / (y1 - y0)) if y1 != y0 else float(x1)
    return None


# -- floors --------------------------------------------------------------------------------------------
def floor(name: str, value: float | None, threshold: float, detail: str) -> dict[str, Any]:
    """A PASS/FAIL line (SKIP when it could not be measured); reported, never asserted."""
    status = "SKIP" if value is None or not math.isfinite(value) else ("PASS" if value >= threshold else "FAIL")
    return {"name": name, "status": status, "value": value, "threshold": threshold, "detail": detail}


def print_floors(console: Console, floors: Sequence[dict[str, Any]]) -> None:
    colour = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}
    for f in floors:
        value = "n/a" if f["value"] is None else f"{f['value']:+.2f}"
        console.print(f"[bold {colour[f['status']]}]{f['status']}[/]  {f['name']}: {value} "
                      f"(floor {f['threshold']:+.2f})  {f['detail']}")


# -- output ------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> Path:
    """Atomic JSON write (a kill never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def photo_run(script: str, argv: Sequence[str] | None, args: argparse.Namespace,
              photo_names: Sequence[str]) -> dict[str, Any]:
    """The head of a photo benchmark's record: how to rerun it, on what machine, which model, data, side
    (``args.model``, ``args.data``, ``args.side``) and photos."""
    return {"command": invocation(script, argv), "environment": environment(), "model": args.model,
            "data": args.data, "side": args.side, "photos": list(photo_names)}


def save_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a benchmark run's JSON record (:func:`write_json`), say where, and hand it back."""
    write_json(path, record)
    print(f"→ {path}")
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")




def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    return t


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


# -- standalone scripts ------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="< 20 min on 2 cores (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="full recipe, denser sweeps (hours)")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help=argparse.SUPPRESS)
    parser.set_defaults(mode="quick")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="shipped name or saved directory (default: tatok-tiny)")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe of the trained variants (default: recipes/tiny.toml)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: runs/claims)")
    parser.add_argument("--models-dir", default=None, help="where trained variants are kept (default: OUT/models)")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps of the trained variants")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def make_console() -> Console:
    """Wide tables also when the output goes to a file or a pipe (rich would assume 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=170)


def context_from_args(args: argparse.Namespace, console: Console | None = None) -> Context:
    settings = MODES[args.mode]
    if args.steps is not None:
        settings = attrs.evolve(settings, train_steps=args.steps)
    console = console or make_console()
    try:
        model = Tokenizer.from_pretrained(args.model).eval()
    except TatokError as exc:
        hint = " (tatok-tiny ships once runs/tiny/final is copied to plugins/pretrained/tatok-tiny/; " \
               "meanwhile pass --model runs/tiny/final)" if args.model == DEFAULT_MODEL else ""
        raise SystemExit(f"cannot load model {args.model!r}: {exc}{hint}") from exc
    recipe = Recipe.load(args.recipe)
    return Context(settings, model, str(args.model), recipe, Path(args.out), console=console,
                   progress=not args.no_progress, models_dir=Path(args.models_dir) if args.models_dir else None)


def standalone(run: Callable[[Context], dict[str, Any]], description: str, argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.claims.<part>``: parse the common arguments and run one part."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    ctx = context_from_args(args)
    result = run(ctx)
    print_floors(ctx.console, result.get("floors", []))
    return 0


def ensure_repo_on_path() -> None:
    """Let ``python benchmarks/claims/<part>.py`` import ``benchmarks.claims`` like ``-m`` does."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
