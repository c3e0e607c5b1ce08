"""Rate control and the token-file workflows the ``tatok`` CLI is thin over.

* :func:`calibrate_tau` — the τ at which DTF keeps a target *mean* number of patch tokens per image.
* :func:`encode_files` / :func:`decode_tokens` — image files ↔ a token data set (:mod:`tatok_core.tokenfile`).
* :func:`evaluate_rate_distortion` + :func:`plot_rate_distortion` — DTF against fixed-count baselines
  at matched token counts.
* :func:`show_panel` — what DTF keeps for one image, and what it costs.

Every workflow runs the expensive half of the pipeline (encoder, global tokens, quantizer, entropy
model: :meth:`Tokenizer.analyse`) **once** per image and re-runs only the cheap token filter for each
τ or baseline: DTF's nesting guarantee makes the kept count monotone in τ, so bisection on stored bits
finds a budget's τ without touching the network again.
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

from tatok_core.dtf import MAX_TOKENS
from tatok_core.errors import ImageReadError, TatokError
from tatok_core.imageio import list_images, read_image, write_image
from tatok_core.interfaces import Grid, TokenFilter
from tatok_core.metrics import psnr, ssim
from tatok_core.selection import Selection
from tatok_core.tokenfile import TokenDataset, TokenWriter
from tatok_core.tokenizer import Analysis, Tokenizer
from tatok_core.tokens import ImageTokens, Tokens

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


def check_rate(tau: float | None, budget: float | None) -> None:
    """Rate control is a τ, a budget (mean patch tokens per image, >= 0) or neither (the filter's default)."""
    if tau is not None and budget is not None:
        raise TatokError("tau and budget exclude each other: give one of them")
    if tau is not None:
        check_tau(tau)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget < 0):
        raise TatokError(f"budget must be a number of patch tokens per image >= 0, got {budget!r}")


def cannot_tokenize(model: Tokenizer, image: Tensor) -> str | None:
    """Why ``image`` (C, H, W) cannot be tokenized by ``model``, or None when it can.

    Checked before any encoder work: under one patch, or more patches than the filters take
    (:data:`~tatok_core.dtf.MAX_TOKENS`, where integer sums stay exact).
    """
    height, width = image.shape[-2:]
    p = model.patch_size
    if height < p or width < p:
        return f"image of {height}×{width} is smaller than one {p}×{p} patch"
    if model.max_tokens(height, width) > MAX_TOKENS:
        return (f"image of {height}×{width} has {model.max_tokens(height, width)} patches of {p}×{p}, "
                f"more than the {MAX_TOKENS} a token filter takes; crop or resize it")
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
    """A calibrated τ and the mean patch tokens per image it keeps (``iterations`` bisection steps)."""

    tau: float
    mean_tokens: float
    iterations: int
    budget: float


def _sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over every rank of the default process group (float64, exact for counts)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def calibrate_bits(
    token_filter: TokenFilter,
    bits: Sequence[Tensor],
    budget: float,
    *,
    tol: float = 0.5,
    max_iter: int = MAX_BISECTION_STEPS,
    distributed: bool = False,
) -> RateResult:
    """Bisect τ ∈ [0, 1] until the mean kept count over ``bits`` (batches (B, N)) is within ``tol`` of ``budget``.

    The count is a step function of τ (monotone by DTF's nesting guarantee), so an exact hit may not
    exist: the τ returned is the closest one seen, with the mean it actually achieves. With
    ``distributed`` every rank of the process group must call this; the mean is then over all ranks'
    images and every rank gets the same τ.
    """
    check_rate(None, budget)

    def mean_at(tau: float) -> float:
        kept = sum(int(token_filter.select(b, tau).lengths.sum()) for b in bits)
        count = sum(b.shape[0] for b in bits)
        kept, count = _sum_across_ranks([kept, count]) if distributed else (kept, count)
        if count == 0:
            raise TatokError("cannot calibrate a budget on zero images")
        return kept / count

    low, high = mean_at(0.0), mean_at(1.0)
    if not low <= budget <= high:
        raise TatokError(f"budget {budget:g} tokens per image is outside what these images can reach: "
                         f"{low:.2f} (tau 0) to {high:.2f} (tau 1) patch tokens on average")
    best = min((abs(low - budget), 0.0, low), (abs(high - budget), 1.0, high))
    lo, hi, steps = 0.0, 1.0, 0
    while best[0] > tol and steps < max_iter:
        steps += 1
        mid = (lo + hi) / 2  # dyadic: exact in float32 for 24 halvings, and short to print
        mean = mean_at(mid)
        best = min(best, (abs(mean - budget), mid, mean))
        lo, hi = (mid, hi) if mean < budget else (lo, mid)
    return RateResult(tau=best[1], mean_tokens=best[2], iterations=steps, budget=float(budget))


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
    """The τ at which the model's filter keeps ``budget`` patch tokens per image on average.

    ``images_or_batches``: a (B, C, H, W) tensor (split into ``batch_size`` chunks) or an iterable of
    such batches (sizes may differ between batches). Bits are computed once per image; see
    :func:`calibrate_bits` for the search.
    """
    batches = images_or_batches.split(batch_size) if isinstance(images_or_batches, Tensor) else images_or_batches
    with _inference(model) as device:
        bits = [model.analyse(batch.to(device)).entropy.bits for batch in batches]
        return calibrate_bits(model.token_filter(filter, **filter_options), bits, budget, tol=tol, max_iter=max_iter)


