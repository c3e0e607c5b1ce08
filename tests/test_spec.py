"""PipelineSpec: exact TOML/JSON round trips, compose, and composition checks that name both sides."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tatok_core import Decoder, Facts, PipelineSpec, hookimpl
from tatok_core.contract.errors import CompositionError, SpecError, UnknownComponentError
from tatok_core.contract.interfaces import PIPELINE_KINDS
from tatok_core.contract.registry import Provider, build_default_registry
from tatok_core.contract.spec import ComponentSpec, parse_option_assignment

names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=True),
    st.text(max_size=20),
)
values = st.one_of(scalars, st.lists(st.integers(-1000, 1000), max_size=6), st.lists(st.text(max_size=5), max_size=4),
                   st.lists(st.floats(allow_nan=False), max_size=4))
component_specs = st.builds(ComponentSpec, names, st.dictionaries(names, values, max_size=5))
pipeline_specs = st.builds(
    PipelineSpec, **{kind: component_specs for kind in PIPELINE_KINDS},
    pipeline=st.fixed_dictionaries({"train_tau_min": st.floats(0, 1)}),
)


@settings(max_examples=150, deadline=None)
@given(pipeline_specs)
def test_toml_and_json_round_trip_exactly(spec: PipelineSpec) -> None:
    assert PipelineSpec.from_toml(spec.to_toml()) == spec
    assert PipelineSpec.from_json(spec.to_json()) == spec
    assert PipelineSpec.from_toml(spec.to_toml()).digest() == spec.digest()


def test_defaults_and_compose_options() -> None:
    spec = PipelineSpec.compose(encoder="vit", quantizer="fsq", filter="dtf",
                                options={"encoder.dim": 64, "decoder": {"depth": 1}, "filter.tau": 0.5})
    assert spec.global_tokenizer.name == "learned" and spec.entropy.name == "prior"
    assert spec.encoder.options == {"dim": 64}
    assert spec.decoder.options == {"depth": 1}
    assert spec.filter.options == {"tau": 0.5}


def test_save_and_load_files(tmp_path) -> None:
    spec = PipelineSpec.compose(quantizer="vq", options={"quantizer.codebook_size": 64})
    for suffix in (".toml", ".json"):
        spec.save(tmp_path / f"spec{suffix}")
        assert PipelineSpec.load(tmp_path / f"spec{suffix}") == spec


def test_digest_changes_with_options() -> None:
    assert PipelineSpec().digest() != PipelineSpec.compose(options={"filter.tau": 0.5}).digest()


def test_digest_ignores_the_training_only_pipeline_options() -> None:
    """Token files are tagged by the digest: how a model was trained does not change what its tokens mean."""
    trained_otherwise = PipelineSpec().updated({}, {"pipeline.train_full_share": 0.5, "pipeline.train_keep": "topk"})
    assert trained_otherwise != PipelineSpec() and trained_otherwise.digest() == PipelineSpec().digest()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"encoder.depht": 3}, "encoder 'vit' has no option(s) depht (options: patch_size, dim, depth"),
        ({"filter.tau": 1.5}, "filter 'dtf': tau must be a number in [0, 1], got 1.5"),
        ({"encoder.dim": 136, "encoder.heads": 8, "decoder.heads": 16},
         "decoder 'vit' (dim 136 from encoder 'vit'): width 136 must be divisible by heads (16)"),
        ({"dim": 3}, "option 'dim' must look like KIND.OPTION"),
        ({"encoder.dim": None}, "option 'dim': unsupported value None"),
        ({"pipeline.bogus": 1}, "unknown pipeline options ['bogus']"),
    ],
)
def test_bad_options_fail_at_compose_time(options: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        PipelineSpec.compose(options=options)
    assert message in str(info.value)


def test_unknown_component_at_compose_time() -> None:
    with pytest.raises(UnknownComponentError, match="did you mean 'learned'"):
        PipelineSpec.compose(global_tokenizer="learnt")


class PatchSixteenDecoder(Decoder):
    """A decoder that only works on 16-pixel patches."""

    def __init__(self, facts: Facts) -> None:
        super().__init__(facts)
        facts.agree("patch_size", 16, self.label)

    def forward(self, global_vectors, patch_vectors, keep, grid):  # pragma: no cover - never built
        raise AssertionError


class Plugin:
    @hookimpl
    def tatok_register(self, registry) -> None:
        registry.add("decoder", "p16", PatchSixteenDecoder)


def test_incompatible_composition_names_both_components() -> None:
    registry = build_default_registry()
    registry.register_plugin(Plugin(), Provider("test-plugin", "0", "p16"))
    with pytest.raises(CompositionError) as info:
        PipelineSpec.compose(decoder="p16", options={"encoder.patch_size": 4}, registry=registry)
    assert str(info.value) == "decoder 'p16' requires patch_size=16 but encoder 'vit' provides patch_size=4"
    PipelineSpec.compose(decoder="p16", options={"encoder.patch_size": 16}, registry=registry)  # compatible


def test_missing_fact_names_the_component_that_should_provide_it() -> None:
    facts = Facts().extended({"code_factors": None}, "quantizer 'hashing'")
    with pytest.raises(CompositionError, match="entropy 'prior' needs 'code_factors', which quantizer 'hashing' does not provide"):
        facts.need("code_factors", "entropy 'prior'")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("encoder.dim=256", ("encoder.dim", 256)), ("filter.tau=0.5", ("filter.tau", 0.5)),
     ("quantizer.levels=[8, 5, 5]", ("quantizer.levels", (8, 5, 5))), ("vq.ema=true", ("vq.ema", True)),
     ("entropy.measure=expected", ("entropy.measure", "expected")), ("a.b=\"x y\"", ("a.b", "x y"))],
)
def test_parse_option_assignment(text: str, expected: tuple) -> None:
    assert parse_option_assignment(text) == expected


def test_bad_spec_files(tmp_path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        PipelineSpec.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[encoder\n")
    with pytest.raises(SpecError, match="invalid TOML spec"):
        PipelineSpec.load(tmp_path / "bad.toml")
    (tmp_path / "extra.toml").write_text('[encoder]\nname = "vit"\nsize = 3\n')
    with pytest.raises(SpecError, match=r"\[encoder\] has unknown keys \['size'\]"):
        PipelineSpec.load(tmp_path / "extra.toml")
