"""The ten DTF guarantees of docs/concepts.md, as hypothesis properties, on every backend.

Backends: ``torch`` is the reference :func:`tatok_core.ops.dtf.reference.dtf_select`; ``triton`` is the Triton kernel
(:func:`tatok_core.ops.dtf.triton_kernel.dtf_select_triton`) on CPU tensors through Triton's interpreter;
``triton-cuda`` is the same kernel compiled, on CUDA tensors (skipped without a GPU). Where a
guarantee is stated "exactly on q" (coverage, minimality, optimality, τ = 1) it is checked on the
fixed-point values q = :func:`tatok_core.ops.dtf.reference.fixed_point` (tokens below 2^-40 of the row max are empty).
Sizes are kept small (N ≤ 64, B ≤ 8) because the interpreter is slow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tatok_core.ops.dtf.reference import dtf_select, fixed_point, validate_bits
from tatok_core.contract.errors import FilterInputError
from tatok_core.contract.selection import Selection

try:
    from tatok_core.ops.dtf.triton_kernel import dtf_select_triton, triton_available
except ImportError:  # pragma: no cover
    dtf_select_triton, triton_available = None, lambda: False

BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            dtf_select_triton is None or not triton_available(),
            reason="the 'triton' package is not importable (pip install 'tatok[triton]')",
        ),
    ),
    pytest.param(  # the compiled kernel, on a CUDA machine (benchmarks/gpu_check.sh runs this file there)
        "triton-cuda",
        marks=pytest.mark.skipif(
            dtf_select_triton is None or not triton_available() or not torch.cuda.is_available(),
            reason="needs triton and a CUDA device",
        ),
    ),
]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def select(backend: str, bits, tau, min_keep=0, max_keep=None) -> Selection:
    if backend == "torch":
        return dtf_select(bits, tau, min_keep, max_keep)
    if backend == "triton":
        return dtf_select_triton(bits, tau, min_keep, max_keep)
    on_gpu = [x.cuda() if isinstance(x, torch.Tensor) else x for x in (bits, tau)]
    sel = dtf_select_triton(*on_gpu, min_keep, max_keep)
    assert sel.keep.is_cuda
    return Selection(keep=sel.keep.cpu(), lengths=sel.lengths.cpu(), cu_seqlens=sel.cu_seqlens.cpu(),
                     index=sel.index.cpu())  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------
def f32(x: float) -> float:
    return float(np.float32(x))


TIE_LEVELS = [0.0, 0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]
ROUND_TAUS = [0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 0.3, 0.9, 1 / 3]


@st.composite
def rows_of(draw, n: int, distinct: bool = False) -> list[float]:
    """One row of n non-negative float32 values: ties, zeros, spread exponents or continuous."""
    if distinct:
        vals = draw(st.lists(st.floats(2**-20, 2**20, width=32), min_size=n, max_size=n, unique=True))
        return vals
    kind = draw(st.sampled_from(["ties", "zeros", "spread", "continuous", "mixed"]))
    if kind == "ties":
        return draw(st.lists(st.sampled_from(TIE_LEVELS), min_size=n, max_size=n))
    if kind == "zeros":
        return [0.0] * n
    if kind == "spread":  # many binary orders of magnitude: exercises the 2^-40 cut of the fixed point
        exps = draw(st.lists(st.integers(-70, 20), min_size=n, max_size=n))
        mant = draw(st.lists(st.sampled_from([0.0, 1.0, 1.5, 1.75]), min_size=n, max_size=n))
        return [m * 2.0**e for m, e in zip(mant, exps)]
    if kind == "continuous":
        return draw(st.lists(st.floats(0, 100, width=32), min_size=n, max_size=n))
    return draw(
        st.lists(st.one_of(st.sampled_from(TIE_LEVELS), st.floats(0, 4, width=32)), min_size=n, max_size=n)
    )


taus = st.one_of(st.sampled_from(ROUND_TAUS), st.floats(0, 1, width=32))


@st.composite
def cases(draw, max_b: int = 8, max_n: int = 64, distinct: bool = False, per_row_tau: bool | None = None):
    """(bits (B, N) float32, tau (float or (B,) tensor), min_keep, max_keep)."""
    b = draw(st.integers(1, max_b))
    n = draw(st.one_of(st.just(1), st.integers(1, max_n)))
    bits = torch.tensor([draw(rows_of(n, distinct)) for _ in range(b)], dtype=torch.float32).reshape(b, n)
    if per_row_tau is None:
        per_row_tau = draw(st.booleans())
    tau = torch.tensor([draw(taus) for _ in range(b)], dtype=torch.float32) if per_row_tau else draw(taus)
    min_keep = draw(st.integers(0, n + 2))
    max_keep = draw(
        st.one_of(st.none(), st.just(min_keep), st.integers(min_keep, n + 3), st.integers(0, n + 3))
    )
    if max_keep is not None and max_keep < min_keep:
        max_keep = None
    return bits, tau, min_keep, max_keep


# ---------------------------------------------------------------------------------------------------
# helpers: everything in the q domain, exactly as the definition states it
# ---------------------------------------------------------------------------------------------------
def tau_row(tau, b: int) -> float:
    """float64(float32(τ_b)), the value every backend multiplies with."""
    return float(tau[b]) if isinstance(tau, torch.Tensor) else f32(tau)


def row_facts(q_all: torch.Tensor, tau, b: int):
    """(q row as python ints, T, threshold = float64(T)·float64(float32 τ)) for row b."""
    q = q_all[b].tolist()
    total = sum(q)
    return q, total, float(total) * tau_row(tau, b)


def kept_positions(sel: Selection, b: int) -> list[int]:
    return sel.keep[b].nonzero().flatten().tolist()


def check_structure(sel: Selection, bits: torch.Tensor) -> None:
    b, n = bits.shape
    assert sel.keep.shape == (b, n) and sel.keep.dtype == torch.bool
    assert sel.lengths.shape == (b,) and sel.lengths.dtype == torch.int64
    assert sel.cu_seqlens.shape == (b + 1,) and sel.cu_seqlens.dtype == torch.int32
    assert sel.index.dtype == torch.int64 and sel.index.dim() == 1
    assert sel.equal(Selection.from_mask(sel.keep.cpu())), "packed fields must agree with the mask"


def upper_of(n: int, max_keep) -> int:
    return n if max_keep is None else min(max_keep, n)


# ---------------------------------------------------------------------------------------------------
# 1–4, 9: coverage, minimality, optimality, dominance, bounds (one draw, all checks)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases())
def test_coverage_minimality_optimality_dominance_bounds(backend, case):
    bits, tau, min_keep, max_keep = case
    sel = select(backend, bits, tau, min_keep, max_keep)
    check_structure(sel, bits)
    n = bits.shape[1]
    upper = upper_of(n, max_keep)
    q_all = fixed_point(validate_bits(bits))  # (B, N) int64
    for b in range(bits.shape[0]):
        q, total, thr = row_facts(q_all, tau, b)
        kept = kept_positions(sel, b)
        dropped = sorted(set(range(n)) - set(kept))
        k = len(kept)
        assert int(sel.lengths[b]) == k
        c_k = sum(q[i] for i in kept)
        # 9. bounds
        assert min(min_keep, upper) <= k <= upper
        # 1. coverage (exact on q): C_k ≥ τ·T unless k was capped by max_keep
        if k < upper or max_keep is None or max_keep >= n:
            assert float(c_k) >= thr, (b, k, c_k, thr)
        # 2. minimality: C_{k−1} < τ·T whenever k > min_keep
        if k > min_keep:
            c_prev = c_k - min(q[i] for i in kept)  # the last of π1…πk has the smallest h, so smallest q
            assert float(c_prev) < thr, (b, k, c_prev, thr)
        # 3. optimality: no other k tokens hold more (on q, and on h)
        assert c_k == sum(sorted(q, reverse=True)[:k])
        h = bits[b].tolist()
        assert sorted((h[i] for i in kept), reverse=True) == sorted(h, reverse=True)[:k]
        # 4. dominance: every kept h ≥ every dropped h; ties broken towards smaller positions
        if kept and dropped:
            lo_kept = min(h[i] for i in kept)
            assert lo_kept >= max(h[i] for i in dropped)
            tied_dropped = [i for i in dropped if h[i] == lo_kept]
            tied_kept = [i for i in kept if h[i] == lo_kept]
            if tied_dropped:
                assert max(tied_kept) < min(tied_dropped), "ties must keep smaller positions first"


# ---------------------------------------------------------------------------------------------------
# 9. bounds at τ = 0 and τ = 1
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(per_row_tau=False))
def test_tau_zero_keeps_min_keep(backend, case):
    bits, _, min_keep, max_keep = case
    sel = select(backend, bits, 0.0, min_keep, max_keep)
    upper = upper_of(bits.shape[1], max_keep)
    assert sel.lengths.tolist() == [min(min_keep, upper)] * bits.shape[0]
    check_structure(sel, bits)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(per_row_tau=False))
def test_tau_one_keeps_every_informative_token(backend, case):
    bits, _, min_keep, max_keep = case
    sel = select(backend, bits, 1.0, min_keep, max_keep)
    n = bits.shape[1]
    upper = upper_of(n, max_keep)
    q = fixed_point(validate_bits(bits))
    for b in range(bits.shape[0]):
        positive = set((q[b] > 0).nonzero().flatten().tolist())
        kept = set(kept_positions(sel, b))
        # at τ = 1 the threshold is T, so k* = #{q > 0}; tokens with q > 0 are exactly the first k* of π
        k = len(kept)
        assert k == min(max(len(positive), min(min_keep, upper)), upper)
        if k >= len(positive):
            assert positive <= kept, "every token with q > 0 is kept (within bounds)"
        if k <= len(positive):
            assert kept <= positive, "no empty token is kept unless min_keep asks for it"


def test_tau_one_keeps_exactly_the_positive_tokens_without_bounds():
    bits = torch.tensor([[0.0, 3.0, 0.0, 1.0, 1.0], [0.0] * 5, [2.0, 0.5, 0.25, 0.125, 0.0]])
    for backend in ["torch"] + (["triton"] if dtf_select_triton is not None and triton_available() else []):
        # (triton-cuda is covered by the hypothesis version above)
        sel = select(backend, bits, 1.0)
        assert sel.keep.tolist() == (bits > 0).tolist()


# ---------------------------------------------------------------------------------------------------
# 5. nesting in τ
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(per_row_tau=True), data=st.data())
def test_nesting_in_tau(backend, case, data):
    bits, tau1, min_keep, max_keep = case
    bump = torch.tensor([data.draw(st.floats(0, 1, width=32)) for _ in range(bits.shape[0])])
    tau2 = torch.minimum(tau1 + bump * (1 - tau1), torch.ones(()))  # τ2 ≥ τ1 row by row, still ≤ 1
    assert bool((tau2 >= tau1).all())
    small = select(backend, bits, tau1, min_keep, max_keep)
    large = select(backend, bits, tau2, min_keep, max_keep)
    assert bool((small.keep <= large.keep).all()), "kept(τ1) ⊆ kept(τ2) for τ1 ≤ τ2"


# ---------------------------------------------------------------------------------------------------
# 6. equivariance under permutation (distinct values)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(distinct=True), seed=st.integers(0, 2**31 - 1))
def test_permutation_equivariance(backend, case, seed):
    bits, tau, min_keep, max_keep = case
    perm = torch.randperm(bits.shape[1], generator=torch.Generator().manual_seed(seed))
    base = select(backend, bits, tau, min_keep, max_keep)
    permuted = select(backend, bits[:, perm], tau, min_keep, max_keep)
    assert torch.equal(permuted.keep, base.keep[:, perm])
    assert torch.equal(permuted.lengths, base.lengths)


# ---------------------------------------------------------------------------------------------------
# 7. scale invariance (exact powers of two, no overflow or subnormals)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(), exponent=st.integers(-40, 40))
def test_scale_invariance(backend, case, exponent):
    bits, tau, min_keep, max_keep = case
    # keep every non-zero value and its scaled copy a normal float32 (2^-126 … 2^127): exact scaling
    nonzero = bits[bits > 0]
    if nonzero.numel():
        lo, hi = math.log2(float(nonzero.min())), math.log2(float(nonzero.max()))
        assume(lo + exponent > -125 and hi + exponent < 127 and lo > -125)
    scaled = bits * 2.0**exponent
    assert torch.equal(scaled / 2.0**exponent, bits)  # exact
    a = select(backend, bits, tau, min_keep, max_keep)
    b = select(backend, scaled, tau, min_keep, max_keep)
    assert a.equal(b)


# ---------------------------------------------------------------------------------------------------
# 8. independence: of the rest of the batch, and of the backend
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(per_row_tau=True), row=st.integers(0, 7))
def test_row_independent_of_batch(backend, case, row):
    bits, tau, min_keep, max_keep = case
    row = row % bits.shape[0]
    batch = select(backend, bits, tau, min_keep, max_keep)
    alone = select(backend, bits[row : row + 1], tau[row : row + 1], min_keep, max_keep)
    assert torch.equal(alone.keep[0], batch.keep[row])
    assert torch.equal(alone.index, batch.positions(row))
    # the same row inside a different batch (rows reversed, row duplicated)
    other = torch.cat([bits.flip(0), bits[row : row + 1]])
    other_tau = torch.cat([tau.flip(0), tau[row : row + 1]])
    again = select(backend, other, other_tau, min_keep, max_keep)
    assert torch.equal(again.keep[-1], batch.keep[row])


def by_definition(bits: torch.Tensor, tau, min_keep: int, max_keep) -> Selection:
    """The definition (docs/concepts.md) transcribed in plain Python (floats, ints, sorted), sharing no code with any
    backend: q_i = floor(h_i · 2^(40−e)) with max < 2^e, π by h descending then position, k* = #(C_k <
    float64(T)·float64(float32 τ)) + (threshold > 0), clamped to [min_keep, min(max_keep, N)]."""
    b, n = bits.shape
    keep = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        h = bits[row].tolist()
        e = math.frexp(max(h, default=0.0))[1]  # max = m·2^e with m in [0.5, 1): max < 2^e
        q = [math.floor(v * 2.0 ** (40 - e)) for v in h]
        order = sorted(range(n), key=lambda i: (-h[i], i))  # π: h descending, then smaller position
        threshold = float(sum(q)) * tau_row(tau, row)
        prefix, running = [], 0  # C_1 … C_N, exact integers
        for i in order:
            running += q[i]
            prefix.append(running)
        k = sum(c < threshold for c in prefix) + (threshold > 0)
        k = min(max(k, min(min_keep, upper_of(n, max_keep))), upper_of(n, max_keep))
        keep[row, order[:k]] = True
    return Selection.from_mask(keep)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases())
def test_backend_agrees_with_the_definition_bit_for_bit(backend, case):
    # every backend against the independent transcription (comparing the reference with itself cannot fail)
    bits, tau, min_keep, max_keep = case
    assert select(backend, bits, tau, min_keep, max_keep).equal(by_definition(bits, tau, min_keep, max_keep))


# ---------------------------------------------------------------------------------------------------
# edge cases named by the definition
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 17, 63])
def test_edge_cases(backend, n):
    zeros = torch.zeros(3, n)
    for tau in (0.0, 0.5, 1.0):
        sel = select(backend, zeros, tau)
        assert sel.lengths.tolist() == [0, 0, 0] and sel.index.numel() == 0
        sel = select(backend, zeros, tau, min_keep=2, max_keep=2)  # min_keep = max_keep: zeros still filled
        assert sel.lengths.tolist() == [min(2, n)] * 3
        assert sel.positions(1).tolist() == list(range(min(2, n)))  # ties → smaller positions first
    empty = select(backend, torch.zeros(0, n), 0.5)
    assert empty.keep.shape == (0, n) and empty.cu_seqlens.tolist() == [0] and empty.index.numel() == 0


# ---------------------------------------------------------------------------------------------------
# 10. bad input raises FilterInputError, identically on every backend
# ---------------------------------------------------------------------------------------------------
BAD_VALUES = [math.nan, math.inf, -math.inf, -1.0, -1e-30, -(2.0**-149)]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    case=cases(max_b=4, max_n=16, per_row_tau=False),
    bad=st.sampled_from(BAD_VALUES),
    where=st.tuples(st.integers(0, 3), st.integers(0, 15)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_bad_bits_raise(backend, case, bad, where, dtype):
    bits, tau, min_keep, max_keep = case
    bits = bits.to(dtype)
    bits[where[0] % bits.shape[0], where[1] % bits.shape[1]] = bad
    with pytest.raises(FilterInputError) as got:
        select(backend, bits, tau, min_keep, max_keep)
    with pytest.raises(FilterInputError) as ref:
        dtf_select(bits, tau, min_keep, max_keep)
    assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    tau=st.one_of(
        st.floats(1.001, 1e6), st.floats(-1e6, -1e-3), st.sampled_from([math.nan, math.inf, -math.inf])
    ),
    per_row=st.booleans(),
)
def test_bad_tau_raises(backend, tau, per_row):
    bits = torch.rand(3, 5)
    arg = torch.tensor([0.5, tau, 0.2]) if per_row else tau
    with pytest.raises(FilterInputError, match="tau"):
        select(backend, bits, arg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.rand(5), 0.5, 0, None), "shape"),
        (lambda: (torch.rand(2, 3, 4), 0.5, 0, None), "shape"),
        (lambda: (torch.randint(0, 3, (2, 4)), 0.5, 0, None), "floating"),
        (lambda: (torch.rand(2, 4).bool(), 0.5, 0, None), "floating"),
        (lambda: ([[0.5, 1.0]], 0.5, 0, None), "torch.Tensor"),
        (lambda: (torch.rand(2, 4), torch.rand(3), 0, None), "tau"),
        (lambda: (torch.rand(2, 4), torch.rand(2, 1), 0, None), "tau"),
        (lambda: (torch.rand(2, 4), "half", 0, None), "tau"),
        (lambda: (torch.rand(2, 4), True, 0, None), "tau"),
        (lambda: (torch.rand(2, 4), 0.5, 3, 2), "must not exceed"),
        (lambda: (torch.rand(2, 4), 0.5, -1, None), "min_keep"),
        (lambda: (torch.rand(2, 4), 0.5, 1.5, None), "min_keep"),
        (lambda: (torch.rand(2, 4), 0.5, True, None), "min_keep"),
        (lambda: (torch.rand(2, 4), 0.5, 0, -2), "max_keep"),
        (lambda: (torch.rand(2, 4), 0.5, 0, 2.0), "max_keep"),
    ],
)
def test_bad_shapes_types_and_bounds_raise(backend, make, match):
    bits, tau, min_keep, max_keep = make()
    with pytest.raises(FilterInputError, match=match) as got:
        select(backend, bits, tau, min_keep, max_keep)
    with pytest.raises(FilterInputError) as ref:
        dtf_select(bits, tau, min_keep, max_keep)
    assert str(got.value) == str(ref.value)
