"""The built-in filters: DTF dispatch across backends and the fixed-count baselines."""

from __future__ import annotations

import pytest
import torch

from tatok_core import Facts, FilterInputError
from tatok_core.ops.dtf.reference import dtf_select, select_by_rule
from tatok_plugins.filters import DynamicTokenFilter, KeepAll, RandomKFilter, RasterKFilter, TopKFilter

NO_FACTS = Facts()


def bits(batch: int = 6, n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 5, (batch, n), generator=g).float()  # many ties
    values[0] = 0.0  # an empty row
    return values


@pytest.mark.parametrize(("backend", "runs"), [("torch", "reference"), ("triton", "kernel"), ("auto", "reference")])
def test_dtf_backends_dispatch_and_agree_exactly(backend: str, runs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # which implementation ran is the behaviour under test: on CPU tensors "auto" must pick the reference
    # (the values of the reference itself are held to the definition in test_dtf_properties.py)
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton backend needs the 'triton' package")
    import tatok_core.ops.dtf.triton_kernel as kernel
    import tatok_core.ops.dtf.backends as backends

    ran: list[str] = []
    monkeypatch.setattr(backends, "select_by_rule", lambda *a: ran.append("reference") or select_by_rule(*a))
    real_kernel = kernel.dtf_select_triton
    monkeypatch.setattr(kernel, "dtf_select_triton", lambda *a, **k: ran.append("kernel") or real_kernel(*a, **k))
    h = bits()
    tau = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0, 0.75])
    chosen = DynamicTokenFilter(NO_FACTS, min_keep=2, max_keep=30, backend=backend).select(h, tau)
    assert ran == [runs]
    assert chosen.equal(dtf_select(h, tau, min_keep=2, max_keep=30))


def test_dtf_default_tau_and_override() -> None:
    h = bits()
    dtf = DynamicTokenFilter(NO_FACTS, tau=0.5, min_keep=0)
    assert dtf.select(h).equal(dtf_select(h, 0.5))
    assert dtf.select(h, 0.8).equal(dtf_select(h, 0.8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("mode", "default", "override"), [("theta", 2.0, 3.5), ("epsilon", 20.0, 7.0)])
def test_dtf_absolute_modes_use_their_own_threshold(backend: str, mode: str, default: float, override: float) -> None:
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton backend needs the 'triton' package")
    h = bits()
    dtf = DynamicTokenFilter(NO_FACTS, mode=mode, **{mode: default}, min_keep=1, max_keep=30, backend=backend)
    assert dtf.threshold == default
    assert dtf.select(h).equal(select_by_rule(h, mode, default, 1, 30))
    assert dtf.select(h, override).equal(select_by_rule(h, mode, override, 1, 30))  # the call's value is θ / ε


def test_dtf_bad_options_and_inputs() -> None:
    with pytest.raises(ValueError, match="mode must be one of tau, theta, epsilon"):
        DynamicTokenFilter(NO_FACTS, mode="delta")
    with pytest.raises(ValueError, match="theta must be a finite number"):
        DynamicTokenFilter(NO_FACTS, mode="theta", theta=-1.0)
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        DynamicTokenFilter(NO_FACTS, epsilon=float("inf"))
    with pytest.raises(ValueError, match="tau must be a number in"):
        DynamicTokenFilter(NO_FACTS, tau=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        DynamicTokenFilter(NO_FACTS, backend="cuda")
    with pytest.raises(FilterInputError, match="min_keep .* must not exceed max_keep"):
        DynamicTokenFilter(NO_FACTS, min_keep=5, max_keep=2)
    with pytest.raises(FilterInputError, match="finite"):
        DynamicTokenFilter(NO_FACTS).select(torch.tensor([[1.0, float("nan")]]))


def test_keep_all() -> None:
    selection = KeepAll(NO_FACTS).select(bits(3, 7))
    assert selection.keep.all() and selection.lengths.tolist() == [7, 7, 7]
    assert selection.cu_seqlens.tolist() == [0, 7, 14, 21]


def test_topk_keeps_the_highest_bits_ties_to_smaller_position() -> None:
    h = torch.tensor([[1.0, 3.0, 3.0, 0.5, 2.0]])
    assert TopKFilter(NO_FACTS, k=2).select(h).index.tolist() == [1, 2]
    assert TopKFilter(NO_FACTS, k=3).select(h).index.tolist() == [1, 2, 4]
    assert TopKFilter(NO_FACTS, k=10).select(h).lengths.tolist() == [5]  # clamped to N


def test_raster_keeps_the_first_k() -> None:
    assert RasterKFilter(NO_FACTS, k=3).select(bits(2, 9)).index.tolist() == [0, 1, 2, 0, 1, 2]


def test_random_is_seeded_and_fixed_count() -> None:
    h = bits(4, 50)
    first = RandomKFilter(NO_FACTS, k=12, seed=3).select(h)
    assert first.lengths.tolist() == [12] * 4
    assert first.equal(RandomKFilter(NO_FACTS, k=12, seed=3).select(h))
    assert not first.equal(RandomKFilter(NO_FACTS, k=12, seed=4).select(h))
    assert not torch.equal(first.keep[0], first.keep[1])  # rows differ


def test_fixed_count_bounds() -> None:
    h = bits(2, 10)
    assert TopKFilter(NO_FACTS, k=1, min_keep=4).select(h).lengths.tolist() == [4, 4]
    assert TopKFilter(NO_FACTS, k=8, max_keep=5).select(h).lengths.tolist() == [5, 5]
    with pytest.raises(ValueError, match="k must be an integer ≥ 0"):
        TopKFilter(NO_FACTS, k=-1)
