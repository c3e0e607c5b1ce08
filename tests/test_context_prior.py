"""The ``context`` prior: a proper code (probabilities sum to one), causal in raster order, learns from neighbours."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tatok_core.contract.errors import GenerationError
from tatok_core.contract.selection import Selection
from tatok_core.contract.tokens import Tokens
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.workflows.generation import build_generator, dataset_facts, generator_facts, nll_bits_per_image, train_prior
from tatok_plugins.context_prior import RasterStates, dense_grid, sparse_tokens


def peaked_prior(factors: tuple[int, ...], num_global: int, grid: tuple[int, int], seed: int = 0, **options):
    """An untrained prior whose weights are re-drawn so that its distributions are far from uniform."""
    torch.manual_seed(seed)
    prior = build_generator("context", generator_facts(factors, num_global, grid, 4), **{"width": 8, "rings": 1,
                                                                                          "depth": 1, **options})
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.7)
    return prior.eval()


def test_probabilities_of_every_token_set_sum_to_one() -> None:
    """Enumerating every token set of a 1×2 grid (each position dropped or one of 6 codes, one global):
    the prior is a proper distribution, so its bits are the length of a code that exists."""
    prior = peaked_prior((2, 3), 1, (1, 2))
    globals_, codes, kept = [], [], []
    for g, first, second in itertools.product(range(6), range(7), range(7)):  # 6 = dropped
        globals_.append([g])
        codes.append([first % 6, second % 6])
        kept.append([first < 6, second < 6])
    tokens = sparse_tokens(torch.tensor(globals_), torch.tensor(codes)[:, None], torch.tensor(kept)[:, None], (4, 8))
    with torch.no_grad():
        total = prior.log_likelihood(tokens).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), cols=st.integers(1, 5), data=st.data())
@settings(max_examples=25, deadline=None)
def test_a_position_reads_only_the_positions_before_it(seed: int, rows: int, cols: int, data: st.DataObject) -> None:
    prior = peaked_prior((3, 4), 2, (rows, cols), seed=seed % 4, rings=2, depth=2)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(12, (1, rows, cols), generator=gen)
    kept = torch.rand(1, rows, cols, generator=gen) < 0.6
    summary = torch.randn(1, 8, generator=gen)
    p = data.draw(st.integers(0, rows * cols - 1))
    changed_codes, changed_kept = codes.clone(), kept.clone()
    changed_codes.view(-1)[p] = (codes.view(-1)[p] + 1) % 12
    changed_kept.view(-1)[p] = ~kept.view(-1)[p]
    with torch.no_grad():
        before = prior.patch_states(codes, kept, summary).flatten(1, 2)  # (1, N, W)
        after = prior.patch_states(changed_codes, changed_kept, summary).flatten(1, 2)
    assert torch.equal(before[:, :p], after[:, :p])  # raster order: nothing before p sees it
    if p + 1 < rows * cols:
        assert not torch.equal(before[:, p + 1:], after[:, p + 1:])  # ... and what follows does


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), cols=st.integers(1, 7), rings=st.integers(1, 3),
       depth=st.integers(0, 3), batch=st.integers(1, 3))
@settings(max_examples=30, deadline=None)
def test_the_walk_builds_the_states_the_dense_layers_compute(seed: int, rows: int, cols: int, rings: int, depth: int,
                                                             batch: int) -> None:
    """The walk's position-by-position states (what the coder's probabilities come from) are the dense
    masked convolutions' (what training and the code length use), on any grid, reach and depth."""
    prior = peaked_prior((3, 4), 2, (rows, cols), seed=seed % 4, rings=rings, depth=depth)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(12, (batch, rows, cols), generator=gen)
    kept = torch.rand(batch, rows, cols, generator=gen) < 0.6
    summary = torch.randn(batch, 8, generator=gen)
    raster = RasterStates(prior, summary, (rows, cols))
    walked = torch.empty(batch, rows, cols, 8)
    with torch.no_grad():
        dense = prior.patch_states(codes, kept, summary)  # (B, H, W, 8)
        for row in range(rows):
            raster.start_row(row)
            for col in range(cols):
                walked[:, row, col] = raster.state(col)
                raster.place(col, codes[:, row, col], kept[:, row, col])
    torch.testing.assert_close(walked, dense, rtol=1e-5, atol=1e-5)


def test_dense_and_sparse_layouts_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 12, generator=gen) < 0.5
    selection = Selection.from_mask(mask)
    tokens = Tokens(torch.randint(12, (3, 2), generator=gen), torch.randint(12, (selection.index.numel(),), generator=gen),
                    selection.index, selection.cu_seqlens, (3, 4), (12, 16))
    codes, kept = dense_grid(tokens)
    assert torch.equal(kept.flatten(1), mask)
    assert sparse_tokens(tokens.global_codes, codes, kept, tokens.image_size).equal(tokens)


def test_labels_are_refused_by_name() -> None:
    prior = peaked_prior((3, 4), 2, (2, 2))
    tokens = sparse_tokens(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long),
                           torch.ones(1, 2, 2, dtype=torch.bool), (8, 8))
    with pytest.raises(GenerationError, match="context.*unconditional"):
        prior.log_likelihood(tokens, torch.tensor([0]))


def test_it_learns_what_the_neighbours_say(tmp_path: Path) -> None:
    """Each image one code everywhere (a different one per image): a prior reading its neighbours
    codes every position after the first for almost nothing, far under the uniform log2 V per code."""
    gen = torch.Generator().manual_seed(0)
    batch, grid, factors = 48, (4, 5), (4, 4)
    values = torch.randint(16, (batch, 1, 1), generator=gen)
    tokens = sparse_tokens(torch.randint(16, (batch, 1), generator=gen), values.expand(batch, *grid).clone(),
                           torch.ones(batch, *grid, dtype=torch.bool), (16, 20))
    meta = {"codebook_size": 16, "code_factors": list(factors), "num_global": 1, "patch_size": 4}
    with TokenWriter(tmp_path / "tokens", spec_digest="0123456789abcdef", tokenizer="test", meta=meta) as writer:
        writer.write(tokens, [(f"{i}.png", 0) for i in range(batch)])
    dataset = TokenDataset(tmp_path / "tokens")
    torch.manual_seed(0)
    prior = build_generator("context", dataset_facts(dataset), width=16, rings=1, depth=1)
    train_prior(prior, dataset, steps=150, batch_size=16, lr=1e-2, warmup=10, progress=False)
    uniform = (1 + grid[0] * grid[1]) * math.log2(16)  # globals and codes; the keep flags cost ~0 once learnt
    assert nll_bits_per_image(prior, dataset) < 0.3 * uniform
