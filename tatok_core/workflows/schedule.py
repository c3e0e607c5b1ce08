"""The learning-rate schedule every trainer here uses (tokenizers and generation priors)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, steps: int, warmup: int, min_lr_ratio: float = 0.05) -> float:
    """Factor of the base learning rate at ``step``: linear warm-up over ``warmup`` steps, then a cosine
    from 1 down to ``min_lr_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
