"""The guarantees of DTF's absolute rules (θ per token, ε on the dropped information), as hypothesis
properties on the reference and on the Triton kernel (interpreter on CPU; compiled on CUDA when present).

Definitions (docs/concepts.md, tatok_core/ops/dtf/reference.py): π = bits descending, ties → smaller position;
θ: k* = #{h > θ}; ε: k* = min k with D_k = T − C_k ≤ ε·s on the fixed-point q (s = 2^(P−e));
k = clamp(k*, min_keep, min(max_keep, N)); keep π1…πk. Also: no token cap (N = 2^16 on the reference).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tatok_core.ops.dtf.reference import (
    epsilon_select,
    fixed_point,
    fixed_point_bits,
    row_scale,
    select_by_rule,
    theta_select,
    validate_bits,
)
from tatok_core.contract.errors import FilterInputError
from tatok_core.contract.selection import Selection
from tests.test_dtf_properties import BACKENDS, SETTINGS as PROPERTY_SETTINGS, check_structure, f32, kept_positions, rows_of, upper_of

try:
    from tatok_core.ops.dtf.triton_kernel import dtf_select_triton
except ImportError:  # pragma: no cover
    dtf_select_triton = None


SETTINGS = settings(PROPERTY_SETTINGS, max_examples=20)  # interpreter time: the suite's budget is small


def select(backend: str, bits, mode: str, value, min_keep=0, max_keep=None) -> Selection:
    if backend == "torch":
        return select_by_rule(bits, mode, value, min_keep, max_keep)
    if backend == "triton":
        return dtf_select_triton(bits, value, min_keep, max_keep, mode=mode)
    value = value.cuda() if isinstance(value, torch.Tensor) else value
    sel = dtf_select_triton(bits.cuda(), value, min_keep, max_keep, mode=mode)
    return Selection(keep=sel.keep.cpu(), lengths=sel.lengths.cpu(), cu_seqlens=sel.cu_seqlens.cpu(),
                     index=sel.index.cpu())


# thresholds: exact hits on tie levels (0.5, 1.0 …), zero, and continuous values over the bits' range
thetas = st.one_of(st.sampled_from([0.0, 0.125, 0.5, 1.0, 1.5, 3.0, 1e-30]), st.floats(0, 120, width=32))
epsilons = st.one_of(st.sampled_from([0.0, 0.25, 1.0, 2.0, 3.0, 10.0]), st.floats(0, 4000, width=32))


@st.composite
def cases(draw, mode: str, max_b: int = 6, max_n: int = 40, distinct: bool = False):
    """(bits (B, N) float32, threshold (float or (B,) tensor), min_keep, max_keep)."""
    b, n = draw(st.integers(1, max_b)), draw(st.integers(1, max_n))
    bits = torch.tensor([draw(rows_of(n, distinct)) for _ in range(b)], dtype=torch.float32).reshape(b, n)
    values = thetas if mode == "theta" else epsilons
    value = (torch.tensor([draw(values) for _ in range(b)], dtype=torch.float32) if draw(st.booleans())
             else draw(values))
    min_keep = draw(st.integers(0, n + 2))
    max_keep = draw(st.one_of(st.none(), st.integers(min_keep, n + 3)))
    return bits, value, min_keep, max_keep


def value_row(value, b: int) -> float:
    """float64(float32(value_b)): what every backend applies."""
    return float(value[b]) if isinstance(value, torch.Tensor) else f32(value)


def check_order_and_bounds(sel: Selection, bits: torch.Tensor, min_keep: int, max_keep) -> None:
    """Bounds, dominance (kept h ≥ dropped h, ties → smaller positions) and optimality, per row."""
    check_structure(sel, bits)
    n = bits.shape[1]
    for b in range(bits.shape[0]):
        kept, h = kept_positions(sel, b), bits[b].tolist()
        dropped = sorted(set(range(n)) - set(kept))
        assert min(min_keep, upper_of(n, max_keep)) <= len(kept) <= upper_of(n, max_keep)
        assert sorted((h[i] for i in kept), reverse=True) == sorted(h, reverse=True)[: len(kept)]  # optimality
        if kept and dropped:
            low = min(h[i] for i in kept)
            assert low >= max(h[i] for i in dropped)
            tied_dropped = [i for i in dropped if h[i] == low]
            if tied_dropped:
                assert max(i for i in kept if h[i] == low) < min(tied_dropped)


# ---------------------------------------------------------------------------------------------------
# θ: coverage, minimality, dominance, optimality, bounds
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases("theta"))
def test_theta_keeps_exactly_the_tokens_above_theta_within_bounds(backend, case):
    bits, theta, min_keep, max_keep = case
    sel = select(backend, bits, "theta", theta, min_keep, max_keep)
    check_order_and_bounds(sel, bits, min_keep, max_keep)
    upper = upper_of(bits.shape[1], max_keep)
    for b in range(bits.shape[0]):
        above = {i for i, x in enumerate(bits[b].tolist()) if x > value_row(theta, b)}
        kept = set(kept_positions(sel, b))
        assert len(kept) == min(max(len(above), min(min_keep, upper)), upper)
        if len(above) <= upper:  # coverage unless capped
            assert above <= kept
        if len(kept) > min_keep:  # minimality: nothing at or below θ unless the floor asks for it
            assert kept <= above


# ---------------------------------------------------------------------------------------------------
# ε: coverage (dropped ≤ ε), minimality (one fewer would drop more), optimality, dominance, bounds
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases("epsilon"))
def test_epsilon_drops_at_most_epsilon_with_the_fewest_tokens(backend, case):
    bits, eps, min_keep, max_keep = case
    sel = select(backend, bits, "epsilon", eps, min_keep, max_keep)
    check_order_and_bounds(sel, bits, min_keep, max_keep)
    h = validate_bits(bits)
    q_all, scale = fixed_point(h), row_scale(h)[:, 0]  # (B, N) int64, (B,) float64 2^(P−e)
    upper = upper_of(bits.shape[1], max_keep)
    for b in range(bits.shape[0]):
        q, kept = q_all[b].tolist(), kept_positions(sel, b)
        eps_scaled = value_row(eps, b) * float(scale[b])  # exact: a power of two
        dropped = sum(q) - sum(q[i] for i in kept)
        if len(kept) < upper or max_keep is None or max_keep >= bits.shape[1]:
            assert dropped <= eps_scaled, (b, dropped, eps_scaled)  # coverage, exact on q
            # … and on the bits themselves, up to the fixed-point rounding of each dropped token
            lost = sum(x for i, x in enumerate(bits[b].tolist()) if i not in set(kept))
            assert lost <= value_row(eps, b) + (bits.shape[1] - len(kept) + 1) / float(scale[b]) * 1.0001
        if len(kept) > min_keep:  # minimality: dropping the last kept token too would exceed ε
            assert dropped + min(q[i] for i in kept) > eps_scaled


# ---------------------------------------------------------------------------------------------------
# nesting, scale behaviour, permutation, independence, backend equality
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["theta", "epsilon"])
@SETTINGS
@given(data=st.data())
def test_nesting_larger_threshold_keeps_a_subset(backend, mode, data):
    bits, value, min_keep, max_keep = data.draw(cases(mode))
    bump = data.draw(st.floats(0, 1000, width=32))
    larger = value + bump if isinstance(value, torch.Tensor) else f32(f32(value) + bump)
    small = select(backend, bits, mode, larger, min_keep, max_keep)
    large = select(backend, bits, mode, value, min_keep, max_keep)
    assert bool((small.keep <= large.keep).all()), f"kept({mode} + {bump}) ⊆ kept({mode})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["theta", "epsilon"])
@SETTINGS
@given(data=st.data(), exponent=st.integers(-30, 30))
def test_scaling_bits_and_threshold_together_changes_nothing(backend, mode, data, exponent):
    """Bits in other units (h → c·h, c a power of two) with the threshold in the same units: same selection."""
    bits, value, min_keep, max_keep = data.draw(cases(mode))
    positive = bits[bits > 0]
    if positive.numel():
        assume(math.log2(float(positive.min())) + exponent > -125 and math.log2(float(positive.max())) + exponent < 120)
        assume(math.log2(float(positive.min())) > -125)
    v = value if isinstance(value, torch.Tensor) else torch.tensor(f32(value))
    assume(not bool(((v > 0) & (v * 2.0**exponent < 2.0**-125)).any()))  # no subnormal threshold
    a = select(backend, bits, mode, value, min_keep, max_keep)
    b = select(backend, bits * 2.0**exponent, mode, v * 2.0**exponent, min_keep, max_keep)
    assert a.equal(b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["theta", "epsilon"])
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_permuting_tokens_permutes_the_selection(backend, mode, data, seed):
    bits, value, min_keep, max_keep = data.draw(cases(mode, distinct=True))
    perm = torch.randperm(bits.shape[1], generator=torch.Generator().manual_seed(seed))
    base = select(backend, bits, mode, value, min_keep, max_keep)
    assert torch.equal(select(backend, bits[:, perm], mode, value, min_keep, max_keep).keep, base.keep[:, perm])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["theta", "epsilon"])
@SETTINGS
@given(data=st.data())
def test_rows_are_independent_and_backends_agree_bit_for_bit(backend, mode, data):
    bits, value, min_keep, max_keep = data.draw(cases(mode))
    value = value if isinstance(value, torch.Tensor) else torch.full((bits.shape[0],), f32(value))
    batch = select(backend, bits, mode, value, min_keep, max_keep)
    assert batch.equal(select_by_rule(bits, mode, value, min_keep, max_keep)), "backend differs from the reference"
    row = data.draw(st.integers(0, bits.shape[0] - 1))
    other = select(backend, torch.cat([bits.flip(0), bits[row : row + 1]]),
                   mode, torch.cat([value.flip(0), value[row : row + 1]]), min_keep, max_keep)
    assert torch.equal(other.keep[-1], batch.keep[row])


# ---------------------------------------------------------------------------------------------------
# bounds and the named ends
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ends_of_each_rule(backend):
    bits = torch.tensor([[0.0, 3.0, 0.0, 1.0, 1.0], [0.0] * 5, [2.0, 0.5, 0.25, 0.125, 0.0]])
    positive = (bits > 0).tolist()
    assert select(backend, bits, "theta", 0.0).keep.tolist() == positive  # θ = 0: every informative token
    assert select(backend, bits, "epsilon", 0.0).keep.tolist() == positive  # ε = 0: drop nothing informative
    assert select(backend, bits, "theta", 3.0, min_keep=2).lengths.tolist() == [2, 2, 2]  # θ ≥ max: the floor
    assert select(backend, bits, "epsilon", 5.0, min_keep=1).lengths.tolist() == [1, 1, 1]  # ε ≥ T: the floor
    assert select(backend, bits, "theta", 0.75, max_keep=2).lengths.tolist() == [2, 0, 1]  # the cap
    assert select(backend, bits, "epsilon", 1.0).positions(0).tolist() == [1, 3]  # drops one 1.0: the later one
    assert select(backend, bits, "epsilon", 0.4).positions(2).tolist() == [0, 1]  # drops 0.25 + 0.125 ≤ 0.4


def test_the_rules_are_named_functions_of_the_reference():
    bits = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) * 10
    assert theta_select(bits, 4.0, 1, 9).equal(select_by_rule(bits, "theta", 4.0, 1, 9))
    assert epsilon_select(bits, 12.0).equal(select_by_rule(bits, "epsilon", 12.0))


# ---------------------------------------------------------------------------------------------------
# bad input: one clear error, the same on every backend
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["theta", "epsilon"])
@pytest.mark.parametrize("value", [-1.0, -1e-30, math.nan, math.inf, -math.inf, "x", True])
def test_bad_thresholds_raise_naming_the_rule(backend, mode, value):
    bits = torch.rand(2, 5)
    for arg in (value, torch.tensor([0.5, value])) if isinstance(value, float) else (value,):
        with pytest.raises(FilterInputError, match=f"^{mode} must be a finite number ≥ 0") as got:
            select(backend, bits, mode, arg)
        with pytest.raises(FilterInputError) as ref:
            select_by_rule(bits, mode, arg)
        assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_mode_and_bad_bits_raise(backend):
    with pytest.raises(FilterInputError, match="mode must be one of tau, theta, epsilon"):
        select(backend, torch.rand(2, 4), "delta", 1.0)
    with pytest.raises(FilterInputError, match="finite and ≥ 0"):
        select(backend, torch.tensor([[1.0, math.nan]]), "epsilon", 1.0)


def test_negative_zero_threshold_is_zero():
    bits = torch.tensor([[0.0, 1.0, 2.0]])
    assert select_by_rule(bits, "theta", -0.0).equal(select_by_rule(bits, "theta", 0.0))


# ---------------------------------------------------------------------------------------------------
# no token cap: exact integer sums at any N
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [8192, 8193, 1 << 16, 1 << 20])
def test_precision_keeps_every_row_total_exact(n):
    p = fixed_point_bits(n)
    assert n * 2**p <= 2**53 and (p == 40 or n * 2 ** (p + 1) > 2**53)
    assert fixed_point_bits(8192) == 40  # unchanged up to the old cap: old token files re-encode the same


@pytest.mark.parametrize("mode, value", [("tau", 0.7), ("tau", 1.0), ("theta", 9.0), ("epsilon", 1e5)])
def test_two_to_the_sixteen_tokens(mode, value):
    """N = 2^16 on the reference: the definition holds exactly on q, sums stay exact (< 2^53)."""
    g = torch.Generator().manual_seed(3)
    bits = (torch.rand(2, 1 << 16, generator=g) * 20).round(decimals=1)  # many ties near round thresholds
    bits[1, : 1 << 15] = 2.0**-30  # far below the row maximum: q = 0 for most of them at P = 37
    sel = select_by_rule(bits, mode, value, min_keep=3)
    q = fixed_point(validate_bits(bits))  # (2, 65536)
    assert int(q.sum(1).max()) < 2**53
    order = torch.sort(bits, dim=1, descending=True, stable=True).indices
    for b in range(2):
        k = int(sel.lengths[b])
        assert torch.equal(sel.keep[b].nonzero().flatten(), order[b, :k].sort().values)  # the first k of π
        cum = torch.cumsum(q[b, order[b]], 0)  # C_1 … C_N
        total = int(cum[-1])
        if mode == "tau":
            threshold = total * f32(value)
            assert k == max(3, int((cum.double() < threshold).sum()) + (threshold > 0))
        elif mode == "theta":
            assert k == max(3, int((bits[b] > value).sum()))
        else:
            eps = value * float(row_scale(validate_bits(bits))[b, 0])
            assert k == max(3, int(((total - cum).double() > eps).sum()) + (total > eps))
