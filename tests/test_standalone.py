"""Components outside a pipeline: plain keyword arguments, the ``create`` factory, reprs, exports, the
vector-quantize-pytorch compatible FSQ."""

from __future__ import annotations

import pytest
import torch

import tatok_core
from tatok_core import (CompositionError, Facts, Registry, SpecError, TokenFilter, UnknownComponentError, create,
                        dtf_select, get_registry)
from tatok_core.contract.errors import TatokError
from tatok_plugins.filters import DynamicTokenFilter
from tatok_plugins.fsq import FSQ
from tatok_plugins.vit import ViTDecoder, ViTEncoder

#: what each built-in needs when built without facts (the upstream values it cannot default)
STANDALONE: dict[tuple[str, str], dict] = {
    ("encoder", "vit"): {"dim": 32, "depth": 1, "heads": 2},
    ("global_tokenizer", "learned"): {"dim": 32, "depth": 1, "heads": 2, "num_global": 2},
    ("global_tokenizer", "none"): {},
    ("quantizer", "fsq"): {"levels": [8, 5, 5, 3]},
    ("quantizer", "vq"): {"codebook_size": 16},
    ("entropy", "prior"): {"code_factors": [4, 4], "dim": 8, "width": 16, "depth": 1, "heads": 2},
    ("entropy", "pixel"): {"patch_size": 4},
    ("entropy", "residual"): {"patch_size": 4},
    ("entropy", "chain"): {"patch_size": 4},
    ("filter", "dtf"): {"tau": 0.9},
    ("filter", "all"): {},
    ("filter", "topk"): {"k": 3},
    ("filter", "random"): {"k": 3},
    ("filter", "raster"): {"k": 3},
    ("decoder", "vit"): {"dim": 8, "patch_size": 4, "num_global": 2, "depth": 1, "heads": 2, "refine": 0},
    ("decoder", "packed"): {"dim": 8, "patch_size": 4, "num_global": 2, "depth": 1, "heads": 2, "fill_width": 8,
                            "layout": 2, "refine": 0},
    ("generator", "adaptive"): {"code_factors": [4, 4], "num_global": 2, "grid": [2, 2], "patch_size": 4,
                                "width": 16, "depth": 1, "heads": 2},
    ("generator", "raster"): {"code_factors": [4, 4], "num_global": 2, "grid": [2, 2], "patch_size": 4,
                              "width": 16, "depth": 1, "heads": 2},
    ("generator", "context"): {"code_factors": [4, 4], "num_global": 2, "grid": [2, 2], "patch_size": 4,
                               "width": 16, "rings": 1, "depth": 1},
}


def builtin_entries() -> list[tuple[str, str]]:
    return [(e.kind, e.name) for e in get_registry().entries() if e.provider.package == "tatok"]


def test_every_builtin_has_a_standalone_case() -> None:
    assert set(builtin_entries()) == set(STANDALONE), "add new built-ins to STANDALONE"


@pytest.mark.parametrize(("kind", "name"), sorted(STANDALONE))
def test_every_builtin_builds_from_keyword_arguments_alone(kind: str, name: str) -> None:
    options = STANDALONE[(kind, name)]
    component = create(kind, name, **options)
    direct = get_registry().get(kind, name)(**options)
    assert type(component) is type(direct) and component.kind == kind
    assert [p.shape for p in component.parameters()] == [p.shape for p in direct.parameters()]
    assert component.facts_in.standalone and component.label == f"{kind} {name!r}"


def test_standalone_components_run() -> None:
    fsq = FSQ(levels=[8, 5, 5, 3])
    out = fsq(torch.randn(2, 10, 4))  # dim defaults to len(levels): no projection
    assert out.codes.shape == (2, 10) and out.vectors.shape == (2, 10, 4)
    assert isinstance(fsq.project_in, torch.nn.Identity) and fsq.codebook_size == 8 * 5 * 5 * 3
    encoder = ViTEncoder(patch_size=16, dim=256)
    assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 4, 256)
    bits = torch.rand(3, 16)
    assert DynamicTokenFilter(tau=0.9).select(bits).equal(dtf_select(bits, 0.9, 1, None))


def test_facts_stay_the_composition_path_and_keywords_must_agree() -> None:
    facts = Facts({"dim": 64}, {"dim": "encoder 'vit'"})
    assert FSQ(facts, levels=[8, 5, 5, 3]).dim == 64  # composed: dim from upstream, projection added
    assert FSQ(facts, levels=[8, 5, 5, 3], dim=64).dim == 64
    with pytest.raises(CompositionError, match=r"was given dim=32 but encoder 'vit' provides dim=64"):
        FSQ(facts, levels=[8, 5, 5, 3], dim=32)
    with pytest.raises(CompositionError, match="needs 'dim'"):
        FSQ(Facts(), levels=[8, 5, 5, 3])  # given facts are validated, not bypassed


