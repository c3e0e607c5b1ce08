"""Autoregressive priors: sequence format, valid sampling, KV-cache exactness, training, persistence, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import tatok_plugins.generator as generator_module
from tatok_cli.main import cli
from tatok_core.contract.errors import GenerationError
from tatok_core.workflows.generation import (
    build_generator,
    dataset_facts,
    generator_facts,
    load_prior,
    nll_bits_per_image,
    sample,
    save_prior,
    train_prior,
)
from tatok_core.contract.interfaces import PIPELINE_KINDS
from tatok_core.contract.registry import get_registry
from tatok_core.contract.selection import Selection
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.contract.tokens import Tokens
from tatok_plugins.generator import StepSequence
from tatok_plugins.layers import Transformer
from tests.helpers import small_spec

FACTORS, NUM_GLOBAL, GRID, PATCH = (3, 4), 2, (3, 3), 4
CODEBOOK = math.prod(FACTORS)
TINY = {"width": 16, "depth": 1, "heads": 2}
GENERATORS = ("adaptive", "raster", "context")
TINY_OPTIONS = {"adaptive": TINY, "raster": TINY, "context": {"width": 16, "rings": 1, "depth": 1}}


def tiny_prior(name: str, seed: int = 0, std: float | None = None, **options) -> torch.nn.Module:
    """An untrained prior; ``std`` re-draws every weight so that its distributions are far from uniform."""
    torch.manual_seed(seed)
    prior = build_generator(name, generator_facts(FACTORS, NUM_GLOBAL, GRID, PATCH), **{**TINY_OPTIONS[name], **options})
    if std is not None:
        with torch.no_grad():
            for p in prior.parameters():
                p.normal_(0, std)
    return prior.eval()


def random_tokens(gen: torch.Generator, batch: int, grid=GRID, keep: float = 0.5) -> Tokens:
    mask = torch.rand(batch, grid[0] * grid[1], generator=gen) < keep  # (B, N)
    sel = Selection.from_mask(mask)
    return Tokens(
        global_codes=torch.randint(CODEBOOK, (batch, NUM_GLOBAL), generator=gen),
        codes=torch.randint(CODEBOOK, (sel.index.numel(),), generator=gen),
        positions=sel.index,
        cu_seqlens=sel.cu_seqlens,
        grid=grid,
        image_size=(grid[0] * PATCH, grid[1] * PATCH),
    )


def assert_valid(tokens: Tokens, n: int, grid: tuple[int, int]) -> None:
    num = grid[0] * grid[1]
    assert tokens.batch_size == n and tokens.grid == grid
    assert tokens.global_codes.shape == (n, NUM_GLOBAL)
    assert int(tokens.cu_seqlens[0]) == 0 and int(tokens.cu_seqlens[-1]) == tokens.codes.numel()
    for image in tokens.per_image():
        assert image.codes.numel() <= num
        assert bool((image.positions[1:] > image.positions[:-1]).all()), image.positions
        assert bool(((image.positions >= 0) & (image.positions < num)).all())
        for codes in (image.codes, image.global_codes):
            assert bool(((codes >= 0) & (codes < CODEBOOK)).all())


def write_set(path: Path, tokens: Tokens) -> TokenDataset:
    meta = {"codebook_size": CODEBOOK, "code_factors": list(FACTORS), "num_global": NUM_GLOBAL, "patch_size": PATCH}
    with TokenWriter(path, spec_digest="0123456789abcdef", tokenizer="test", meta=meta) as writer:
        writer.write(tokens, [(f"{i}.png", 1) for i in range(tokens.batch_size)])
    return TokenDataset(path)


def learnable_tokens(batch: int, keep: float) -> Tokens:
    """Tokens with structure a prior can learn quickly: each code is a function of its position."""
    tokens = random_tokens(torch.Generator().manual_seed(1), batch, keep=keep)
    return Tokens(
        global_codes=torch.tensor([[1, 7]]).repeat(batch, 1),
        codes=(tokens.positions * 5) % CODEBOOK,
        positions=tokens.positions,
        cu_seqlens=tokens.cu_seqlens,
        grid=tokens.grid,
        image_size=tokens.image_size,
    )


def test_registry_lists_the_generators() -> None:
    registry = get_registry()
    assert set(registry.names("generator")) >= set(GENERATORS)
    assert registry.entry("generator", "adaptive").provider.package == "tatok"
    assert "generator" not in PIPELINE_KINDS


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), keep=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       grid=st.tuples(st.integers(1, 4), st.integers(1, 4)))
@settings(max_examples=30, deadline=None)
def test_step_sequence_round_trips(seed: int, batch: int, keep: float, grid: tuple[int, int]) -> None:
    tokens = random_tokens(torch.Generator().manual_seed(seed), batch, grid, keep)
    steps = StepSequence.from_tokens(tokens)
    eos = grid[0] * grid[1]
    assert steps.positions.shape == (batch, int(tokens.lengths.max()) + 1)
    assert bool((steps.positions[:, -1] == eos).all())  # every image ends with EOS
    assert torch.equal(steps.kept.sum(1), tokens.lengths)  # kept steps come first, then EOS only
    assert bool((steps.positions[:, 1:] >= steps.positions[:, :-1]).all())
    assert steps.to_tokens().equal(tokens)


PRIORS = {(name, std): tiny_prior(name, std=std) for name in GENERATORS for std in (None, 1.0)}


@given(name=st.sampled_from(GENERATORS), peaked=st.booleans(), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6),
       temperature=st.floats(0.05, 5.0), top_k=st.integers(0, 6),
       grid=st.tuples(st.integers(1, 4), st.integers(1, 4)))
@settings(max_examples=40, deadline=None)
def test_samples_are_always_valid(name: str, peaked: bool, seed: int, n: int, temperature: float, top_k: int,
                                  grid: tuple[int, int]) -> None:
    prior = PRIORS[(name, 1.0 if peaked else None)]
    tokens = sample(prior, n, temperature=temperature, top_k=top_k, grid=grid, seed=seed)
    assert_valid(tokens, n, grid)
    if name == "raster":
        assert bool((tokens.lengths == grid[0] * grid[1]).all())
    assert tokens.equal(sample(prior, n, temperature=temperature, top_k=top_k, grid=grid, seed=seed))


def test_kv_cache_steps_match_the_full_causal_pass() -> None:
    torch.manual_seed(0)
    transformer = Transformer(16, 2, 2).eval()
    x = torch.randn(3, 7, 16)  # (B, L, D)
    full = transformer(x, causal=True)
    cache = transformer.new_cache(7)
    steps = [transformer(x[:, :3], causal=True, cache=cache)]  # a prefill, then one step at a time
    steps += [transformer(x[:, i : i + 1], causal=True, cache=cache) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    cache = transformer.new_cache(7)  # dropping rows keeps the others exact
    transformer(x[:, :4], causal=True, cache=cache)
    for layer in cache:
        layer.select(torch.tensor([True, False, True]))
    torch.testing.assert_close(transformer(x[[0, 2], 4:5], causal=True, cache=cache), full[[0, 2], 4:5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GENERATORS)
def test_sampler_logits_match_the_uncached_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Summed over every choice the KV-cache sampler made, log p(choice | its logits) equals the
    uncached teacher-forced log-likelihood of the result: each cached distribution is the model's."""
    prior = tiny_prior(name, std=0.5)
    chosen: list[torch.Tensor] = []
    draw = generator_module.draw

    def recording_draw(logits: torch.Tensor, temperature: float, top_k: int, rng: torch.Generator) -> torch.Tensor:
        index = draw(logits, temperature, top_k, rng)
        chosen.append(torch.log_softmax(logits.double(), -1).gather(-1, index[:, None]).sum())
        return index

    monkeypatch.setattr(generator_module, "draw", recording_draw)
    tokens = sample(prior, 6, seed=3)
    with torch.no_grad():
        uncached = prior.log_likelihood(tokens).double().sum()
    assert len(chosen) > NUM_GLOBAL * len(FACTORS)
    torch.testing.assert_close(torch.stack(chosen).sum(), uncached, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("name, keep", [("adaptive", 0.4), ("raster", 1.0), ("context", 0.4)])
def test_training_lowers_the_nll(name: str, keep: float, tmp_path: Path) -> None:
    dataset = write_set(tmp_path / "tokens", learnable_tokens(32, keep))
    prior = build_generator(name, dataset_facts(dataset), **TINY_OPTIONS[name])
    before = nll_bits_per_image(prior, dataset)
    result = train_prior(prior, dataset, steps=40, batch_size=16, lr=3e-3, warmup=5, log_every=10, progress=False)
    after = nll_bits_per_image(prior, dataset)
    assert after < 0.85 * before, (before, after)
    assert len(result.history) == 4 and result.history[-1]["bits_per_image"] < result.history[0]["bits_per_image"]


def test_save_and_load_give_the_same_prior(tmp_path: Path) -> None:
    prior = tiny_prior("adaptive", std=0.5)
    save_prior(prior, tmp_path / "prior", training={"steps": 0})
    loaded = load_prior(tmp_path / "prior")
    tokens = sample(prior, 4, seed=5)
    assert tokens.equal(sample(loaded, 4, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_likelihood(tokens), prior.log_likelihood(tokens))
    assert loaded.facts_in.values == prior.facts_in.values


def test_class_conditional_prior_needs_and_uses_labels() -> None:
    prior = tiny_prior("adaptive", std=0.5, num_classes=3)
    with pytest.raises(GenerationError, match="class-conditional"):
        sample(prior, 2)
    tokens = sample(prior, 3, labels=torch.tensor([0, 1, 2]), seed=1)
    assert_valid(tokens, 3, GRID)
    with torch.no_grad():
        by_label = [prior.log_likelihood(tokens, torch.full((3,), c)) for c in range(3)]
    assert not torch.allclose(by_label[0], by_label[1])


def test_raster_needs_complete_grids(tmp_path: Path) -> None:
    dataset = write_set(tmp_path / "tokens", learnable_tokens(4, 0.5))
    prior = build_generator("raster", dataset_facts(dataset), **TINY)
    with pytest.raises(GenerationError, match="filter 'all'"):
        nll_bits_per_image(prior, dataset)


def test_cli_trains_a_prior_and_samples_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer(small_spec(filter="dtf")).eval()
    tokenizer.save_pretrained(tmp_path / "model")
    tokens = tokenizer.encode(torch.rand(8, 3, 16, 16))
    meta = {"codebook_size": tokenizer.quantizer.codebook_size, "code_factors": list(tokenizer.quantizer.code_factors),
            "num_global": tokenizer.num_global, "patch_size": tokenizer.patch_size}
    with TokenWriter(tmp_path / "tokens", spec_digest=tokenizer.spec.digest(), tokenizer="model", meta=meta) as writer:
        writer.write(tokens, [(f"{i}.png", 1) for i in range(8)])
    runner = CliRunner()
    result = runner.invoke(cli, ["train-prior", str(tmp_path / "tokens"), "--out", str(tmp_path / "prior"), "--steps", "3",
                                 "--batch-size", "4", "--set", "width=16", "--set", "depth=1", "--set", "heads=2"])
    assert result.exit_code == 0, result.output
    assert "bits/image" in result.output
    out = tmp_path / "grid.png"
    result = runner.invoke(cli, ["sample", str(tmp_path / "prior"), "--model", str(tmp_path / "model"), "-n", "5",
                                 "-o", str(out), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (2 + 3 * (16 + 2), 2 + 2 * (16 + 2))  # 5 samples on a 3 × 2 sheet
    other = tmp_path / "other"
    Tokenizer(small_spec(filter="all")).save_pretrained(other)
    result = runner.invoke(cli, ["sample", str(tmp_path / "prior"), "--model", str(other), "-o", str(out)])
    assert result.exit_code == 1 and "pass that tokenizer with --model" in result.output


def test_early_stopping_keeps_the_weights_that_scored_best(tmp_path: Path) -> None:
    fit = write_set(tmp_path / "fit", random_tokens(torch.Generator().manual_seed(0), 8, keep=0.6))
    validation = write_set(tmp_path / "validation", random_tokens(torch.Generator().manual_seed(1), 8, keep=0.6))
    prior = build_generator("context", dataset_facts(fit), **TINY_OPTIONS["context"])
    result = train_prior(prior, fit, steps=60, batch_size=8, lr=3e-2, warmup=1, progress=False,
                         validation=validation, validate_every=10)
    scores = [check["bits_per_image"] for check in result.validation]
    assert [check["step"] for check in result.validation] == [10, 20, 30, 40, 50, 60]
    assert result.best_step == 10 * (1 + scores.index(min(scores)))
    assert nll_bits_per_image(prior, validation) == pytest.approx(min(scores), rel=1e-6)
    with pytest.raises(GenerationError, match="unconditional priors"):
        train_prior(prior, fit, steps=1, progress=False, validation=validation, labels=torch.zeros(8, dtype=torch.long))


def test_cli_trains_a_context_prior_with_early_stopping(tmp_path: Path) -> None:
    fit = write_set(tmp_path / "fit", random_tokens(torch.Generator().manual_seed(0), 8, keep=0.6))
    write_set(tmp_path / "validation", random_tokens(torch.Generator().manual_seed(1), 8, keep=0.6))
    result = CliRunner().invoke(cli, ["train-prior", str(fit.path), "--out", str(tmp_path / "prior"), "--generator",
                                      "context", "--steps", "3", "--batch-size", "4", "--set", "width=8",
                                      "--validation", str(tmp_path / "validation")])
    assert result.exit_code == 0, result.output
    assert "validation" in result.output
    training = json.loads((tmp_path / "prior" / "prior.json").read_text())["training"]
    assert training["best_step"] in (1, 2, 3) and training["validation_bits_per_image"] > 0
