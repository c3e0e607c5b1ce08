"""A keep-aware encoder (``encoder.keep_aware``): kept tokens re-expressed once the kept set is known."""

from __future__ import annotations

import pytest
import torch

from tatok_core.contract.errors import SpecError
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.analysis import Analysed
from tests.helpers import small_spec


def spec(keep_aware: int):
    base = small_spec(entropy="chain", decoder="packed")
    return base.updated({}, {"encoder": {**base.encoder.options, "keep_aware": keep_aware}})


def models() -> tuple[Tokenizer, Tokenizer]:
    """(keep-blind, keep-aware) with the same weights where they share them."""
    torch.manual_seed(0)
    blind = Tokenizer(spec(0)).eval()
    aware = Tokenizer(spec(1)).eval()
    aware.load_state_dict(blind.state_dict())  # the keep blocks keep their start: weights saved without them load
    return blind, aware


def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 16, 24)  # a 4×6 grid of 4-px patches


def test_a_keep_aware_encoder_starts_as_the_keep_blind_one() -> None:
    blind, aware = models()
    x = images()
    for k in (0, 5, 24):
        plain, expressed = blind.encode(x, filter="topk", k=k), aware.encode(x, filter="topk", k=k)
        assert torch.equal(plain.codes, expressed.codes) and torch.equal(plain.positions, expressed.positions)
        assert torch.equal(blind.decode(plain), aware.decode(expressed))


def test_kept_tokens_depend_on_the_kept_set_and_every_path_gives_the_same_ones() -> None:
    _, aware = models()
    torch.manual_seed(2)
    torch.nn.init.normal_(aware.encoder.keep_state, std=1.0)  # a trained encoder: the set matters
    torch.nn.init.normal_(aware.encoder.keep_out.weight, std=0.2)
    x = images()
    with torch.no_grad():
        analysis = aware.analyse(x)
        few, many = (aware.token_filter("topk", k=k).select(analysis.entropy.bits).keep for k in (3, 12))  # (B, N)
        features = analysis.sources.patch_features  # (B, N, D)
        fewer, more = (aware.encoder.given_keep(features, keep, analysis.grid) for keep in (few, many))
    assert (fewer - more)[few].abs().amax() > 1e-3  # the same kept positions, another set (rounding: 1e-7)

    encoded = aware.encode(x, filter="topk", k=12)
    analysed = Analysed.of(aware, x)  # what every rate workflow decodes
    selection = aware.token_filter("topk", k=12).select(analysed.bits)
    assert torch.equal(analysed.tokens(selection).codes, encoded.codes)
    codes, kept = encoded.to_grid(fill=0)  # (B, N) each
    assert not torch.equal(analysed.patch_codes[kept], codes[kept])  # not the codes analysed blind to the set

    with torch.no_grad():  # the chain estimator's probe decodes see the tokens that set would carry
        context = aware.entropy_context(analysis.images, analysis.grid, analysis.globals_.vectors,
                                        analysis.globals_.codes, analysis.patches.vectors, analysis.patches.codes,
                                        analysis.sources.patch_features)
        probe = context.decode(selection.keep).clamp(0, 1)
    torch.testing.assert_close(probe, aware.decode(encoded), rtol=0, atol=1e-5)


def test_training_decodes_the_re_expressed_tokens() -> None:
    _, aware = models()
    aware.train()
    aware(images()).losses["log_mse"].backward()
    gradient = aware.encoder.keep_out.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


@pytest.mark.parametrize(("value", "message"), [
    (-1, "encoder 'vit': keep_aware is a number of blocks ≥ 0, got -1"),
    (True, "encoder.keep_aware=True: encoder 'vit' takes an int for 'keep_aware'"),
    (1.5, "encoder.keep_aware=1.5: encoder 'vit' takes an int for 'keep_aware'"),
])
def test_keep_aware_is_a_number_of_blocks(value: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Tokenizer(spec(value))  # type: ignore[arg-type]
