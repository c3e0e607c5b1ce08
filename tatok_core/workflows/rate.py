"""Rate control and the token-file workflows the ``tatok`` CLI is thin over.

* :func:`calibrate_bits` — ONE threshold for a whole set of images (cached bits) at which the filter keeps
  a target *mean* number of patch tokens per image: an absolute θ or ε (the default meaning of a budget:
  images that hold more information get more tokens) or a per-image τ (every image keeps a similar share).
* :func:`calibrate_tau` — the same from images, analysing each once.
* :func:`encode_files` / :func:`decode_tokens` — image files ↔ a token data set (:mod:`tatok_core.io.tokenfile`).
* :func:`evaluate_rate_distortion` + :func:`plot_rate_distortion` — the model's filter against shared
  thresholds, fixed-count baselines and an oracle at matched mean counts, in tokens and bits per pixel
  (:mod:`tatok_core.contract.bitrate`).
* :func:`show_panel` — what DTF keeps for one image, and what it costs.

Every workflow runs the expensive half of the pipeline (encoder, global tokens, quantizer, entropy
model: :meth:`Tokenizer.analyse`) **once** per image and re-runs only the cheap token filter for each
threshold or baseline: the nesting guarantees make the kept count monotone in τ, θ and ε, so bisection
on stored bits finds a budget's threshold without touching the network again.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from tatok_core.workflows.allocation import oracle_allocation
from tatok_core.contract.bitrate import token_bits
from tatok_core.ops.dtf.reference import descending_order, keep_first
from tatok_core.contract.errors import ImageReadError, SpecError, TatokError
from tatok_core.io.images import list_images, read_image, write_image
from tatok_core.contract.interfaces import Grid, TokenFilter
from tatok_core.workflows.metrics import psnr, ssim
from tatok_core.contract.selection import Selection
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.pipeline.tokenizer import Analysis, Tokenizer
from tatok_core.contract.tokens import ImageTokens, Tokens

#: Bisection halvings: 24 reach the float32 resolution at which DTF applies τ.
MAX_BISECTION_STEPS = 24


# -- shared pieces ------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class _Analysed:
    """The part of an :class:`Analysis` that filtering and decoding need: codes and bits, on the CPU.

    Small (about 12 bytes per patch), so a whole data set's worth can wait for τ to be calibrated.
    """

    global_codes: Tensor  # (B, M)
    patch_codes: Tensor  # (B, N)
    bits: Tensor  # (B, N)
    grid: Grid
    image_size: tuple[int, int]

    @classmethod
    def of(cls, analysis: Analysis) -> _Analysed:
        return cls(analysis.globals_.codes.cpu(), analysis.patches.codes.cpu(), analysis.entropy.bits.float().cpu(),
                   analysis.grid, analysis.image_size)

    def tokens(self, selection: Selection) -> Tokens:
        """The kept tokens, laid out exactly as :meth:`Tokenizer.encode` lays them out."""
        return Tokens.from_selection(self.global_codes, self.patch_codes, selection, self.grid, self.image_size)


@contextlib.contextmanager
def _inference(model: Tokenizer) -> Iterator[torch.device]:
    """Eval mode and no autograd for the duration; yields the model's device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)


def check_tau(tau: float) -> float:
    """τ as a float in [0, 1], or a one-line error."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise TatokError(f"tau must be a number in [0, 1], got {tau!r}")
    return float(tau)


def check_bits_threshold(name: str, value: float) -> float:
    """θ or ε (bits) as a finite float ≥ 0, or a one-line error naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TatokError(f"{name} must be a finite number of bits >= 0, got {value!r}")
    return float(value)


#: What a budget calibrates: one shared θ (default), one shared ε, or one shared per-image τ.
BUDGET_MODES = ("theta", "epsilon", "tau")


def check_rate(tau: float | None, budget: float | None, *, theta: float | None = None,
               epsilon: float | None = None, budget_mode: str = "theta") -> str | None:
    """Rate control is ONE of τ, θ, ε or a budget (mean patch tokens per image, > 0), or none (the filter's
    default). Returns the rule it selects ("tau", "theta", "epsilon"; None for the filter's default)."""
    given = [name for name, value in (("tau", tau), ("theta", theta), ("epsilon", epsilon), ("budget", budget))
             if value is not None]
    if len(given) > 1:
        raise TatokError(f"{' and '.join(given)} exclude each other: give one of them")
    if budget_mode not in BUDGET_MODES:
        raise TatokError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got {budget_mode!r}")
    if tau is not None:
        check_tau(tau)
        return "tau"
    for name, value in (("theta", theta), ("epsilon", epsilon)):
        if value is not None:
            check_bits_threshold(name, value)
            return name
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise TatokError(f"budget must be a number of patch tokens per image > 0, got {budget!r}")
        return budget_mode
    return None


