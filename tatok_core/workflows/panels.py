"""Pictures of what a tokenizer kept: original | kept-token map | reconstruction (| error), one row per image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
from torch import Tensor

from tatok_core.contract.errors import TatokError
from tatok_core.workflows.metrics import psnr
from tatok_core.pipeline.set_search import searches
from tatok_core.workflows.analysis import Analysed, cannot_tokenize
from tatok_core.workflows.inference import evaluating
from tatok_core.workflows.plotting import save_figure
from tatok_core.workflows.rate_control import applied_rule, check_tau
from tatok_core.pipeline.tokenizer import Tokenizer


@attrs.frozen(eq=False)
class Shown:
    """One image tokenized for display: the image, its reconstruction, bits and keep mask per patch."""

    name: str
    image: Tensor  # (C, H, W) in [0, 1]
    reconstruction: Tensor  # (C, H, W)
    bits: np.ndarray  # (rows, cols)
    keep: np.ndarray  # (rows, cols) bool
    patch_size: int
    rate: str  # e.g. "tau 0.9"
    theta: float | None = None  # the θ rule's threshold in bits, marked on the map's scale; None for other rules
    searched: bool = False  # members chosen again by the set search: kept tokens may then hold fewer bits than θ

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def num_patches(self) -> int:
        return int(self.keep.size)

    @property
    def psnr(self) -> float:
        return float(psnr(self.reconstruction[None], self.image[None])[0])


def tokenize_for_display(model: Tokenizer, image: Tensor, tau: float | None, name: str = "") -> Shown:
    """Encode and decode one (C, H, W) image; ``tau`` None uses the filter's own rule and threshold, a τ
    switches it to the per-image τ rule (whatever rule the model ships with)."""
    tau = None if tau is None else check_tau(tau)
    problem = cannot_tokenize(model, image)
    if problem:
        raise TatokError(f"cannot tokenize {name or 'image'}: {problem}")
    token_filter = model.token_filter() if tau is None else model.tau_filter()
    with evaluating(model) as device:
        analysed = Analysed.of(model, image[None].to(device))
        selection = token_filter.select(analysed.bits, tau)
        searched = searches(token_filter) and analysed.kept_search is not None
        if searched:
            selection = analysed.searched(selection)
        reconstruction = model.decode(analysed.tokens(selection, search=False).to(device))[0].cpu()
    rows, cols = analysed.grid
    rule, threshold = applied_rule(token_filter)
    threshold = tau if tau is not None else threshold
    return Shown(
        name=name,
        image=image,
        reconstruction=reconstruction,
        bits=analysed.bits[0].reshape(rows, cols).numpy(),
        keep=selection.keep[0].reshape(rows, cols).numpy(),
        patch_size=model.patch_size,
        rate=f"{rule} {threshold:g}" if threshold is not None else token_filter.label,
        theta=threshold if rule == "theta" else None,
        searched=searched,
    )


def bits_scale(bits: np.ndarray, theta: float | None) -> tuple[float, float]:
    """(low, high) of the map's colour scale: every patch's bits (dropped ones too) and θ, so the scale
    says where θ cuts even when a photo keeps no token (a scale of the kept bits alone would be empty)."""
    values = [float(bits.min()), float(bits.max())] + ([theta] if theta is not None else [])
    low, high = min(values), max(values)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def draw_panels(shown: Sequence[Shown], path: str | os.PathLike[str], *, error_map: bool = True) -> Path:
    """PNG with one row per image: original | bits of kept patches (dropped grey) | reconstruction | error."""
    from tatok_core.contract.extras import require

    matplotlib = require("matplotlib", "drawing panels")  # imported here: ~0.5 s that encoding need not pay
    from matplotlib.figure import Figure

    columns = 4 if error_map else 3
    figure = Figure(figsize=(4 * columns, 4.2 * len(shown)), dpi=100, layout="constrained")
    grid = figure.subplots(len(shown), columns, squeeze=False)
    for row, item in zip(grid, shown):
        height, width = item.image.shape[1:]
        rows, cols = item.keep.shape
        p = item.patch_size
        label = f"{item.name} " if item.name else ""
        row[0].imshow(item.image.permute(1, 2, 0).numpy(), interpolation="nearest")
        row[0].set_title(f"{label}original {height}×{width}")
        heat = np.ma.masked_array(item.bits, mask=~item.keep)
        low, high = bits_scale(item.bits, item.theta)
        mapped = row[1].imshow(heat, cmap=matplotlib.colormaps["magma"].with_extremes(bad="0.8"), vmin=low,
                               vmax=high, interpolation="nearest", extent=(0, cols * p, rows * p, 0))
        row[1].set_xlim(0, width)
        row[1].set_ylim(height, 0)
        scale = figure.colorbar(mapped, ax=row[1], label="bits (kept patches; dropped grey)", shrink=0.8)
        if item.theta is not None:
            scale.ax.axhline(item.theta, color="tab:cyan", linewidth=2)
            scale.ax.text(-0.3, item.theta, "θ", color="tab:cyan", ha="right", va="center",
                          transform=scale.ax.get_yaxis_transform())
        how = f"{item.rate}, searched" if item.searched else item.rate
        row[1].set_title(f"kept {item.kept}/{item.num_patches} patch tokens ({how})")
        row[2].imshow(item.reconstruction.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        row[2].set_title(f"reconstruction {item.psnr:.2f} dB")
        if error_map:
            error = row[3].imshow((item.reconstruction - item.image).abs().mean(0).numpy(), cmap="inferno",
                                  vmin=0, interpolation="nearest")
            figure.colorbar(error, ax=row[3], label="|error|, mean over RGB", shrink=0.8)
            row[3].set_title("error")
        for axes in row:
            axes.set_axis_off()
    return save_figure(figure, path)


def show_panel(model: Tokenizer, image: Tensor, tau: float | None, path: str | os.PathLike[str]) -> Shown:
    """One image's panel with the error map (what ``tatok show`` draws); returns what was shown."""
    shown = tokenize_for_display(model, image, tau)
    draw_panels([shown], path)
    return shown
