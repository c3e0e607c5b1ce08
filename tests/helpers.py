"""Small, fast compositions for tests, and a recorder of what a budget workflow does in which order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tatok_core import PipelineSpec
from tatok_core.contract.interfaces import PIPELINE_KINDS, Generator
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.generation import build_generator, generator_facts

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


def work_order(monkeypatch: pytest.MonkeyPatch, workflow: object) -> list[str]:
    """Records, in order, what a budget ``workflow`` module does: a bits-only analysis ("bits"), the
    calibration ("calibrate") and an analysis that keeps what the tokens are made from ("tokens")."""
    events: list[str] = []

    def recorded(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            events.append(name)
            return call(*args, **kwargs)
        return wrapper

    for name, attribute in (("bits", "analysed_bits"), ("calibrate", "calibrate_bits")):
        monkeypatch.setattr(workflow, attribute, recorded(name, getattr(workflow, attribute)))
    analysed = getattr(workflow, "Analysed")
    monkeypatch.setattr(analysed, "of", classmethod(recorded("tokens", analysed.of.__func__)))
    return events


def coding_prior(model: Tokenizer, seed: int = 0) -> Generator:
    """An untrained ``context`` prior over ``model``'s tokens, its weights re-drawn so that codes differ a
    lot in price (a trained prior's are learned; what matters here is that some codes are cheaper)."""
    torch.manual_seed(seed)
    prior = build_generator("context", generator_facts(model.quantizer.code_factors, model.num_global, (4, 6),
                                                      model.patch_size), width=8, rings=1, depth=1)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.7)
    return prior.eval()
