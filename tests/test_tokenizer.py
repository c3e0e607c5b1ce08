"""The Tokenizer pipeline: shapes, variable lengths, packed/padded views, persistence, every composition."""

from __future__ import annotations

import itertools

import pytest
import torch

from tatok_core import Tokens
from tatok_core.contract.errors import TatokError, UnknownComponentError
from tatok_core.contract.interfaces import PIPELINE_KINDS
from tatok_core.contract.registry import get_registry
from tatok_core.pipeline.tokenizer import Tokenizer
from tests.helpers import small_spec


@pytest.fixture(scope="module")
def model() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(small_spec()).eval()


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(batch, 3, 4, 4, generator=g), size=(height, width), mode="bilinear")
    busy = torch.rand(batch, 3, height, width, generator=g)
    weight = torch.linspace(0, 1, batch).view(batch, 1, 1, 1)  # image 0 is smooth, the last is noise
    return (1 - weight) * smooth + weight * busy


@pytest.mark.parametrize(("height", "width"), [(32, 32), (16, 48), (30, 21), (4, 4), (5, 9)])
def test_encode_decode_shapes(model: Tokenizer, height: int, width: int) -> None:
    x = images(3, height, width)
    tokens = model.encode(x, tau=0.7)
    assert tokens.grid == model.grid_for(height, width)
    assert tokens.image_size == (height, width)
    assert tokens.global_codes.shape == (3, model.num_global)
    assert int(tokens.lengths.sum()) == tokens.codes.numel() == tokens.positions.numel()
    assert model.decode(tokens).shape == x.shape


def test_too_small_and_malformed_images_are_clear_errors(model: Tokenizer) -> None:
    with pytest.raises(TatokError, match="smaller than one 4×4 patch"):
        model.encode(torch.rand(1, 3, 3, 8))
    with pytest.raises(TatokError, match="1 channels but the encoder expects 3"):
        model.encode(torch.rand(1, 1, 8, 8))
    with pytest.raises(TatokError, match=r"\(B, C, H, W\)"):
        model.encode(torch.rand(3, 8, 8))


def test_each_image_gets_its_own_number_of_tokens() -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_spec(entropy="pixel")).eval()  # training-free bits: smooth images are cheap
    tokens = model.encode(images(4, 32, 32), tau=0.9)
    lengths = tokens.lengths.tolist()
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], lengths


def test_packed_padded_and_per_image_views_agree(model: Tokenizer) -> None:
    tokens = model.encode(images(4, 24, 24), tau=0.6)
    codes, positions, valid = tokens.to_padded()
    grid_codes, keep = tokens.to_grid()
    per_image = tokens.per_image()
    for b, image in enumerate(per_image):
        k = int(tokens.lengths[b])
        assert torch.equal(codes[b, :k], image.codes) and torch.equal(positions[b, :k], image.positions)
        assert valid[b].sum() == k and not valid[b, k:].any()
        assert torch.equal(keep[b].nonzero()[:, 0], image.positions)
        assert torch.equal(grid_codes[b, image.positions], image.codes)
        assert bool((image.positions[1:] > image.positions[:-1]).all())
    assert Tokens.from_images(per_image).equal(tokens)


def test_decode_of_encode_matches_forward(model: Tokenizer) -> None:
    x = images(2, 16, 16)
    with torch.no_grad():
        out = model(x, tau=0.8)
    tokens = model.encode(x, tau=0.8)
    assert torch.equal(tokens.keep_mask(), out.selection.keep)
    assert torch.allclose(model.decode(tokens), out.reconstruction.clamp(0, 1), atol=1e-6)


def test_filter_swap_for_one_call(model: Tokenizer) -> None:
    x = images(3, 16, 16)
    assert model.encode(x, filter="random", k=7).lengths.tolist() == [7, 7, 7]
    assert model.encode(x, filter="all").lengths.tolist() == [16, 16, 16]
    first = model.encode(x, filter="raster", k=3)
    assert first.positions.tolist() == [0, 1, 2] * 3
    assert model.filter.tau == 0.9  # the model's own filter is untouched
    with pytest.raises(UnknownComponentError, match="did you mean 'topk'"):
        model.encode(x, filter="top-k")


def test_save_and_load_pretrained_is_bit_identical(model: Tokenizer, tmp_path) -> None:
    model.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    x = images(3, 20, 28)
    assert loaded.spec == model.spec
    assert loaded.encode(x, tau=0.75).equal(model.encode(x, tau=0.75))
    tokens = model.encode(x, tau=0.75)
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))


def test_unknown_pretrained_name() -> None:
    with pytest.raises(UnknownComponentError, match="unknown pretrained tokenizer 'no-such-model'"):
        Tokenizer.from_pretrained("no-such-model")


def _combinations() -> list[dict[str, str]]:
    """Every combination of the built-in components (installed third-party plugins have their own tests)."""
    registry = get_registry()
    builtin = {kind: [e.name for e in registry.entries() if e.kind == kind and e.provider.package == "tatok"]
               for kind in PIPELINE_KINDS}
    return [dict(zip(PIPELINE_KINDS, names)) for names in itertools.product(*builtin.values())]


@pytest.mark.parametrize("names", _combinations(), ids=lambda n: "-".join(n.values()))
def test_every_builtin_combination_runs_forward_and_backward(names: dict[str, str]) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_spec(**names)).train()
    x = images(2, 12, 16)
    out = model(x)
    loss = out.losses["mse"] + out.losses["quantizer"] + out.losses["entropy"]
    loss.backward()
    assert out.reconstruction.shape == x.shape
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.eval()
    assert model.decode(model.encode(x)).shape == x.shape


def test_log_mse_is_the_mean_of_each_images_log_error() -> None:
    """The `log_mse` loss (mean PSNR's own): an image's share of the loss follows its relative error, so a
    badly decoded image (few tokens) does not outweigh a well decoded one the way it does under plain MSE."""
    torch.manual_seed(0)
    model = Tokenizer(small_spec(entropy="residual", decoder="packed")).train()
    x = images(2, 16, 16)
    out = model(x)
    per_image = (out.reconstruction - x).pow(2).flatten(1).mean(1)  # (B,)
    torch.testing.assert_close(out.losses["log_mse"], per_image.log().mean())
    torch.testing.assert_close(out.losses["mse"], per_image.mean())
    with torch.no_grad():  # the globals-only decode has its loss in both units too
        analysis = model.analyse(x)
    base = (analysis.base_reconstruction - x).pow(2).flatten(1).mean(1)  # (B,)
    torch.testing.assert_close(out.losses["globals_log_mse"], base.log().mean())
    torch.testing.assert_close(out.losses["globals"], base.mean())


def test_a_tau_means_tau_even_when_the_filter_ships_an_absolute_rule() -> None:
    """The shipped default uses the θ rule (bits): a τ handed to encode or the training step must not be
    read as θ = 0.9 bits (which keeps nearly everything)."""
    torch.manual_seed(0)
    per_image = Tokenizer(small_spec(filter="dtf")).eval()
    absolute = per_image.with_component("filter", "dtf", mode="theta", theta=1e9, min_keep=0)
    images = torch.rand(3, 3, 16, 16)
    for tau in (0.3, 0.9):
        assert torch.equal(absolute.encode(images, tau=tau).lengths, per_image.encode(images, tau=tau).lengths)
        assert torch.equal(absolute(images, tau=tau).selection.keep, per_image(images, tau=tau).selection.keep)
    assert int(absolute.encode(images).lengths.sum()) == 0  # without a τ, its own θ rule