def test_missing_upstream_values_name_the_keyword() -> None:
    with pytest.raises(TypeError, match=r"decoder 'ViTDecoder' built without facts needs the keyword argument dim="):
        ViTDecoder(patch_size=4, num_global=2)
    with pytest.raises(SpecError, match=r"decoder 'vit' built without facts needs the keyword argument patch_size="):
        create("decoder", "vit", dim=8, num_global=2)


def test_create_checks_names_and_options() -> None:
    with pytest.raises(UnknownComponentError, match="did you mean 'fsq'"):
        create("quantizer", "fsqq")
    with pytest.raises(SpecError, match=r"filter 'dtf' has no option\(s\) taux \(options: tau, mode, theta, epsilon, min_keep"):
        create("filter", "dtf", taux=0.5)
    with pytest.raises(SpecError, match="tau must be a number in"):
        create("filter", "dtf", tau=1.5)


def test_create_resolves_third_party_components_through_the_registry() -> None:
    class EveryOther(TokenFilter):
        """Keep even positions."""

        def __init__(self, facts: Facts | None = None, *, offset: int = 0) -> None:
            super().__init__(facts)
            self.offset = offset

        def select(self, bits, tau=None):
            from tatok_core import Selection

            keep = (torch.arange(bits.shape[1]) + self.offset) % 2 == 0
            return Selection.from_mask(keep.expand_as(bits))

    registry = Registry()
    registry.add("filter", "every-other", EveryOther)
    flt = create("filter", "every-other", registry=registry, offset=1)
    assert flt.select(torch.rand(1, 4)).lengths.tolist() == [2] and flt.options == {"offset": 1}
    assert "offset=1" in repr(flt)


def test_reprs_show_options_and_upstream_values() -> None:
    # regression: DynamicTokenFilter(Facts(), tau=0.9) printed as "DynamicTokenFilter()"
    assert repr(DynamicTokenFilter(Facts(), tau=0.9)) == "DynamicTokenFilter(tau=0.9, mode='tau', theta=8.0, epsilon=256.0, min_keep=1, max_keep=-1, backend='auto')"
    text = repr(FSQ(levels=[8, 5, 5, 3]))
    assert "levels=[8, 5, 5, 3]" in text and "dim=4" in text
    assert "patch_size=16, dim=256" in ViTEncoder(patch_size=16, dim=256).extra_repr()
    composed = tatok_core.Tokenizer(tatok_core.PipelineSpec.compose(options={"encoder.dim": 32}, check=False))
    assert "dim=32" in composed.quantizer.extra_repr()  # the upstream value it was built on


def test_public_names_are_exported() -> None:
    for name in tatok_core.__all__:
        assert getattr(tatok_core, name) is not None
    exported = set(tatok_core.__all__)
    assert {"create", "dtf_select", "Tokens", "ImageTokens", "Selection", "Quantized", "EntropyEstimate",
            "EntropyContext", "Facts", "Component", "WeightsFileError", "MissingExtraError"} <= exported
    public_classes = {n for n in vars(tatok_core) if n[0].isupper() and not n.startswith("_")}
    assert public_classes <= exported | {"Tokenizer"}, public_classes - exported
    assert issubclass(tatok_core.WeightsFileError, TatokError)


# -- the vector-quantize-pytorch switch -------------------------------------------------------------
def test_vqp_compatible_fsq_conventions() -> None:
    from tatok_plugins.vqp_compat import FSQ as CompatFSQ

    fsq = CompatFSQ(levels=[8, 5, 5, 3])
    z = torch.randn(2, 7, 4) * 3
    quantized, indices = fsq(z)
    assert quantized.shape == z.shape and indices.shape == (2, 7) and indices.dtype == torch.int32
    digits = torch.stack([indices % 8, indices // 8 % 5, indices // 40 % 5, indices // 200], -1)  # first level least significant
    half = torch.tensor([4.0, 2.0, 2.0, 1.0])
    assert torch.equal(quantized, (digits - half) / half)
    image = torch.randn(2, 4, 3, 5)  # (B, D, H, W): channel-first like vector_quantize_pytorch
    q_image, i_image = fsq(image)
    assert q_image.shape == image.shape and i_image.shape == (2, 3, 5)
    assert torch.equal(fsq.indices_to_codes(i_image), q_image) and torch.equal(fsq.indices_to_codes(indices), quantized)


def test_vqp_fsq_is_a_one_line_import_switch() -> None:
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from tatok_plugins.vqp_compat import FSQ as CompatFSQ

    for levels, shape in (([8, 5, 5, 3], (2, 9, 4)), ([8, 8, 8, 5, 5, 5], (2, 6, 4, 4))):
        ours, theirs = CompatFSQ(levels=levels), vqp.FSQ(levels=levels)
        z = torch.randn(*shape) * 2
        (q1, i1), (q2, i2) = ours(z), theirs(z)
        assert torch.equal(q1, q2) and torch.equal(i1, i2) and i1.dtype == i2.dtype
        assert torch.equal(ours.indices_to_codes(i1), theirs.indices_to_codes(i2))
        assert ours.codebook_size == theirs.codebook_size