def rule_filter(model: Tokenizer, mode: str | None, filter: str | None = None,
                filter_options: Mapping[str, Any] | None = None) -> TokenFilter:
    """The model's filter (or ``filter``) switched to rule ``mode`` ("tau", "theta", "epsilon"; None: as is).

    The spec's filter plays the role; only a DTF-family filter (one with a ``mode`` option) has the
    absolute rules, so asking another for θ or ε is a one-line error. τ is every filter's ``select``
    argument, so it needs no option.
    """
    options = dict(filter_options or {})
    base = model.token_filter(filter, **options)
    if mode is None or (mode == "tau" and not hasattr(base, "mode")):
        return base
    try:
        return model.token_filter(filter, **{**options, "mode": mode})
    except SpecError as exc:
        raise TatokError(f"filter {filter or model.spec.filter.name!r} has no {mode} rule (no 'mode' option): "
                         f"use --budget-mode tau or a DTF-family filter ({exc})") from None


def cannot_tokenize(model: Tokenizer, image: Tensor) -> str | None:
    """Why ``image`` (C, H, W) cannot be tokenized by ``model``, or None when it can.

    Checked before any encoder work. (The filters take any number of patches: their integer sums
    choose the fixed-point precision from N, see :func:`tatok_core.ops.dtf.reference.fixed_point_bits`.)
    """
    height, width = image.shape[-2:]
    p = model.patch_size
    if height < p or width < p:
        return f"image of {height}×{width} is smaller than one {p}×{p} patch"
    return None


def _group_by_size(items: Iterable[tuple[int, Tensor]], batch_size: int) -> Iterator[tuple[list[int], Tensor]]:
    """Batches (indices, (B, C, H, W)) of same-size images, each yielded when full, leftovers at the end.

    Which images share a batch depends on ``batch_size``; callers restore input order, and the
    built-in components give each image the same result in any batch on the CPU (tested), so outputs
    do not depend on it. (GPU kernels picked by batch shape may change low bits, and so a code that
    sits on a quantization boundary.)
    """
    if batch_size < 1:
        raise TatokError(f"batch size must be >= 1, got {batch_size}")
    pending: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    for index, image in items:
        group = pending.setdefault(tuple(image.shape), [])
        group.append((index, image))
        if len(group) == batch_size:
            yield [i for i, _ in group], torch.stack([im for _, im in group])
            group.clear()
    for group in pending.values():
        if group:
            yield [i for i, _ in group], torch.stack([im for _, im in group])


# -- rate control ---------------------------------------------------------------------------------
@attrs.frozen
class RateResult:
    """A calibrated threshold of rule ``mode``, the mean patch tokens per image it keeps, the steps taken."""

    threshold: float
    mean_tokens: float
    iterations: int
    budget: float
    mode: str = "tau"

    @property
    def tau(self) -> float | None:
        """The calibrated τ (None when the rule is θ or ε)."""
        return self.threshold if self.mode == "tau" else None


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over every rank of the default process group (float64, exact for counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t)
    return t.tolist()


def _max_across_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _float32_lattice(value: float) -> int:
    """The float32 ≥ ``value`` ≥ 0 as its bit pattern: non-negative float32 patterns order like the values."""
    f = np.float32(value)
    if float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    return int(np.array(f, dtype=np.float32).view(np.int32))


def _lattice_value(pattern: int) -> float:
    return float(np.array(pattern, dtype=np.int32).view(np.float32))


