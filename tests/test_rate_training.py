"""Rate–distortion training (``train.rate_worth``): the loss weighs the kept set's bits under a frozen coding prior."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
import torch

from tatok_core.contract.errors import SpecError
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.workflows.generation import build_generator, generator_facts, save_prior
from tatok_core.workflows.training import FINAL, TrainConfig, train
from tatok_plugins.context_prior import sparse_tokens
from tests.helpers import coding_prior, small_spec

SPEC = small_spec(entropy="chain", decoder="packed")


def coded_bpp(model: Tokenizer, prior, images: torch.Tensor) -> float:
    """Mean bits per pixel of ``images``' tokens (every token kept) under ``prior``."""
    with torch.no_grad():
        tokens = model.encode(images, filter="all", refine_steps=0)
        return float(-prior.log_likelihood(tokens).mean() / math.log(2)) / images[0, 0].numel()


def test_the_training_output_reports_the_kept_set_s_coded_rate() -> None:
    """``rate_bpp`` is the code length of the very set the decoder was trained on, per pixel: what a coder
    driven by the prior would write (the relaxed digits are the codes, one-hot, in the forward pass)."""
    torch.manual_seed(0)
    model = Tokenizer(SPEC).train()
    assert "rate_bpp" not in model(torch.rand(2, 3, 16, 16)).losses  # no prior attached: no rate
    prior = coding_prior(model)
    rated = model.with_coding_prior(prior).train()
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(3)
    out = rated(x)
    analysis = rated.analyse(x)
    keep = out.selection.keep.unflatten(1, analysis.grid)  # (B, H, W) the set the decoder was trained on
    kept = sparse_tokens(analysis.globals_.codes, analysis.patches.codes.unflatten(1, analysis.grid), keep,
                         analysis.image_size)  # that set as tokens, as a coder reads them
    with torch.no_grad():
        expected = float(-prior.log_likelihood(kept).mean() / math.log(2)) / (16 * 16)
    assert float(out.losses["rate_bpp"].detach()) == pytest.approx(expected, rel=1e-4)


def test_a_rate_needs_its_prior_and_log_units() -> None:
    with pytest.raises(SpecError, match=r"train.rate_worth = 60 needs train.rate_prior"):
        TrainConfig(rate_worth=60.0, reconstruction="log_mse")
    with pytest.raises(SpecError, match=r"train.rate_worth = 60 needs train.reconstruction = \"log_mse\", not 'mse'"):
        TrainConfig(rate_worth=60.0, rate_prior="somewhere")
    with pytest.raises(SpecError, match=r"train.rate_worth must be"):
        TrainConfig.from_dict({"rate_worth": -1.0})


def test_a_prior_that_cannot_serve_is_named_by_its_setting_before_a_step(tmp_path: Path) -> None:
    """A folder with no prior, or a prior of other codes, stops the run at start, naming the setting."""
    config = TrainConfig(steps=1, batch_size=2, crop=16, warmup=0, eval_data="", threads=1, reconstruction="log_mse",
                         rate_worth=10.0, rate_prior=str(tmp_path / "nowhere"))
    with pytest.raises(SpecError, match=r"train.rate_prior = '.*nowhere'"):
        train(SPEC, config, "builtin:photos", tmp_path / "run", progress=False)
    other = build_generator("context", generator_facts((8, 8), 4, (4, 4), 4), width=8, rings=1, depth=1)
    save_prior(other, tmp_path / "other")
    with pytest.raises(SpecError, match=r"train.rate_prior = '.*other': generator 'context' models "
                                        r"code_factors=\(8, 8\) but the tokenizer writes code_factors=\(5, 5, 5, 5\)"):
        train(SPEC, attrs.evolve(config, rate_prior=str(tmp_path / "other")), "builtin:photos", tmp_path / "run2",
              progress=False)


def test_training_with_a_rate_worth_makes_tokens_the_prior_codes_in_fewer_bits(tmp_path: Path) -> None:
    """The same run (seed, data, steps) with and without the rate term, from the same start: weighing the
    prior's bits, the encoder learns codes that prior writes in fewer bits on held-out crops."""
    torch.manual_seed(0)
    start = Tokenizer(SPEC)
    start.save_pretrained(tmp_path / "start")
    prior = coding_prior(start)
    save_prior(prior, tmp_path / "prior")
    held_out = fixed_crops(ImageSource("builtin:photos:heldout").images, 16, 16)
    rates = {}
    for worth in (0.0, 200.0):
        config = TrainConfig(steps=30, batch_size=8, crop=16, warmup=3, lr=3e-3, eval_data="", threads=1,
                             checkpoint_every=30, reconstruction="log_mse", init=str(tmp_path / "start"),
                             rate_worth=worth, rate_prior=str(tmp_path / "prior") if worth else "")
        result = train(SPEC, config, "builtin:photos", tmp_path / f"run-{worth:g}", progress=False)
        assert ("train_rate_bpp" in result.history[-1]) == bool(worth)  # the history records the term it trains
        trained = Tokenizer.from_pretrained(tmp_path / f"run-{worth:g}" / FINAL)
        rates[worth] = coded_bpp(trained, prior, held_out)
    assert rates[200.0] < 0.6 * rates[0.0], rates  # measured 0.37 against 1.18 bpp
