"""Encoding into and decoding out of token sets so that nothing is lost and nothing is silently wrong.

What ``tatok encode`` and ``tatok decode`` run, on top of :func:`~tatok_core.workflows.encoding.encode_files` and
:func:`~tatok_core.workflows.encoding.decode_tokens`:

* **encode** records the weights digest next to the spec digest, holds the target's lock (a second
  writer fails at once), stages full shards as it goes, and with ``resume`` continues a killed run
  from its staged shards — the result has the same bytes as an uninterrupted run;
* **decode** refuses tokens of other weights (unless ``allow_foreign_weights``), holds the output
  folder's lock (two decodes into one folder never interleave), never replaces an existing file
  unless ``overwrite``, and moves PNGs into place only once all of them are decoded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tatok_core.contract.errors import TatokError, TokenFileError
from tatok_core.io.locking import OutputLock
from tatok_core.workflows.encoding import EncodeReport, decode_tokens, encode_files, output_names, token_meta
from tatok_core.io.tokenfile import TokenDataset, TokenWriter, resume_position, weights_digest
from tatok_core.pipeline.tokenizer import Tokenizer


@attrs.frozen
class EncodeRun:
    """An encode's report (this run's images), plus images taken over from / thrown away of an interrupted run."""

    report: EncodeReport
    resumed: int
    discarded: int


def ignored_rate_option(model: Tokenizer, *, tau: float | None, budget: float | None, filter: str | None,
                        filter_options: Mapping[str, Any], theta: float | None = None,
                        epsilon: float | None = None) -> str | None:
    """Why a rate option would be ignored by this filter (a fixed-count one has no threshold), or None."""
    token_filter = model.token_filter(filter, **dict(filter_options))
    given = next((f"{name} {value:g}" for name, value in
                  (("tau", tau), ("theta", theta), ("epsilon", epsilon), ("budget", budget)) if value is not None), None)
    if hasattr(token_filter, "tau") or given is None:
        return None
    return (f"{token_filter.label} keeps a fixed number of tokens and has no tau, so {given} would be ignored "
            "(and recorded as if applied); drop it, or set the count with --set filter.k=N")


def encode_token_set(
    model: Tokenizer,
    sources: Sequence[tuple[Path, str]],
    output: str | os.PathLike[str],
    *,
    tokenizer: str,
    tau: float | None = None,
    budget: float | None = None,
    theta: float | None = None,
    epsilon: float | None = None,
    budget_mode: str = "theta",
    filter: str | None = None,
    filter_options: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    shard_size: int = 4096,
    append: bool = False,
    resume: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    before_encoding: Callable[[], None] | None = None,
) -> EncodeRun:
    """Encode ``sources`` ((path, stored name) pairs, in order) into the token set ``output``.

    ``before_encoding`` runs once the target is locked and checked (a torchrun barrier). Raises,
    leaving the target as it was, when not one image could be encoded.
    """
    options = dict(filter_options or {})
    if resume and budget is not None:
        raise TatokError("a --budget encode calibrates one threshold over all images at once, so it cannot be "
                         "resumed; run it again without --resume")
    rate = dict(tau=tau, budget=budget, theta=theta, epsilon=epsilon, budget_mode=budget_mode)
    meta = token_meta(model, filter=filter, filter_options=options, **rate)
    inputs = [(name, path.stat().st_size) for path, name in sources]
    writer = TokenWriter(output, spec_digest=model.spec.digest(), tokenizer=tokenizer, meta=meta,
                         shard_size=shard_size, rank=rank, world_size=world_size, append=append, resume=resume,
                         weights_digest=weights_digest(model))
    try:
        start = resume_position(writer.resumed_sources, inputs)
    except TokenFileError:
        writer.abort(keep_staged=True)  # resumed with other inputs: keep the progress for the right ones
        raise
    with writer:
        if before_encoding is not None:
            before_encoding()
        todo = sources[start:]
        report = encode_files(
            model, [path for path, _ in todo], writer, **rate, batch_size=batch_size, filter=filter,
            filter_options=options, names=[name for _, name in todo], distributed=world_size is not None,
            progress=progress,
        )
        if report.failed and not report.encoded and not writer.resumed_sources:
            more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
            first = report.failed[0][1]
            raise TatokError(first if not more else
                             f"none of the {len(report.failed)} images could be encoded, nothing written: {first}{more}")
    return EncodeRun(report, len(writer.resumed_sources), writer.discarded_images)


def _clear_leftovers(out: Path) -> None:
    """Remove the staging folders of a decode into ``out`` that was killed (call with the lock held)."""
    for pattern in (f".{out.name}.decoding", f"..{out.name}.decoding.tmp-*"):
        for stray in out.parent.glob(pattern):
            shutil.rmtree(stray, ignore_errors=True)


def decode_token_set(
    model: Tokenizer,
    tokens: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    overwrite: bool = False,
    allow_foreign_weights: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Decode a token set into PNGs in ``out_dir``: checked, locked, all or nothing (see the module docs)."""
    dataset = TokenDataset(tokens, expect_spec_digest=model.spec.digest(),
                           expect_weights_digest=weights_digest(model), allow_foreign_weights=allow_foreign_weights)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TatokError(f"{out} exists and is not a folder")
    with OutputLock(out):
        _clear_leftovers(out)
        names = output_names([image.source for image in dataset])  # reads every shard: checksums verified
        clash = next((out / name for name in names if (out / name).exists()), None)
        if clash is not None and not overwrite:
            raise TatokError(f"{clash} already exists; decode into a new or empty folder, or pass --overwrite")
        staging = out.parent / f".{out.name}.decoding"
        created = not out.exists()
        try:
            decode_tokens(model, tokens, staging, batch_size=batch_size, progress=progress)
            moved: list[Path] = []
            try:
                for name in names:
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    fresh = not (out / name).exists()
                    os.replace(staging / name, out / name)
                    if fresh:
                        moved.append(out / name)
            except BaseException:
                for path in moved:  # files this decode added; replaced ones were asked for (--overwrite)
                    path.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names]