def calibrate_bits(
    token_filter: TokenFilter,
    bits: Sequence[Tensor],
    budget: float,
    *,
    tol: float = 0.5,
    max_iter: int | None = None,
    distributed: bool = False,
) -> RateResult:
    """ONE threshold of the filter's rule for every image in ``bits`` (batches (B, N)) so that the mean kept
    count is within ``tol`` of ``budget`` (or the closest the step function allows).

    The rule is ``token_filter.mode`` ("tau" for a filter without modes). τ is bisected in [0, 1] by
    dyadic halvings (:data:`MAX_BISECTION_STEPS`); θ and ε are bisected over the float32 values in
    [0, the largest token bits (θ) or image total (ε)] by their bit patterns — every float32 the filter can
    apply, so ≤ 31 steps find the exact step of the count. The floor and cap are the filter's ``min_keep``
    and ``max_keep``. With ``distributed`` every rank of the process group must call this: the range and
    every count are all-reduced, so the mean is over all ranks' images and every rank gets the same value.
    """
    check_rate(None, budget)
    mode = getattr(token_filter, "mode", "tau")

    def mean_at(threshold: float) -> float:
        kept = sum(int(token_filter.select(b, threshold).lengths.sum()) for b in bits)
        count = sum(b.shape[0] for b in bits)
        kept, count = _sum_across_ranks([kept, count]) if distributed else (kept, count)
        if count == 0:
            raise TatokError("cannot calibrate a budget on zero images")
        return kept / count

    if mode == "tau":
        ends, midpoint = (0.0, 1.0), lambda lo, hi: (lo + hi) / 2  # dyadic: exact in float32, short to print
        steps_allowed = MAX_BISECTION_STEPS if max_iter is None else max_iter
    else:
        largest = max((float((b.amax() if mode == "theta" else b.sum(dim=1).amax())) for b in bits if b.numel()),
                      default=0.0)
        largest = _max_across_ranks(largest) if distributed else largest
        ends = (0.0, _lattice_value(_float32_lattice(largest)))
        midpoint = lambda lo, hi: _lattice_value((_float32_lattice(lo) + _float32_lattice(hi)) // 2)  # noqa: E731
        steps_allowed = 32 if max_iter is None else max_iter
    (lo, hi), means = ends, [mean_at(ends[0]), mean_at(ends[1])]
    low, high = min(means), max(means)
    if not low <= budget <= high:
        raise TatokError(f"budget {budget:g} tokens per image is outside what these images can reach: "
                         f"{low:.2f} to {high:.2f} patch tokens on average ({mode} from {lo:g} to {hi:g})")
    increasing = means[1] >= means[0]  # τ: more tokens as it grows; θ, ε: fewer
    best = min((abs(means[0] - budget), lo, means[0]), (abs(means[1] - budget), hi, means[1]))
    steps = 0
    while best[0] > tol and steps < steps_allowed:
        mid = midpoint(lo, hi)
        if mid in (lo, hi):  # the float32 lattice is exhausted: best is the exact step nearest the budget
            break
        steps += 1
        mean = mean_at(mid)
        best = min(best, (abs(mean - budget), mid, mean))
        lo, hi = (mid, hi) if (mean < budget) == increasing else (lo, mid)
    return RateResult(threshold=best[1], mean_tokens=best[2], iterations=steps, budget=float(budget), mode=mode)


def calibrate_threshold(
    model: Tokenizer,
    images_or_batches: Tensor | Iterable[Tensor],
    budget: float,
    mode: str = "theta",
    *,
    tol: float = 0.5,
    max_iter: int | None = None,
    batch_size: int = 32,
    filter: str | None = None,
    **filter_options: Any,
) -> RateResult:
    """The ONE threshold of rule ``mode`` ("theta", "epsilon" or "tau") at which the model's filter keeps
    ``budget`` patch tokens per image on average over these images.

    ``images_or_batches``: a (B, C, H, W) tensor (split into ``batch_size`` chunks) or an iterable of
    such batches (sizes may differ between batches). Bits are computed once per image; see
    :func:`calibrate_bits` for the search. ``min_keep``/``max_keep`` filter options are the per-image
    floor and cap.
    """
    check_rate(None, budget, budget_mode=mode)
    batches = images_or_batches.split(batch_size) if isinstance(images_or_batches, Tensor) else images_or_batches
    token_filter = rule_filter(model, mode, filter, filter_options)
    with _inference(model) as device:
        bits = [model.analyse(batch.to(device)).entropy.bits for batch in batches]
        return calibrate_bits(token_filter, bits, budget, tol=tol, max_iter=max_iter)


def calibrate_tau(
    model: Tokenizer,
    images_or_batches: Tensor | Iterable[Tensor],
    budget: float,
    *,
    tol: float = 0.5,
    max_iter: int = MAX_BISECTION_STEPS,
    batch_size: int = 32,
    filter: str | None = None,
    **filter_options: Any,
) -> RateResult:
    """The per-image τ at which the model's filter keeps ``budget`` patch tokens per image on average."""
    return calibrate_threshold(model, images_or_batches, budget, "tau", tol=tol, max_iter=max_iter,
                               batch_size=batch_size, filter=filter, **filter_options)


# -- encoding files ------------------------------------------------------------------------------
@attrs.frozen
class EncodeReport:
    """What :func:`encode_files` did: images written, files skipped with the reason, the rule and mean tokens.

    ``mode``/``threshold`` are the rule and value applied (None for a filter without one; ``tau`` is the
    threshold when the rule is τ); ``calibration`` is set for a budget.
    """

    encoded: int
    failed: list[tuple[Path, str]]
    tau: float | None
    mean_tokens: float
    calibration: RateResult | None = None
    mode: str | None = None
    threshold: float | None = None


def applied_rule(token_filter: TokenFilter) -> tuple[str | None, float | None]:
    """(rule, default threshold) of a filter: ("tau", 0.9) for DTF's default; (None, None) for count filters."""
    mode = getattr(token_filter, "mode", "tau" if hasattr(token_filter, "tau") else None)
    value = getattr(token_filter, "threshold", getattr(token_filter, "tau", None))
    return (mode, value) if value is not None else (None, None)


def token_meta(
    model: Tokenizer,
    *,
    tau: float | None = None,
    budget: float | None = None,
    filter: str | None = None,
    filter_options: Mapping[str, Any] | None = None,
    theta: float | None = None,
    epsilon: float | None = None,
    budget_mode: str = "theta",
) -> dict[str, Any]:
    """The ``meta`` a :class:`TokenWriter` records for tokens of ``model`` under this rate control.

    ``mode`` and ``threshold`` name the rule and the value applied; without any rate option they are
    the filter's defaults (None for count filters). A budget is recorded as the budget and its mode; its
    threshold is known only after calibration, and :func:`encode_files` adds it
    (:meth:`TokenWriter.update_meta`) before the first image is written — every rank of a torchrun
    calibrates the same value, so every shard carries the same meta. Filter options are those given on
    top of the spec's (which the spec digest pins).
    """
    mode = check_rate(tau, budget, theta=theta, epsilon=epsilon, budget_mode=budget_mode)
    threshold = next((v for v in (tau, theta, epsilon) if v is not None), None)
    if mode is None:
        mode, threshold = applied_rule(model.token_filter(filter, **dict(filter_options or {})))
    rate: dict[str, Any] = {"mode": mode, "threshold": threshold}
    if budget is not None:
        rate["budget"] = budget
    elif mode == "tau":
        rate["tau"] = threshold
    return {
        "codebook_size": model.quantizer.codebook_size,
        "code_factors": list(model.quantizer.code_factors),
        "num_global": model.num_global,
        "patch_size": model.patch_size,
        **rate,
        "filter": {"name": filter or model.spec.filter.name, "options": dict(filter_options or {})},
    }


def source_names(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """Expand inputs like :func:`~tatok_core.io.images.list_images`, naming each file relative to its input.

    A folder's files are named by their path under it (``n01440764/x.jpg``, so class folders
    survive), a glob's by their path under its leading part without wildcards, a file by its name:
    names do not depend on where the data lives, so the same images give the same token file anywhere.
    """
    found: dict[Path, str] = {}
    for item in inputs:
        given = Path(os.fspath(item))
        if given.is_dir():
            root = given
        elif given.is_file():
            root = given.parent
        else:
            fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), given.parts))
            root = Path(*fixed) if fixed else Path()
        for path in list_images([item]):
            found.setdefault(path, path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name)
    return list(found.items())


