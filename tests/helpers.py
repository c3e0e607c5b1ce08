"""Small, fast compositions for tests."""

from __future__ import annotations

from typing import Any

from tatok_core import PipelineSpec
from tatok_core.contract.interfaces import PIPELINE_KINDS

SMALL_OPTIONS: dict[str, Any] = {
    "encoder": {"dim": 32, "depth": 1, "heads": 2},
    "global_tokenizer": {"depth": 1, "heads": 2},
    "decoder": {"depth": 1, "heads": 2, "refine": 8},
}
COMPONENT_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("global_tokenizer", "learned"): {"num_global": 4},
    ("quantizer", "fsq"): {"levels": [5, 5, 5, 5]},
    ("quantizer", "vq"): {"codebook_size": 64},
    ("entropy", "prior"): {"width": 32, "depth": 1, "heads": 2},
    ("filter", "topk"): {"k": 5},
    ("filter", "random"): {"k": 5},
    ("filter", "raster"): {"k": 5},
    ("decoder", "packed"): {"depth": 1, "heads": 2, "fill_width": 16, "fill_depth": 1, "window": 4, "layout": 2,
                            "refine": 8},
}


def small_spec(**names: str) -> PipelineSpec:
    """A tiny composition of the named components (defaults for the rest) with options that fit them."""
    chosen = PipelineSpec().updated(names, {})
    options: dict[str, Any] = {}
    for kind in PIPELINE_KINDS:
        name = chosen.component(kind).name
        generic = SMALL_OPTIONS.get(kind, {}) if name in ("vit", "learned") else {}
        options[kind] = {**generic, **COMPONENT_OPTIONS.get((kind, name), {})}
    return PipelineSpec.compose(**{kind: chosen.component(kind).name for kind in options}, options=options)