# -- encoding files ------------------------------------------------------------------------------
@attrs.frozen
class EncodeReport:
    """What :func:`encode_files` did: images written, files skipped with the reason, τ and mean tokens.

    ``tau`` is the τ applied (None for a filter without one); ``calibration`` is set for a budget.
    """

    encoded: int
    failed: list[tuple[Path, str]]
    tau: float | None
    mean_tokens: float
    calibration: RateResult | None = None


def token_meta(
    model: Tokenizer,
    *,
    tau: float | None = None,
    budget: float | None = None,
    filter: str | None = None,
    filter_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta`` a :class:`TokenWriter` records for tokens of ``model`` under this rate control.

    Without ``tau`` or ``budget`` the filter's default τ is recorded (None for count filters). A
    budget is recorded as the budget, not as its τ: under torchrun every rank must write the same
    meta, and τ depends on the images it was calibrated on. Filter options are those given on top
    of the spec's (which the spec digest pins).
    """
    if tau is None and budget is None:
        tau = getattr(model.token_filter(filter, **dict(filter_options or {})), "tau", None)
    return {
        "codebook_size": model.quantizer.codebook_size,
        "code_factors": list(model.quantizer.code_factors),
        "num_global": model.num_global,
        "patch_size": model.patch_size,
        **({"budget": budget} if budget is not None else {"tau": tau}),
        "filter": {"name": filter or model.spec.filter.name, "options": dict(filter_options or {})},
    }


def source_names(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """Expand inputs like :func:`~tatok_core.imageio.list_images`, naming each file relative to its input.

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
) -> EncodeReport:
    """Encode image files into ``writer`` in the order given, skipping (and reporting) unreadable ones.

    Same-size images are batched together; each image's tokens do not depend on the batch it was
    encoded in and are written in input order, so the output bytes do not depend on ``batch_size``.
    ``names[i]`` is stored as the source name of ``paths[i]`` (default: the file name). A ``budget``
    is calibrated on these very images in one encoder pass (codes and bits wait in memory, ~12 bytes
    per patch); with ``distributed`` it is the mean over every rank's images.
    """
    check_rate(tau, budget)
    paths = [Path(p) for p in paths]
    out = _InOrder(writer, paths, list(names) if names is not None else [p.name for p in paths])
    token_filter = model.token_filter(filter, **dict(filter_options or {}))
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

    def finish(indices: list[int], analysed: _Analysed, tau: float | None) -> None:
        for index, image in zip(indices, analysed.tokens(token_filter.select(analysed.bits, tau)).per_image()):
            out.finish(index, image)

    waiting: list[tuple[list[int], _Analysed]] = []
    with _inference(model) as device, _progress(progress) as bar:
        task = bar.add_task("encode", total=len(paths))
        analysed_count = 0
        for indices, batch in _group_by_size(readable(), batch_size):
            analysed = _Analysed.of(model.analyse(batch.to(device)))
            if budget is None:
                finish(indices, analysed, tau)
            else:
                waiting.append((indices, analysed))
            analysed_count += len(indices)
            bar.update(task, completed=analysed_count + len(failed))
        calibration = None
        if budget is not None:
            bits = [analysed.bits for _, analysed in waiting]
            calibration = calibrate_bits(token_filter, bits, budget, distributed=distributed)
            tau = calibration.tau
            for indices, analysed in waiting:
                finish(indices, analysed, tau)
        bar.update(task, completed=len(paths))
    if tau is None:
        tau = getattr(token_filter, "tau", None)
    return EncodeReport(out.images, failed, tau, out.tokens / max(out.images, 1), calibration)


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
    """One operating point: ``filter`` at ``setting`` (``tau=0.9``, ``k=37`` or ``all``), means per image."""

    filter: str
    setting: str
    mean_tokens: float
    psnr: float
    ssim: float