class _InOrder:
    """Writes images to a :class:`TokenWriter` in input order, whatever order they finish in."""

    def __init__(self, writer: TokenWriter, paths: Sequence[Path], names: Sequence[str]) -> None:
        self.writer, self.paths, self.names = writer, paths, names
        self.finished: dict[int, ImageTokens | None] = {}  # None: skipped
        self.next = 0
        self.images = self.tokens = 0

    def finish(self, index: int, image: ImageTokens | None) -> None:
        self.finished[index] = image
        while self.next in self.finished:
            done = self.finished.pop(self.next)
            if done is not None:
                path = self.paths[self.next]
                self.writer.write(Tokens.from_images([done]), [(self.names[self.next], path.stat().st_size)])
                self.images += 1
                self.tokens += done.codes.numel()
            self.next += 1


def encode_files(
    model: Tokenizer,
    paths: Sequence[str | os.PathLike[str]],
    writer: TokenWriter,
    *,
    tau: float | None = None,
    budget: float | None = None,
    batch_size: int = 16,
    filter: str | None = None,
    filter_options: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    distributed: bool = False,
    progress: bool = False,
    theta: float | None = None,
    epsilon: float | None = None,
    budget_mode: str = "theta",
) -> EncodeReport:
    """Encode image files into ``writer`` in the order given, skipping (and reporting) unreadable ones.

    Rate control is one of ``tau`` (per image), ``theta`` / ``epsilon`` (absolute bits) or ``budget`` (mean
    patch tokens per image): ONE threshold of ``budget_mode`` ("theta" by default: images holding more
    information get more tokens; "tau" keeps the older per-image meaning) is calibrated on these very
    images in one encoder pass (codes and bits wait in memory, ~12 bytes per patch) and recorded in the
    writer's meta; with ``distributed`` it is calibrated over every rank's images and every rank gets it.
    Same-size images are batched together; each image's tokens do not depend on the batch it was
    encoded in and are written in input order, so the output bytes do not depend on ``batch_size``.
    ``names[i]`` is stored as the source name of ``paths[i]`` (default: the file name).
    """
    mode = check_rate(tau, budget, theta=theta, epsilon=epsilon, budget_mode=budget_mode)
    threshold = next((v for v in (tau, theta, epsilon) if v is not None), None)
    paths = [Path(p) for p in paths]
    out = _InOrder(writer, paths, list(names) if names is not None else [p.name for p in paths])
    token_filter = rule_filter(model, mode, filter, filter_options)
    failed: list[tuple[Path, str]] = []

    def readable() -> Iterator[tuple[int, Tensor]]:
        for i, path in enumerate(paths):
            try:
                image = read_image(path)
            except ImageReadError as exc:
                reason = str(exc)
            else:
                problem = cannot_tokenize(model, image)
                reason = problem and f"cannot encode {path}: {problem}"
            if reason:
                failed.append((path, reason))
                out.finish(i, None)
                continue
            yield i, image

    def finish(indices: list[int], analysed: _Analysed) -> None:
        for index, image in zip(indices, analysed.tokens(token_filter.select(analysed.bits, threshold)).per_image()):
            out.finish(index, image)

    waiting: list[tuple[list[int], _Analysed]] = []
    with _inference(model) as device, _progress(progress) as bar:
        task = bar.add_task("encode", total=len(paths))
        analysed_count = 0
        for indices, batch in _group_by_size(readable(), batch_size):
            analysed = _Analysed.of(model.analyse(batch.to(device)))
            if budget is None:
                finish(indices, analysed)
            else:
                waiting.append((indices, analysed))
            analysed_count += len(indices)
            bar.update(task, completed=analysed_count + len(failed))
        calibration = None
        if budget is not None:
            bits = [analysed.bits for _, analysed in waiting]
            calibration = calibrate_bits(token_filter, bits, budget, distributed=distributed)
            threshold = calibration.threshold
            writer.update_meta({"threshold": threshold})
            for indices, analysed in waiting:
                finish(indices, analysed)
        bar.update(task, completed=len(paths))
    if threshold is None:
        mode, threshold = applied_rule(token_filter)
    return EncodeReport(out.images, failed, threshold if mode == "tau" else None, out.tokens / max(out.images, 1),
                        calibration, mode, threshold)


