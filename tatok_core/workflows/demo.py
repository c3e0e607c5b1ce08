"""The main job on the embedded default: the shipped tokenizer on the shipped held-out photos."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from tatok_core.workflows.data import HELDOUT_PHOTOS, load_builtin_photo
from tatok_core.io.images import fit_longest_side
from tatok_core.workflows.panels import Shown, draw_panels, tokenize_for_display
from tatok_core.pipeline.tokenizer import Tokenizer


@attrs.frozen
class DemoReport:
    shown: list[Shown]
    original_sizes: list[tuple[int, int]]
    panel: Path


def run_demo(model: Tokenizer, photos: Sequence[str] = HELDOUT_PHOTOS, *, max_side: int = 256,
             tau: float | None = None, out: str | os.PathLike[str] = "tatok-demo.png") -> DemoReport:
    """Tokenize whole held-out photos (never seen in training) and draw original | kept tokens | reconstruction."""
    originals = [load_builtin_photo(name) for name in photos]
    with torch.inference_mode():
        shown = [tokenize_for_display(model, fit_longest_side(image, max_side), tau, name)
                 for name, image in zip(photos, originals)]
    panel = draw_panels(shown, out, error_map=False)
    return DemoReport(shown, [tuple(image.shape[1:]) for image in originals], panel)
