"""The pictures of benchmarks/operating_point.py: rate–distortion plots, a reconstruction grid, kept-token maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from benchmarks.claims.common import save_figure
from benchmarks.operating_point import (
    CODECS,
    MATCHED_METHODS,
    ModelResult,
    Photo,
    closest_quality,
    codec_bytes,
    codec_envelope,
    decode_codec_bytes,
    point_key,
)

METHOD_COLOURS = {name: f"C{i}" for i, name in enumerate((*MATCHED_METHODS, "default", "all", "globals"))}
MODEL_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (1, 1)), "v"))
CODEC_COLOURS = {"jpeg": "0.35", "webp": "0.6", "jpeg-scaled": "0.2", "webp-scaled": "0.75"}
CODEC_NAMES = {"jpeg": "JPEG", "webp": "WebP", "jpeg-scaled": "JPEG, best downscale", "webp-scaled": "WebP, best downscale"}
LEGEND_COLUMNS = 4


def figure_grid(rows: int, cols: int, size: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure  # imported here: matplotlib costs ~0.5 s the evaluation need not pay

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def codec_mean_curve(record: dict[str, Any], codec: str, key: str) -> tuple[list[float], list[float]]:
    """(mean bpp, mean ``key``) over the photos at each setting (quality, and scale for a ``-scaled``
    codec), the best ``key`` at each rate: a scaled codec's settings interleave."""
    per_photo = list(record["codecs"][codec]["per_photo"].values())
    means = [{"bpp": float(np.mean([curve[j]["bpp"] for curve in per_photo])),
              key: float(np.mean([curve[j][key] for curve in per_photo]))} for j in range(len(per_photo[0]))]
    return codec_envelope(means, key)


