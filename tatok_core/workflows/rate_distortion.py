"""Rate–distortion evaluation: the model's filter against shared thresholds, fixed-count baselines and an
oracle at matched mean counts, in tokens and bits per pixel (:mod:`tatok_core.contract.bitrate`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from tatok_core.contract.bitrate import token_bits
from tatok_core.contract.errors import SpecError, TatokError
from tatok_core.contract.interfaces import FILTER_ROLES, TokenFilter
from tatok_core.contract.selection import Selection
from tatok_core.io.atomic import atomic_write_text
from tatok_core.ops.dtf.reference import descending_order, keep_first
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.allocation import oracle_allocation
from tatok_core.workflows.analysis import Analysed, cannot_tokenize
from tatok_core.workflows.batching import group_by_size
from tatok_core.workflows.inference import evaluating
from tatok_core.workflows.metrics import psnr, ssim
from tatok_core.workflows.plotting import plot_rate_distortion
from tatok_core.workflows.progress import progress_bar
from tatok_core.workflows.rate_control import calibrate_bits, check_tau, rule_filter


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


#: What ``tatok eval`` compares by default: the model and its rules first, then the baselines by role (each
#: runs as the registered filter playing it, and is labelled with that filter's name).
DEFAULT_METHODS = ("model", "theta", "epsilon", "top-k", "random-k", "raster-k", "keep-all")
#: The oracle decodes each image at this many + 1 top-k counts (0, N/16, …, N) unless told otherwise.
ORACLE_LEVELS = 16


def _threshold_filter(model: Tokenizer, mode: str) -> TokenFilter:
    """The shared-threshold filter: the model's own filter under rule ``mode`` when it has the rules, else
    the registered filter of role "entropy-rules" (the reference implementation of the absolute rules)."""
    try:
        return rule_filter(model, mode)
    except TatokError:
        return model.baseline_filter("entropy-rules", mode=mode)


def _filter_name(model: Tokenizer, method: str) -> str:
    """A method that names a role (``keep-all``, ``top-k`` …) → the registered filter playing it; else as given."""
    return model.registry.name_for_role("filter", method) if method in FILTER_ROLES else method


def _role(model: Tokenizer, name: str) -> str | None:
    return getattr(model.registry.get("filter", name), "role", None)


def _has_count_option(model: Tokenizer, name: str) -> bool:
    try:
        model.token_filter(name, k=1)
    except SpecError:
        return False
    return True


#: One method at one operating point: (label, setting, matched τ, filter, threshold passed to ``select``).
Setting = tuple[str, str, str | None, TokenFilter, float | None]


def _settings(model: Tokenizer, filters: Sequence[str], taus: Sequence[float], matched: Sequence[float],
              bits: Sequence[Tensor], own: TokenFilter) -> list[Setting]:
    """Every (method, operating point) to run, each matched to the model's mean count K_τ at each τ."""
    settings: list[Setting] = []
    for name in (_filter_name(model, method) for method in filters):
        if name == "model":
            settings += [("model", f"tau={t:g}", f"tau={t:g}", own, t) for t in taus]
        elif name in ("theta", "epsilon"):
            shared = _threshold_filter(model, name)
            for t, target in zip(taus, matched):
                with contextlib.suppress(TatokError):  # a count the rule cannot reach is left out
                    value = calibrate_bits(shared, bits, max(target, 1e-9)).threshold
                    settings.append((f"shared-{name}", f"{name}={value:.6g}", f"tau={t:g}", shared, value))
        elif _role(model, name) == "keep-all":
            settings.append((name, "all", None, model.token_filter(name), None))
        elif _has_count_option(model, name):
            for t, target in zip(taus, matched):
                k = round(target)
                settings.append((name, f"k={k}", f"tau={t:g}", model.token_filter(name, k=k), None))
        else:
            settings += [(name, f"tau={t:g}", f"tau={t:g}", model.tau_filter(name), t) for t in taus]
    return settings


def evaluate_rate_distortion(
    model: Tokenizer,
    images: Tensor | Sequence[Tensor],
    taus: Sequence[float] = (0.5, 0.7, 0.9, 1.0),
    filters: Sequence[str] = DEFAULT_METHODS,
    *,
    oracle: bool = False,
    oracle_levels: int = ORACLE_LEVELS,
    batch_size: int = 32,
    progress: bool = False,
) -> list[RDPoint]:
    """PSNR/SSIM against mean patch tokens and bits per pixel, every method at the model's matched counts.

    The model's own filter (the spec's, ``model``) runs at each τ; its mean count K_τ over the set is the
    operating point every other method is matched to: ``theta``/``epsilon`` calibrate ONE shared threshold
    to K_τ (:func:`calibrate_bits`, so images holding more information get more tokens); a filter with a
    ``k`` option (``topk``, ``random``, ``raster``) keeps k = round(K_τ) in every image; a filter of role "keep-all" (``all``)
    runs once; any other registered filter runs at each τ. With ``oracle`` every image is also
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
    with evaluating(model) as device:
        batches = [(indices, batch, Analysed.of(model, batch.to(device)))
                   for indices, batch in group_by_size(enumerate(images), batch_size)]
        count = sum(len(indices) for indices, _, _ in batches)
        bits = [a.bits for _, _, a in batches]
        own = model.tau_filter()  # the sweep is in τ, whatever rule the spec ships
        matched = [sum(int(own.select(b, t).lengths.sum()) for b in bits) / count for t in taus]
        settings = _settings(model, filters, taus, matched, bits, own)
        per_image = [{key: [0.0] * count for key in ("tokens", "fraction", "psnr", "ssim", "bpp", "codes",
                                                      "globals", "side")} for _ in settings]
        levels = range(oracle_levels + 1) if oracle else range(0)
        oracle_runs = {key: [[0.0] * len(levels) for _ in range(count)]
                       for key in ("k", "psnr", "ssim", "bpp", "codes", "globals", "side")}

        def record(into: dict[str, list], indices: list[int], slot: int | None, batch: Tensor, analysed: Analysed,
                   selection: Selection, positions_from_count: bool) -> None:
            selected = analysed.tokens(selection, search=not positions_from_count)
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

        with progress_bar(progress) as bar:
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


def _per_image(batches: Sequence[tuple[list[int], Tensor, Analysed]], count: int) -> list[Analysed]:
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


def save_rate_distortion(points: Sequence[RDPoint], out_dir: str | os.PathLike[str],
                         info: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``rate_distortion.json`` (``info`` + the points) and ``rate_distortion.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png_path = plot_rate_distortion(points, out / "rate_distortion.png")  # the step that can fail goes first
    record = {**info, "points": [attrs.asdict(p) for p in points]}
    json_path = atomic_write_text(out / "rate_distortion.json", json.dumps(record, indent=2) + "\n")
    return json_path, png_path