# -- decoding files ------------------------------------------------------------------------------
def output_names(sources: Sequence[str]) -> list[str]:
    """One PNG path per source, relative and unique: its folders and stem, ``-2``, ``-3``… for repeats.

    Sources come from a file that may not be ours, so ``..``, roots and empty parts are dropped: no
    name can point outside the output folder. Uniqueness ignores case (case-insensitive disks).
    """
    used: set[str] = set()
    names = []
    for i, source in enumerate(sources):
        parts = [part for part in PurePosixPath(source.replace("\\", "/")).parts if part not in ("/", ".", "..")]
        stem = str(PurePosixPath(*parts).with_suffix("")) if parts else f"image-{i}"
        name, n = f"{stem}.png", 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name.lower())
        names.append(name)
    return names


def _packed(batch: Mapping[str, Tensor]) -> Tokens:
    """A padded batch of :meth:`TokenDataset.batches` back in packed form."""
    cu_seqlens = torch.zeros(batch["lengths"].numel() + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(batch["lengths"], 0)
    valid = batch["valid"]
    grid, size = tuple(batch["grid"].tolist()), tuple(batch["image_size"].tolist())
    return Tokens(batch["global_codes"], batch["codes"][valid], batch["positions"][valid], cu_seqlens, grid, size)


def decode_tokens(
    model: Tokenizer, tokens_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
    batch_size: int = 16, progress: bool = False,
) -> list[Path]:
    """Decode a token data set into PNGs at the original sizes, named by :func:`output_names`.

    All or nothing: the token file must come from ``model`` (same spec digest) and every shard's
    checksum is verified before the first image is decoded; PNGs are written into a hidden sibling
    folder and moved into ``out_dir`` at the end; an existing file is never overwritten (decoding
    into the source folder must not replace the originals).
    """
    dataset = TokenDataset(tokens_path, expect_spec_digest=model.spec.digest())
    targets = output_names([image.source for image in dataset])  # reads every shard: checksums verified now
    out = Path(out_dir)
    clash = next((out / t for t in targets if (out / t).exists()), None)
    if clash is not None:
        raise TatokError(f"{clash} already exists; decode into a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _inference(model) as device, _progress(progress) as bar:
            task = bar.add_task("decode", total=len(dataset))
            for batch in dataset.batches(batch_size, padded=True):
                images = model.decode(_packed(batch).to(device))
                for index, image in zip(batch["index"].tolist(), images):
                    target = tmp / targets[index]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_image(target, image)
                bar.advance(task, len(images))
        for name in targets:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in targets]


# -- rate-distortion evaluation --------------------------------------------------------------------
@attrs.frozen
class RDPoint:
    """One operating point, means per image, and the per-image values behind them.

    ``filter`` names the method by role: ``model`` (the spec's filter at a per-image τ), ``shared-theta`` /
    ``shared-epsilon`` (one absolute threshold for the whole set), ``oracle`` (per-image allocation upper
    bound), or a baseline's registered name (``topk``, ``random``, ``raster``, ``all``, or any filter
    asked for by name). ``setting`` is what it ran at (``tau=0.9``, ``theta=3.2``, ``k=37``, ``all``) and
    ``matched`` the τ whose mean count it matches (``None`` for ``all``). Bits per pixel are counted by
    :func:`tatok_core.contract.bitrate.token_bits`: codes, globals and the side information of which tokens were
    kept; ``bpp`` is their sum. ``per_image`` holds ``tokens``, ``fraction`` (k/N), ``psnr``, ``ssim``, ``bpp``.
    """

    filter: str
    setting: str
    mean_tokens: float
    psnr: float
    ssim: float
    bpp: float = math.nan
    bpp_codes: float = math.nan
    bpp_globals: float = math.nan
    bpp_side: float = math.nan
    matched: str | None = None
    per_image: dict[str, list[float]] = attrs.field(factory=dict)


#: What ``tatok eval`` compares by default: roles first, then the fixed-count baselines and keeping all.
DEFAULT_METHODS = ("model", "theta", "epsilon", "topk", "random", "raster", "all")


def _threshold_filter(model: Tokenizer, mode: str) -> TokenFilter:
    """The shared-threshold filter: the model's own filter under rule ``mode`` when it is DTF-family, else
    the built-in ``dtf`` filter (the reference implementation of the absolute rules)."""
    try:
        return rule_filter(model, mode)
    except TatokError:
        return model.token_filter("dtf", mode=mode)


def _has_count_option(model: Tokenizer, name: str) -> bool:
    try:
        model.token_filter(name, k=1)
    except SpecError:
        return False
    return True


def evaluate_rate_distortion(
    model: Tokenizer,
    images: Tensor | Sequence[Tensor],
    taus: Sequence[float] = (0.5, 0.7, 0.9, 1.0),
    filters: Sequence[str] = DEFAULT_METHODS,
    *,
    oracle: bool = False,
    oracle_levels: int = 16,
    batch_size: int = 32,
    progress: bool = False,
) -> list[RDPoint]:
    """PSNR/SSIM against mean patch tokens and bits per pixel, every method at the model's matched counts.

    The model's own filter (the spec's, ``model``) runs at each τ; its mean count K_τ over the set is the
    operating point every other method is matched to: ``theta``/``epsilon`` calibrate ONE shared threshold
    to K_τ (:func:`calibrate_bits`, so images holding more information get more tokens); a filter with a
    ``k`` option (``topk``, ``random``, ``raster``) keeps k = round(K_τ) in every image; ``all`` keeps
    everything once; any other registered filter runs at each τ. With ``oracle`` every image is also
    decoded at ``oracle_levels`` + 1 top-k counts (0 … N) and :func:`~tatok_core.workflows.allocation.oracle_allocation`
    picks per-image counts with mean ≤ K_τ: an upper bound on allocation with the model's ranking.
    ``images`` is a (B, C, H, W) batch or a list of (C, H, W) images of any sizes; each is encoded once.
    """
    taus = [check_tau(t) for t in taus]
    if not filters or not taus:
        raise TatokError("need at least one filter and one tau to evaluate")
    for i, image in enumerate(images):
        problem = cannot_tokenize(model, image)
        if problem:
            raise TatokError(f"cannot evaluate image {i}: {problem}")
    with _inference(model) as device:
        batches = [(indices, batch, _Analysed.of(model.analyse(batch.to(device))))
                   for indices, batch in _group_by_size(enumerate(images), batch_size)]
        count = sum(len(indices) for indices, _, _ in batches)
        bits = [a.bits for _, _, a in batches]
        own = model.token_filter()
        matched = [sum(int(own.select(b, t).lengths.sum()) for b in bits) / count for t in taus]
        settings: list[tuple[str, str, str | None, TokenFilter, float | None]] = []
        for name in filters:
            if name == "model":
                settings += [("model", f"tau={t:g}", f"tau={t:g}", own, t) for t in taus]
            elif name in ("theta", "epsilon"):
                shared = _threshold_filter(model, name)
                for t, target in zip(taus, matched):
                    with contextlib.suppress(TatokError):  # a count the rule cannot reach is left out
                        value = calibrate_bits(shared, bits, max(target, 1e-9)).threshold
                        settings.append((f"shared-{name}", f"{name}={value:.6g}", f"tau={t:g}", shared, value))
            elif name == "all":
                settings.append(("all", "all", None, model.token_filter("all"), None))
            elif _has_count_option(model, name):
                for t, target in zip(taus, matched):
                    k = round(target)
                    settings.append((name, f"k={k}", f"tau={t:g}", model.token_filter(name, k=k), None))
            else:
                settings += [(name, f"tau={t:g}", f"tau={t:g}", model.token_filter(name), t) for t in taus]
        per_image = [{key: [0.0] * count for key in ("tokens", "fraction", "psnr", "ssim", "bpp", "codes",
                                                      "globals", "side")} for _ in settings]
        levels = range(oracle_levels + 1) if oracle else range(0)
        oracle_runs = {key: [[0.0] * len(levels) for _ in range(count)]
                       for key in ("k", "psnr", "ssim", "bpp", "codes", "globals", "side")}

        def record(into: dict[str, list], indices: list[int], slot: int | None, batch: Tensor, analysed: _Analysed,
                   selection: Selection, positions_from_count: bool) -> None:
            selected = analysed.tokens(selection)
            reconstruction = model.decode(selected.to(device)).cpu()
            n = analysed.bits.shape[1]
            cost = token_bits(selection.lengths, n, model.num_global, model.quantizer.codebook_size,
                              analysed.image_size, positions_from_count=positions_from_count)
            values = {"tokens": selection.lengths.double(), "fraction": selection.lengths.double() / max(n, 1),
                      "k": selection.lengths.double(), "psnr": psnr(reconstruction, batch).double(),
                      "ssim": ssim(reconstruction, batch), "bpp": cost.bpp(), "codes": cost.bpp("codes"),
                      "globals": cost.bpp("globals"), "side": cost.bpp("side")}
            for key, column in into.items():
                for i, v in zip(indices, values[key].tolist()):
                    if slot is None:
                        column[i] = v
                    else:
                        column[i][slot] = v

        with _progress(progress) as bar:
            task = bar.add_task("evaluate", total=(len(settings) + len(levels)) * len(batches))
            for indices, batch, analysed in batches:
                for (_, _, _, token_filter, threshold), into in zip(settings, per_image):
                    record(into, indices, None, batch, analysed, token_filter.select(analysed.bits, threshold),
                           getattr(token_filter, "positions_from_count", False))
                    bar.advance(task)
                order = descending_order(analysed.bits)  # the model's ranking (top-k by bits)
                for slot in levels:
                    k = torch.full((len(indices),), round(analysed.bits.shape[1] * slot / oracle_levels))
                    record(oracle_runs, indices, slot, batch, analysed, Selection.from_mask(keep_first(order, k)), False)
                    bar.advance(task)
    points = [_point(label, setting, target, values) for (label, setting, target, _, _), values in zip(settings, per_image)]
    if oracle:
        for t, target in zip(taus, matched):
            choice = oracle_allocation(oracle_runs["k"], oracle_runs["psnr"], target)
            values = {key: [runs[j] for runs, j in zip(column, choice)] for key, column in oracle_runs.items()}
            values["tokens"] = values.pop("k")
            values["fraction"] = [k / max(a.bits.shape[1], 1) for k, a in zip(values["tokens"], _per_image(batches, count))]
            points.append(_point("oracle", f"{oracle_levels + 1} counts per image", f"tau={t:g}", values))
    return points


def _per_image(batches: Sequence[tuple[list[int], Tensor, _Analysed]], count: int) -> list[_Analysed]:
    """The analysed batch of each image, in input order."""
    out: list[Any] = [None] * count
    for indices, _, analysed in batches:
        for i in indices:
            out[i] = analysed
    return out


def _point(label: str, setting: str, target: str | None, values: Mapping[str, list[float]]) -> RDPoint:
    mean = {key: float(np.mean(v)) if v else math.nan for key, v in values.items()}
    return RDPoint(label, setting, mean["tokens"], mean["psnr"], mean["ssim"], mean["bpp"],
                   mean.get("codes", math.nan), mean.get("globals", math.nan), mean.get("side", math.nan),
                   target, {key: values[key] for key in ("tokens", "fraction", "psnr", "ssim", "bpp") if key in values})


def _save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """PNG via a temporary file and a rename (no half-written plot), without the version stamp (same bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TatokError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def plot_rate_distortion(points: Sequence[RDPoint], path: str | os.PathLike[str]) -> Path:
    """PNG of PSNR and SSIM against mean patch tokens and against bits per pixel, one curve per method."""
    from tatok_core.contract.extras import require

    Figure = require("matplotlib.figure", "plotting rate-distortion").Figure  # imported here: ~0.5 s encode need not pay

    figure = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    grid = figure.subplots(2, 2)
    for row, (metric, label) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
        for col, (rate, rate_label) in enumerate((("mean_tokens", "patch tokens per image (mean)"),
                                                  ("bpp", "bits per pixel (codes + globals + positions)"))):
            axes = grid[row][col]
            for name in dict.fromkeys(p.filter for p in points):
                curve = sorted((p for p in points if p.filter == name), key=lambda p: getattr(p, rate))
                axes.plot([getattr(p, rate) for p in curve], [getattr(p, metric) for p in curve], marker="o",
                          label=name, linestyle="-" if len(curve) > 1 else "none")
            axes.set_xlabel(rate_label)
            axes.set_ylabel(label)
            axes.grid(alpha=0.3)
    grid[0][0].legend()
    figure.suptitle("rate-distortion")
    return _save_figure(figure, path)


def save_rate_distortion(points: Sequence[RDPoint], out_dir: str | os.PathLike[str],
                         info: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``rate_distortion.json`` (``info`` + the points) and ``rate_distortion.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png_path = plot_rate_distortion(points, out / "rate_distortion.png")  # the step that can fail goes first
    record = {**info, "points": [attrs.asdict(p) for p in points]}
    json_path, tmp = out / "rate_distortion.json", out / ".rate_distortion.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, json_path)
    return json_path, png_path