def rd_figures(record: dict[str, Any], bpp_path: Path, tokens_path: Path) -> tuple[Path, Path]:
    """Two PNGs of set means: PSNR and SSIM against bpp (with JPEG/WebP) and against tokens per image
    (globals + kept patch tokens). Matched methods are curves over the fractions; the reference
    points (as shipped, all tokens, globals only) are single markers; baselines are markers only."""
    paths = []
    for x_key, path in (("bpp", bpp_path), ("tokens", tokens_path)):
        entries = len(record["models"]) * (len(MATCHED_METHODS) + 3) + len(CODECS)
        figure, axes = figure_grid(1, 2, (12.8, 4.6 + 0.16 * -(-entries // LEGEND_COLUMNS)))
        for column, metric in enumerate(("psnr", "ssim")):
            ax = axes[0, column]
            for m, (label, model) in enumerate(record["models"].items()):
                linestyle, marker = MODEL_STYLES[m % len(MODEL_STYLES)]
                for method in MATCHED_METHODS:
                    points = sorted((p for p in model["points"].values() if p["point"] == method), key=lambda p: p[x_key])
                    if points:
                        ax.plot([p[x_key] for p in points], [p[metric] for p in points], linestyle=linestyle,
                                marker=marker, markersize=4, color=METHOD_COLOURS[method], label=f"{label}: {method}")
                for method in ("default", "all", "globals"):
                    p = model["points"][method]
                    ax.plot([p[x_key]], [p[metric]], linestyle="none", marker=marker, markersize=8,
                            markerfacecolor="none" if method != "default" else METHOD_COLOURS[method],
                            color=METHOD_COLOURS[method], label=f"{label}: {method}")
            if x_key == "bpp":
                for codec in CODECS:
                    xs, ys = codec_mean_curve(record, codec, metric)
                    ax.plot(xs, ys, color=CODEC_COLOURS[codec], linewidth=2, label=f"{CODEC_NAMES[codec]} (Pillow)")
                ax.set_xscale("log")
                ax.set_xlabel("bits per pixel (mean over photos, log scale)")
            else:
                ax.set_xlabel("tokens per image: globals + kept patch tokens (mean)")
            ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
            ax.grid(alpha=0.3, which="both")
        handles, labels = axes[0, 1].get_legend_handles_labels()  # below both panels: many models stay readable
        figure.legend(handles, labels, loc="outside lower center", ncols=LEGEND_COLUMNS, fontsize=7)
        figure.suptitle(f"held-out whole photos ({len(record['photos'])}, longest side {record['side']} px)")
        paths.append(save_figure(figure, path))
    return paths[0], paths[1]


def _show(ax: Any, image: Tensor, title: str) -> None:
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _row_of(result: ModelResult, key: str, photo: str) -> dict[str, Any]:
    return next(r for r in result.record["rows"] if point_key(r["point"], r["fraction"]) == key and r["photo"] == photo)


def _caption(row: dict[str, Any]) -> str:
    return f"{row['bpp']:.3f} bpp, {row['psnr']:.1f} dB"


def _matched_key(result: ModelResult, fraction: float) -> str:
    """The model's own filter at ``fraction``, or the shared threshold where the own filter has no τ."""
    own = point_key("own", fraction)
    return own if own in result.record["points"] else point_key("theta", fraction)


def reconstruction_grid(result: ModelResult, photos: Sequence[Photo], fractions: Sequence[float],
                        jpeg_curves: Sequence[Sequence[dict[str, float]]], path: Path) -> Path:
    """Rows: photos; columns: original, globals only, the model's filter at each fraction, every token,
    and JPEG at its best quality and downscale whose bpp does not exceed the every-token bpp of that photo."""
    keys = ["globals", *(_matched_key(result, f) for f in fractions), "all"]
    columns = 2 + len(keys)
    aspect = max(p.image.shape[-1] / p.image.shape[-2] for p in photos)
    figure, axes = figure_grid(len(photos), columns, (columns * 2.0 * aspect, len(photos) * 2.2))
    for i, photo in enumerate(photos):
        _show(axes[i, 0], photo.image, f"{photo.name}: original")
        for j, key in enumerate(keys, start=1):
            _show(axes[i, j], result.reconstructions[(i, key)], f"{key}\n{_caption(_row_of(result, key, photo.name))}")
        point = closest_quality(jpeg_curves[i], _row_of(result, "all", photo.name)["bpp"])
        data = codec_bytes(photo.image, "jpeg", int(point["quality"]), point["scale"])
        jpeg = decode_codec_bytes(data, photo.image.shape[-2:])
        _show(axes[i, -1], jpeg, f"JPEG q={point['quality']} ×{point['scale']:g}\n"
                                 f"{point['bpp']:.3f} bpp, {point['psnr']:.1f} dB")
    figure.suptitle(f"{result.record['label']}: reconstructions of held-out photos")
    return save_figure(figure, path)


def keep_map(photo: Photo, keep: Tensor, patch_size: int) -> Tensor:
    """(3, H, W) the photo with dropped patches dimmed to a quarter (kept patches as they are)."""
    height, width = photo.image.shape[-2:]
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    mask = keep.reshape(rows, cols).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    mask = mask[:height, :width].to(photo.image.dtype)  # (H, W)
    return photo.image * (0.25 + 0.75 * mask)


def kept_map_figure(result: ModelResult, photos: Sequence[Photo], fraction: float, path: Path) -> Path:
    """Which patches are kept at ``fraction``: the model's filter, the shared threshold and topk, dropped dimmed."""
    keys = [k for k in (point_key(m, fraction) for m in ("own", "theta", "topk")) if k in result.record["points"]]
    patch_size = result.record["patch_size"]
    aspect = max(p.image.shape[-1] / p.image.shape[-2] for p in photos)
    figure, axes = figure_grid(len(photos), 1 + len(keys), ((1 + len(keys)) * 2.4 * aspect, len(photos) * 2.5))
    for i, photo in enumerate(photos):
        _show(axes[i, 0], photo.image, photo.name)
        for j, key in enumerate(keys, start=1):
            keep = result.keep_masks[(i, key)]
            row = _row_of(result, key, photo.name)
            _show(axes[i, j], keep_map(photo, keep, patch_size),
                  f"{key}: {int(keep.sum())}/{keep.numel()} kept\n{_caption(row)}")
    figure.suptitle(f"{result.record['label']}: kept patch tokens at {fraction:.0%} (dropped ones dimmed)")
    return save_figure(figure, path)

