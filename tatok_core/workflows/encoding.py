"""Image files ↔ a token data set (:mod:`tatok_core.io.tokenfile`): what ``tatok encode`` / ``tatok decode`` run.

* :func:`encode_files` — images in input order, unreadable ones skipped and reported, under one rate control
  (:mod:`tatok_core.workflows.rate_control`); :func:`token_meta` — what the token file records about it.
* :func:`decode_tokens` — all or nothing, PNGs at the original sizes named by :func:`output_names`.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
import torch
from torch import Tensor

from tatok_core.contract.errors import ImageReadError, TatokError
from tatok_core.contract.selection import cu_seqlens_from_lengths
from tatok_core.contract.tokens import ImageTokens, Tokens
from tatok_core.io.images import list_images, read_image, write_image
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.pipeline.set_search import searches
from tatok_core.workflows.analysis import Analysed, analysed_bits, cannot_tokenize
from tatok_core.workflows.batching import group_by_size
from tatok_core.workflows.inference import evaluating
from tatok_core.workflows.progress import progress_bar
from tatok_core.workflows.rate_control import RateResult, applied_rule, calibrate_bits, check_rate, rule_filter


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
    writer's meta — when the tokens depend on the kept set (refinement, a keep-aware encoder) the images
    are analysed a second time once the threshold is known, rather than every image's features waiting;
    with ``distributed`` it is calibrated over every rank's images and every rank gets it.
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

    def finish(indices: list[int], analysed: Analysed) -> None:
        for index, image in zip(indices, analysed.tokens(token_filter.select(analysed.bits, threshold),
                                                           search=searches(token_filter)).per_image()):
            out.finish(index, image)

    # a budget's batches wait for its threshold as (indices, bits, analysed); analysed is None when encoding
    # works per chosen set (its tokens or its members: Tokenizer.works_per_set): the batch is analysed again
    # once the threshold is known, rather than every image's features waiting
    waiting: list[tuple[list[int], Tensor, Analysed | None]] = []
    second_pass = budget is not None and model.works_per_set
    with evaluating(model) as device, progress_bar(progress) as bar:
        task = bar.add_task("encode", total=len(paths))
        analysed_count = 0
        for indices, batch in group_by_size(readable(), batch_size):
            if second_pass:
                waiting.append((indices, analysed_bits(model, batch.to(device)), None))
            else:
                analysed = Analysed.of(model, batch.to(device))
                if budget is None:
                    finish(indices, analysed)
                else:
                    waiting.append((indices, analysed.bits, analysed))
            analysed_count += len(indices)
            bar.update(task, completed=analysed_count + len(failed))
        calibration = None
        if budget is not None:
            bits = [batch_bits for _, batch_bits, _ in waiting]
            calibration = calibrate_bits(token_filter, bits, budget, distributed=distributed)
            threshold = calibration.threshold
            writer.update_meta({"threshold": threshold})
            if second_pass:
                bar.update(task, description="encode: the kept tokens", completed=len(failed))
            for indices, _, analysed in waiting:
                if analysed is None:  # the same batch again: the same bits, now each set's tokens
                    batch = torch.stack([read_image(paths[i]) for i in indices])  # (B, C, H, W) one size, as before
                    analysed = Analysed.of(model, batch.to(device))
                    bar.advance(task, len(indices))
                finish(indices, analysed)
        bar.update(task, completed=len(paths))
    if threshold is None:
        mode, threshold = applied_rule(token_filter)
    return EncodeReport(out.images, failed, threshold if mode == "tau" else None, out.tokens / max(out.images, 1),
                        calibration, mode, threshold)


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
    cu_seqlens = cu_seqlens_from_lengths(batch["lengths"])  # (B+1,) int32
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
        with evaluating(model) as device, progress_bar(progress) as bar:
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

