"""The example plugin, installed: discovered, listed, composed with built-ins, trained, and its filter's guarantees."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tatok_cli.main import cli
from tatok_core import Facts, PipelineSpec, Tokenizer
from tatok_core.contract.errors import FilterInputError, SpecError
from tatok_core.contract.registry import Provider, build_default_registry, get_registry, reset_registry
from tatok_core.workflows.training import TrainConfig, train

try:
    from tatok_plugin_example import ConvEncoder, ThresholdFilter
except ImportError as exc:  # pragma: no cover - a set-up error: say how to fix it
    raise ImportError("tatok-plugin-example is not installed: pip install -e examples/tatok-plugin-example") from exc

SMALL = {  # tiny built-ins around the plugin's components, so every test stays fast on a CPU
    "encoder.dim": 32,
    "global_tokenizer.num_global": 2,
    "global_tokenizer.depth": 1,
    "global_tokenizer.heads": 2,
    "quantizer.levels": [5, 5, 5],
    "entropy.width": 32,
    "entropy.depth": 1,
    "entropy.heads": 2,
    "decoder.depth": 1,
    "decoder.heads": 2,
    "decoder.refine": 0,
}


@pytest.fixture(autouse=True)
def fresh_registry():
    """Rediscover plugins for every test (another test may have installed a fake registry)."""
    previous = reset_registry()
    yield
    reset_registry(previous)


def test_package_is_installed_with_its_entry_point() -> None:
    try:
        dist = importlib.metadata.distribution("tatok-plugin-example")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - importable from source, not installed
        pytest.fail("tatok-plugin-example is not installed: pip install -e examples/tatok-plugin-example")
    (ep,) = [ep for ep in dist.entry_points if ep.group == "tatok"]
    assert ep.value == "tatok_plugin_example.tatok_plugin"


def test_components_are_registered_with_the_package_as_provider() -> None:
    registry = get_registry()
    for kind, name, cls in (("encoder", "conv", ConvEncoder), ("filter", "threshold", ThresholdFilter)):
        entry = registry.entry(kind, name)
        assert entry.cls is cls
        assert entry.provider == Provider("tatok-plugin-example", "0.1.0", "tatok_plugin_example")


def test_env_switch_skips_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TATOK_DISABLE_ENTRYPOINTS", "tatok_plugin_example")
    registry = build_default_registry()
    assert "conv" not in registry.names("encoder") and "threshold" not in registry.names("filter")
    assert "vit" in registry.names("encoder")  # built-ins stay


def test_listed_by_tatok_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    import tatok_cli.console

    monkeypatch.setattr(tatok_cli.console.console, "_width", 250)  # rich fixes its width at import: no folding
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert " conv " in result.output and " threshold " in result.output
    assert "tatok-plugin-example" in result.output and "Strided conv stem" in result.output


def test_composes_with_builtins_on_the_command_line() -> None:
    args = ["compose", "--encoder", "conv", "--filter", "threshold", "--check", "--image-size", "32"]
    args += [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}".replace(" ", ""))]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output
    assert "2 global + 64 patch" in result.output


def test_composition_errors_name_the_plugin() -> None:
    result = CliRunner().invoke(cli, ["compose", "--encoder", "conv", "--set", "encoder.depht=1"])
    assert result.exit_code == 1
    assert "encoder 'conv' has no option(s) depht" in result.output
    with pytest.raises(SpecError, match="filter 'threshold'.*bits_above"):
        PipelineSpec.compose(filter="threshold", options={"filter.bits_above": -1.0})


@pytest.mark.parametrize(("height", "width", "patch"), [(16, 16, 4), (24, 40, 4), (12, 20, 2), (16, 48, 8)])
def test_encoder_handles_any_multiple_of_the_patch_size(height: int, width: int, patch: int) -> None:
    spec = PipelineSpec.compose(encoder="conv", filter="threshold", options={**SMALL, "encoder.patch_size": patch})
    model = Tokenizer(spec).eval()
    assert model.encoder.provides() == {"channels": 3, "patch_size": patch, "dim": 32}
    images = torch.rand(2, 3, height, width)
    features = model.encoder(images)
    assert features.shape == (2, (height // patch) * (width // patch), 32)
    tokens = model.encode(images)
    assert tokens.grid == (height // patch, width // patch)
    assert model.decode(tokens).shape == images.shape


def test_encoder_keeps_raster_order() -> None:
    """Changing one pixel changes only the features of its own patch in the stem: token i is patch i."""
    encoder = ConvEncoder(Facts(), patch_size=4, dim=8, depth=0)
    images = torch.zeros(1, 3, 8, 12)
    base = encoder(images)
    images[0, :, 4, 8] = 1.0  # row 1, column 2 of the 2×3 grid → raster index 5
    changed = (encoder(images) - base).abs().sum(-1)[0]  # (N,)
    assert changed.argmax().item() == 5 and changed.count_nonzero().item() == 1


def test_trains_a_few_steps(tmp_path) -> None:
    spec = PipelineSpec.compose(encoder="conv", filter="threshold", options={**SMALL, "filter.bits_above": 0.5})
    config = TrainConfig(steps=5, batch_size=4, crop=16, warmup=1, eval_data="", checkpoint_every=5, threads=1)
    result = train(spec, config, "builtin:photos", tmp_path / "run", progress=False)
    assert result.steps == 5
    model = Tokenizer.from_pretrained(tmp_path / "run" / "final")
    assert model.spec.encoder.name == "conv" and model.spec.filter.name == "threshold"
    images = torch.rand(2, 3, 16, 16)
    assert model.decode(model.encode(images)).shape == images.shape


# -- the filter's guarantees -------------------------------------------------------------------

bits_rows = st.integers(1, 4).flatmap(
    lambda b: st.integers(1, 40).flatmap(
        lambda n: st.lists(
            st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 8.0]) | st.floats(0, 16, width=32),
                     min_size=n, max_size=n),
            min_size=b, max_size=b,
        )
    )
)


def make_filter(bits_above: float, min_keep: int, max_keep: int) -> ThresholdFilter:
    return ThresholdFilter(Facts(), bits_above=bits_above, min_keep=min_keep, max_keep=max_keep)


@settings(max_examples=200, deadline=None)
@given(rows=bits_rows, bits_above=st.sampled_from([0.0, 0.5, 1.0, 2.0, 100.0]),
       min_keep=st.integers(0, 6), extra=st.integers(0, 6) | st.just(-1))
def test_threshold_guarantees(rows: list[list[float]], bits_above: float, min_keep: int, extra: int) -> None:
    max_keep = -1 if extra == -1 else min_keep + extra
    bits = torch.tensor(rows, dtype=torch.float32)  # (B, N)
    selection = make_filter(bits_above, min_keep, max_keep).select(bits)
    n = bits.shape[1]
    upper = n if max_keep == -1 else min(max_keep, n)
    above = bits > bits_above
    for b in range(bits.shape[0]):
        keep, h, count = selection.keep[b], bits[b], int(above[b].sum())
        k = int(keep.sum())
        # bounds: min_keep ≤ k ≤ max_keep (both capped by N)
        assert min(min_keep, upper) <= k <= upper
        # unclamped, the mask is exactly bits > bits_above; otherwise the clamp decides k
        assert k == min(max(count, min(min_keep, upper)), upper)
        if k == count:
            assert torch.equal(keep, above[b])
        elif k > count:  # topped up to min_keep: everything above the threshold is kept
            assert bool(keep[above[b]].all())
        else:  # capped by max_keep: only tokens above the threshold are kept
            assert bool(above[b][keep].all())
        # dominance: every kept token has at least the bits of every dropped one
        if 0 < k < n:
            assert float(h[keep].min()) >= float(h[~keep].max())
    # packed form agrees with the mask
    assert torch.equal(selection.lengths, selection.keep.sum(1))
    assert selection.cu_seqlens[-1].item() == selection.index.numel()


def test_threshold_ignores_tau_and_rows_are_independent() -> None:
    bits = torch.tensor([[0.0, 2.0, 0.5, 3.0], [5.0, 5.0, 5.0, 5.0]])
    flt = make_filter(1.0, 0, -1)
    selection = flt.select(bits)
    assert selection.keep.tolist() == [[False, True, False, True], [True, True, True, True]]
    assert flt.select(bits, tau=0.1).equal(selection)
    assert flt.select(bits[:1]).keep.tolist() == [[False, True, False, True]]


def test_threshold_ties_at_the_cap_go_to_the_smaller_position() -> None:
    selection = make_filter(1.0, 0, 2).select(torch.tensor([[2.0, 3.0, 2.0, 2.0]]))
    assert selection.keep.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize(
    "bits",
    [torch.tensor([[1.0, float("nan")]]), torch.tensor([[1.0, float("inf")]]), torch.tensor([[1.0, -0.5]]),
     torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]])],
)
def test_threshold_rejects_bad_bits(bits: torch.Tensor) -> None:
    with pytest.raises(FilterInputError):
        make_filter(1.0, 0, -1).select(bits)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"bits_above": float("nan")}, "bits_above"), ({"bits_above": -1.0}, "bits_above"),
     ({"min_keep": 3, "max_keep": 2}, "must not exceed"), ({"min_keep": -1}, "min_keep")],
)
def test_threshold_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises((ValueError, FilterInputError), match=message):
        ThresholdFilter(Facts(), **options)