def evaluate_rate_distortion(
    model: Tokenizer,
    images: Tensor | Sequence[Tensor],
    taus: Sequence[float] = (0.5, 0.7, 0.9, 1.0),
    filters: Sequence[str] = ("dtf", "topk", "random", "raster", "all"),
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> list[RDPoint]:
    """PSNR/SSIM against mean patch tokens: DTF at each τ, baselines at DTF's matched counts, ``all`` once.

    ``images`` is a (B, C, H, W) batch or a list of (C, H, W) images of any sizes. Baseline filters
    (any registered filter with a ``k`` option: ``topk``, ``random``, ``raster``) keep k = round(DTF's
    mean tokens at each τ) for every image, the fixed-rate comparison the paper makes. Points come in
    the order of ``filters``, each filter's by τ. Encodes each image once.
    """
    taus = [check_tau(t) for t in taus]
    if not filters or not taus:
        raise TatokError("need at least one filter and one tau to evaluate")
    for i, image in enumerate(images):
        problem = cannot_tokenize(model, image)
        if problem:
            raise TatokError(f"cannot evaluate image {i}: {problem}")
    with _inference(model) as device:
        batches = [(batch, _Analysed.of(model.analyse(batch.to(device))))
                   for _, batch in _group_by_size(enumerate(images), batch_size)]
        count = sum(batch.shape[0] for batch, _ in batches)
        dtf = model.token_filter("dtf")
        matched = [round(sum(int(dtf.select(a.bits, t).lengths.sum()) for _, a in batches) / count) for t in taus]
        settings: list[tuple[str, str, TokenFilter, float | None]] = []
        for name in filters:
            if name == "dtf":
                settings += [("dtf", f"tau={t:g}", dtf, t) for t in taus]
            elif name == "all":
                settings.append(("all", "all", model.token_filter("all"), None))
            else:
                settings += [(name, f"k={k}", model.token_filter(name, k=k), None) for k in dict.fromkeys(matched)]
        results: list[list[list[Tensor]]] = [[[], [], []] for _ in settings]
        with _progress(progress) as bar:
            task = bar.add_task("evaluate", total=len(settings) * len(batches))
            for batch, analysed in batches:
                for (_, _, token_filter, tau), (tokens, psnrs, ssims) in zip(settings, results):
                    selected = analysed.tokens(token_filter.select(analysed.bits, tau))
                    reconstruction = model.decode(selected.to(device)).cpu()
                    tokens.append(selected.lengths.double())
                    psnrs.append(psnr(reconstruction, batch).double())
                    ssims.append(ssim(reconstruction, batch))
                    bar.advance(task)
    return [RDPoint(name, setting, *(float(torch.cat(values).mean()) for values in result))
            for (name, setting, _, _), result in zip(settings, results)]


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
    """PNG of PSNR against mean patch tokens, one curve per filter (``all`` is a single point)."""
    from tatok_core.extras import require

    Figure = require("matplotlib.figure", "plotting rate-distortion").Figure  # imported here: ~0.5 s encode need not pay

    figure = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name in dict.fromkeys(p.filter for p in points):
        curve = sorted((p for p in points if p.filter == name), key=lambda p: p.mean_tokens)
        axes.plot([p.mean_tokens for p in curve], [p.psnr for p in curve], marker="o", label=name,
                  linestyle="-" if len(curve) > 1 else "none")
    axes.set_xlabel("patch tokens per image (mean)")
    axes.set_ylabel("PSNR (dB)")
    axes.set_title("rate-distortion")
    axes.grid(alpha=0.3)
    axes.legend()
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
