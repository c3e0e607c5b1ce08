"""PipelineSpec: which component of each kind, with which options — the recipe of a tokenizer.

A spec is plain data (names and TOML-representable option values), so it serialises to TOML and JSON
and back exactly, and the same spec always builds the same model. Building happens in
:func:`build_components`, which checks the composition as it goes (see :mod:`tatok_core.contract.interfaces`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import attrs
import tomli_w
import torch

from tatok_core.contract.errors import CompositionError, SpecError
from tatok_core.contract.interfaces import PIPELINE_KINDS, Component, Facts
from tatok_core.contract.registry import Registry, get_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Scalar = Union[bool, int, float, str]
OptionValue = Union[Scalar, tuple[Scalar, ...]]

DEFAULT_COMPONENTS: dict[str, str] = {
    "encoder": "vit",
    "global_tokenizer": "learned",
    "quantizer": "fsq",
    "entropy": "prior",
    "filter": "dtf",
    "decoder": "vit",
}
PIPELINE_OPTIONS: dict[str, OptionValue] = {
    "train_tau_min": 0.0,  # τ is drawn per image from U(train_tau_min, 1) during training
    "train_keep": "filter",  # training selection: "filter" (the spec's filter at that τ) or "topk" (k ~ U{0…N})
    "train_random_rank": 0.0,  # with "topk": share of images whose tokens are ranked at random
    "train_full_share": 0.0,  # with "topk": share of images that keep every token (k = N)
    "train_max_fraction": 1.0,  # with "topk": the other images draw k ~ U{0 … ⌊fraction·N⌋}
    "refine_steps": 0,  # encoding: optimiser steps fitting the kept set's tokens to the image (0: the encoder's)
    "refine_lr": 0.005,  # encoding: Adam's step on the quantizer's inputs (small: codes stay predictable)
    "refine_bpp_worth": 0.0,  # encoding with a coding prior (compression): dB one bpp is worth to refinement (0: pixels only)
    "refine_coded_steps": 0,  # rate-aware refinement's steps (0: refine_steps): the bits keep longer fits predictable
    "refine_coded_lr": 0.0,  # rate-aware refinement's Adam step (0: refine_lr)
    "search_sweeps": 0,  # encoding: exchange sweeps choosing WHICH tokens at the filter's count (0: the filter's set)
    "search_stride": 4,  # the search's lattice: one decode per stride² phase, positions stride patches apart
    "search_share": 0.5,  # the share of the paying exchanges a sweep tries at once
    "search_batch": 16,  # masks the search decodes per call, of any images of the batch (a GPU takes more)
}


def _option_value(key: str, value: Any) -> OptionValue:
    if isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and value != value:
            raise SpecError(f"option {key!r}: NaN cannot be stored in a spec")
        return value
    if isinstance(value, (list, tuple)):
        items = tuple(_option_value(key, v) for v in value)
        if any(isinstance(v, tuple) for v in items) or len({type(v) for v in items}) > 1:
            raise SpecError(f"option {key!r}: lists must be flat and of one type, got {value!r}")
        return items
    raise SpecError(f"option {key!r}: unsupported value {value!r} (use bool, int, float, str or a flat list)")


def _options(value: Mapping[str, Any]) -> Mapping[str, OptionValue]:
    if not isinstance(value, Mapping):
        raise SpecError(f"options must be a table/mapping, got {value!r}")
    return {str(k): _option_value(str(k), v) for k, v in sorted(value.items())}


def _pipeline_options(value: Mapping[str, Any]) -> Mapping[str, OptionValue]:
    """Pipeline options with every default filled in, so a spec equals its own round trip."""
    return _options({**PIPELINE_OPTIONS, **value} if isinstance(value, Mapping) else value)


@attrs.frozen
class ComponentSpec:
    name: str
    options: Mapping[str, OptionValue] = attrs.field(factory=dict, converter=_options)

    def to_dict(self) -> dict[str, Any]:
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        return {"name": self.name, "options": options}


def _component(kind: str) -> Any:
    return attrs.field(
        default=ComponentSpec(DEFAULT_COMPONENTS[kind]),
        converter=lambda v: ComponentSpec(v) if isinstance(v, str) else v,
    )


@attrs.frozen
class PipelineSpec:
    """One component name + options per kind, plus pipeline-level options."""

    encoder: ComponentSpec = _component("encoder")
    global_tokenizer: ComponentSpec = _component("global_tokenizer")
    quantizer: ComponentSpec = _component("quantizer")
    entropy: ComponentSpec = _component("entropy")
    filter: ComponentSpec = _component("filter")
    decoder: ComponentSpec = _component("decoder")
    pipeline: Mapping[str, OptionValue] = attrs.field(factory=lambda: dict(PIPELINE_OPTIONS), converter=_pipeline_options)

    @pipeline.validator
    def _check_pipeline(self, _: attrs.Attribute, value: Mapping[str, OptionValue]) -> None:
        unknown = set(value) - set(PIPELINE_OPTIONS)
        if unknown:
            raise SpecError(f"unknown pipeline options {sorted(unknown)} (known: {sorted(PIPELINE_OPTIONS)})")
        if value.get("train_keep", "filter") not in ("filter", "topk"):
            raise SpecError(f"pipeline option train_keep must be 'filter' or 'topk', got {value['train_keep']!r}")
        fraction = value.get("train_max_fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise SpecError(f"pipeline option train_max_fraction must be a number in [0, 1], got {fraction!r}")
        batch = value.get("search_batch", 16)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise SpecError(f"pipeline option search_batch must be an integer >= 1 (masks per decode), got {batch!r}")
        for key in ("refine_steps", "refine_coded_steps", "search_sweeps"):
            steps = value.get(key, 0)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise SpecError(f"pipeline option {key} must be an integer >= 0, got {steps!r}")
        stride = value.get("search_stride", 4)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 2:
            raise SpecError(f"pipeline option search_stride must be an integer >= 2 (patches between toggles), got {stride!r}")
        share = value.get("search_share", 0.5)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise SpecError(f"pipeline option search_share must be a number in (0, 1], got {share!r}")
        lr = value.get("refine_lr", 0.005)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise SpecError(f"pipeline option refine_lr must be a number > 0, got {lr!r}")
        coded_lr = value.get("refine_coded_lr", 0.0)
        if isinstance(coded_lr, bool) or not isinstance(coded_lr, (int, float)) or not 0 <= coded_lr < float("inf"):
            raise SpecError(f"pipeline option refine_coded_lr must be a number >= 0 (0: refine_lr), got {coded_lr!r}")
        worth = value.get("refine_bpp_worth", 0.0)
        if isinstance(worth, bool) or not isinstance(worth, (int, float)) or not 0 <= worth < float("inf"):
            raise SpecError(f"pipeline option refine_bpp_worth must be a number of dB per bpp >= 0, got {worth!r}")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def compose(
        cls,
        *,
        encoder: str | None = None,
        global_tokenizer: str | None = None,
        quantizer: str | None = None,
        entropy: str | None = None,
        filter: str | None = None,
        decoder: str | None = None,
        options: Mapping[str, Any] | None = None,
        registry: Registry | None = None,
        check: bool = True,
    ) -> PipelineSpec:
        """Pick components by name (defaults for the rest) and set options.

        ``options`` takes dotted keys (``{"encoder.dim": 256}``) or one table per kind
        (``{"encoder": {"dim": 256}}``). With ``check`` (the default) the composition is built on the
        meta device, so unknown names, unknown options and incompatible components fail here.
        """
        names = dict(encoder=encoder, global_tokenizer=global_tokenizer, quantizer=quantizer,
                     entropy=entropy, filter=filter, decoder=decoder)
        spec = cls().updated(names, options or {})
        if check:
            spec.check(registry)
        return spec

    def updated(self, names: Mapping[str, str | None], options: Mapping[str, Any]) -> PipelineSpec:
        """A copy with components renamed (``None`` keeps the current one) and options set.

        Renaming a component drops its old options; ``options`` takes dotted keys or tables per kind.
        """
        spec = self
        for kind, name in names.items():
            if name is not None and name != spec.component(kind).name:
                spec = attrs.evolve(spec, **{kind: ComponentSpec(name)})
        per_kind: dict[str, dict[str, Any]] = {kind: {} for kind in (*PIPELINE_KINDS, "pipeline")}
        for key, value in options.items():
            if isinstance(value, Mapping) and key in per_kind:
                per_kind[key].update(value)
                continue
            kind, dot, option = key.partition(".")
            if not dot or kind not in per_kind or not option:
                raise SpecError(f"option {key!r} must look like KIND.OPTION with KIND one of {', '.join(per_kind)}")
            per_kind[kind][option] = value
        changes: dict[str, Any] = {
            kind: ComponentSpec(spec.component(kind).name, {**spec.component(kind).options, **per_kind[kind]})
            for kind in PIPELINE_KINDS if per_kind[kind]
        }
        if per_kind["pipeline"]:
            changes["pipeline"] = {**spec.pipeline, **per_kind["pipeline"]}
        return attrs.evolve(spec, **changes)

    def component(self, kind: str) -> ComponentSpec:
        if kind not in PIPELINE_KINDS:
            raise SpecError(f"unknown component kind {kind!r}; kinds are {', '.join(PIPELINE_KINDS)}")
        return getattr(self, kind)

    def check(self, registry: Registry | None = None) -> None:
        """Build the composition on the meta device (no memory, no tensors) to validate it."""
        with torch.device("meta"):
            build_components(self, registry)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {kind: self.component(kind).to_dict() for kind in PIPELINE_KINDS}
        data["pipeline"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.pipeline.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a table/mapping, got {type(data).__name__}")
        unknown = set(data) - {*PIPELINE_KINDS, "pipeline"}
        if unknown:
            raise SpecError(f"unknown spec sections {sorted(unknown)} (known: {', '.join((*PIPELINE_KINDS, 'pipeline'))})")
        kwargs: dict[str, Any] = {}
        for kind in PIPELINE_KINDS:
            if kind not in data:
                continue
            section = data[kind]
            if isinstance(section, str):
                section = {"name": section}
            if not isinstance(section, Mapping) or "name" not in section:
                raise SpecError(f"spec section [{kind}] needs a 'name'")
            extra = set(section) - {"name", "options"}
            if extra:
                raise SpecError(f"spec section [{kind}] has unknown keys {sorted(extra)} (expected 'name', 'options')")
            kwargs[kind] = ComponentSpec(str(section["name"]), section.get("options", {}))
        if "pipeline" in data:
            kwargs["pipeline"] = {**PIPELINE_OPTIONS, **data["pipeline"]}
        return cls(**kwargs)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> PipelineSpec:
        try:
            return cls.from_dict(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"invalid TOML spec: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PipelineSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"invalid JSON spec: {exc}") from exc

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_toml())

    @classmethod
    def load(cls, path: str | Path) -> PipelineSpec:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"spec file not found: {path}")
        text = path.read_text()
        return cls.from_json(text) if path.suffix == ".json" else cls.from_toml(text)

    def digest(self) -> str:
        """A stable hash of the components (names and options), e.g. to tag token files. The pipeline
        options only steer training and how hard encoding works, never what a token decodes to, so a
        new one (or another value) leaves the tokens' meaning and the digest alone."""
        components = {kind: self.component(kind).to_dict() for kind in PIPELINE_KINDS}
        canonical = json.dumps(components, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_option_assignment(text: str) -> tuple[str, OptionValue]:
    """``"encoder.dim=256"`` → ``("encoder.dim", 256)``; the value is read as TOML, else taken as a string."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise SpecError(f"expected KIND.OPTION=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), _option_value(key.strip(), value)


def instantiate(cls: type[Component], facts: Facts | None, kind: str, spec: ComponentSpec) -> Component:
    """Build ``cls`` with ``spec.options``, checked by name and simple type; ``facts`` None builds it standalone."""
    parameters = {
        p.name: p for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind == inspect.Parameter.KEYWORD_ONLY
    }
    accepted = list(parameters)
    unknown = [k for k in spec.options if k not in accepted]
    if unknown:
        raise SpecError(
            f"{kind} {spec.name!r} has no option(s) {', '.join(unknown)} (options: {', '.join(accepted) or 'none'})"
        )
    label = f"{kind} {spec.name!r}"
    for key, value in spec.options.items():
        _check_option_type(f"{kind}.{key}", label, parameters[key].annotation, value)
    try:
        return cls(attrs.evolve(facts or Facts(standalone=True), building=label), **spec.options)
    except (TypeError, ValueError) as exc:
        raise SpecError(str(exc) if label in str(exc) else f"{label}: {exc}") from exc
    except RuntimeError as exc:  # torch refusing a size the component did not check, e.g. dim=-4
        given = ", ".join(f"{kind}.{k}={v!r}" for k, v in spec.options.items())
        raise SpecError(f"{label} cannot be built with {given or 'its defaults'}: {exc}") from exc


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_option_type(option: str, label: str, annotation: Any, value: OptionValue) -> None:
    """Refuse a value of the wrong type for an option annotated bool/int/float/str, naming the option."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    expected = _SIMPLE_TYPES.get(name) if isinstance(name, str) else None
    if expected and (not isinstance(value, expected) or (isinstance(value, bool) and name != "bool")):
        article = "an" if name == "int" else "a"
        raise SpecError(f"{option}={value!r}: {label} takes {article} {name} for {option.partition('.')[2]!r}")


def create(kind: str, name: str, *, facts: Facts | None = None, registry: Registry | None = None,
           **options: Any) -> Component:
    """The ``kind`` component registered as ``name`` (built-in or from a plugin package), built from options.

    ``create("quantizer", "fsq", levels=[8, 5, 5, 3])`` is ``FSQ(levels=[8, 5, 5, 3])`` found by name;
    options are checked by name (unknown ones list the known ones). Without ``facts`` the component is
    standalone and takes the upstream values it needs (``dim`` …) from ``options``.
    """
    cls = (registry or get_registry()).get(kind, name)
    return instantiate(cls, facts, kind, ComponentSpec(name, options))


def build_components(spec: PipelineSpec, registry: Registry | None = None) -> dict[str, Component]:
    """Instantiate every component in data-flow order, passing each the facts of those before it."""
    registry = registry or get_registry()
    facts = Facts()
    built: dict[str, Component] = {}
    for kind in PIPELINE_KINDS:
        component_spec = spec.component(kind)
        cls = registry.get(kind, component_spec.name)
        component = instantiate(cls, facts, kind, component_spec)
        try:
            facts = facts.extended(component.provides(), component.label)
        except Exception as exc:  # a plugin whose provides() is broken
            raise CompositionError(f"{component.label} failed to describe itself: {exc}") from exc
        built[kind] = component
    return built
