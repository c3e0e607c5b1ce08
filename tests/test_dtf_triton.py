"""The Triton DTF kernel equals the reference exactly: keep, lengths, cu_seqlens and index, bit for bit.

Every test runs on CPU tensors (Triton's interpreter) and, where CUDA is available, on CUDA tensors (the
compiled kernel) — the same tests, so a GPU machine checks the compiled code with no extra flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tatok_core.ops.dtf.reference import MODES, dtf_select, fixed_point_bits, select_by_rule
from tatok_core.contract.errors import FilterInputError, TatokError

dtf_triton = pytest.importorskip("tatok_core.ops.dtf.triton_kernel")
if not dtf_triton.triton_available():  # pragma: no cover
    pytest.skip("the 'triton' package is not importable (pip install 'tatok[triton]')", allow_module_level=True)
dtf_select_triton = dtf_triton.dtf_select_triton

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
SIZES = [1, 3, 17, 64, 100, 256]


def assert_same(got, ref, what: str = "") -> None:
    """Field-by-field exact equality, naming the first differing row."""
    for field in ("keep", "lengths", "cu_seqlens", "index"):
        a, b = getattr(got, field).cpu(), getattr(ref, field).cpu()
        assert a.dtype == b.dtype, f"{what}: {field} dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{what}: {field} shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not torch.equal(a, b):
            if field in ("keep", "lengths"):
                rows = (a != b).reshape(a.shape[0], -1).any(1).nonzero().flatten().tolist()
                raise AssertionError(f"{what}: {field} differs in rows {rows[:10]} ({len(rows)} rows)")
            raise AssertionError(f"{what}: {field} differs")


def random_rows(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits (B, N) float32, tau (B,) float32) mixing ties, zeros, wide ranges and near-threshold rows."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 7, (batch, 1), generator=g)
    levels = torch.randint(2, 9, (batch, 1), generator=g)
    quant = torch.randint(0, 9, (batch, n), generator=g).remainder(levels).float() * 0.125  # many ties
    cont = torch.rand(batch, n, generator=g) * 2.0 ** torch.randint(-20, 20, (batch, 1), generator=g).float()
    sparse = torch.where(torch.rand(batch, n, generator=g) < 0.1, torch.rand(batch, n, generator=g), 0.0)
    wide = torch.rand(batch, n, generator=g) * 2.0 ** torch.randint(-80, 10, (batch, n), generator=g).float()
    same = torch.full((batch, n), 0.1) * torch.randint(1, 4, (batch, 1), generator=g)  # float near-ties
    zeros = torch.zeros(batch, n)
    halves = torch.randint(0, 2, (batch, n), generator=g).float()  # 0/1 rows: C_k hits τ·T exactly
    bits = torch.stack([quant, cont, sparse, wide, same, zeros, halves])  # (7, B, N)
    bits = torch.gather(bits, 0, kind[None].expand(1, batch, n))[0]  # (B, N) one kind per row

    tau_kind = torch.randint(0, 5, (batch,), generator=g)
    round_tau = torch.randint(0, 9, (batch,), generator=g).float() / 8  # 0, 1/8, …, 1: exact hits
    over_n = torch.randint(0, n + 1, (batch,), generator=g).float() / n  # j/N: near-threshold on equal rows
    rand_tau = torch.rand(batch, generator=g)
    ends = torch.randint(0, 2, (batch,), generator=g).float()  # τ ∈ {0, 1}
    decimal = torch.tensor([0.1, 0.3, 0.7, 0.9])[torch.randint(0, 4, (batch,), generator=g)]
    tau = torch.stack([round_tau, over_n, rand_tau, ends, decimal]).gather(0, tau_kind[None])[0]
    return bits.contiguous(), tau.to(torch.float32)


BOUNDS = [(0, None), (2, 5), (3, 3), (0, 1), (7, None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
def test_thousands_of_random_rows_match_reference(device, n):
    bits, tau = random_rows(640, n, seed=n)  # 640 rows × 5 bound settings per size
    for min_keep, max_keep in BOUNDS:
        ref = dtf_select(bits, tau, min_keep, max_keep)
        got = dtf_select_triton(bits.to(device), tau.to(device), min_keep, max_keep)
        assert_same(got, ref, f"N={n} bounds=({min_keep}, {max_keep})")
        assert got.keep.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_tau_zero_and_one(device, tau):
    bits, _ = random_rows(256, 64, seed=7)
    for min_keep, max_keep in BOUNDS:
        assert_same(
            dtf_select_triton(bits.to(device), tau, min_keep, max_keep),
            dtf_select(bits, tau, min_keep, max_keep),
            f"tau={tau}",
        )


@pytest.mark.parametrize("device", DEVICES)
def test_adversarial_float_sums(device):
    """float64 prefix sums disagree across backends here ([1] + [2^-60]·1023, τ = 1: k = 1 vs 769)."""
    rows = torch.tensor(
        [
            [1.0] + [2.0**-60] * 1023,  # 2^-60 < 2^-40 of the max: q = 0, so k = 1 exactly
            [1.0] + [2.0**-39] * 1023,  # q = 1 each: every token counts, k = 1024
            [2.0**-60] * 1023 + [1.0],  # the big one last: tie order and position keys
            [0.1] * 1024,  # C_k = k·q: thresholds land exactly on partial sums
        ]
    )
    for tau in (1.0, 0.5, 0.3, 0.999):
        ref = dtf_select(rows, tau)
        got = dtf_select_triton(rows.to(device), tau)
        assert_same(got, ref, f"adversarial tau={tau}")
    assert dtf_select_triton(rows[:1].to(device), 1.0).lengths.tolist() == [1]
    assert dtf_select_triton(rows[1:2].to(device), 1.0).lengths.tolist() == [1024]


@pytest.mark.parametrize("device", DEVICES)
def test_float_near_threshold_ties(device):
    """Equal values and decimal τ: the threshold sits within one ulp of a partial sum."""
    n = 100
    counts = torch.arange(1, n + 1)
    bits = (torch.arange(n)[None, :] < counts[:, None]).float() * 0.1  # row r: r+1 tokens of 0.1
    for tau in (0.1, 0.2, 0.3, 0.7, 1 / 3, 2 / 3):
        taus = torch.full((n,), tau)
        assert_same(dtf_select_triton(bits.to(device), taus.to(device)), dtf_select(bits, taus), f"tau={tau}")


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_tau_and_edge_shapes(device):
    for b, n in [(0, 5), (4, 0), (1, 1), (5, 1), (3, 3), (2, 33)]:
        bits, tau = random_rows(b, max(n, 1), seed=b * 100 + n)
        bits = bits[:, :n].contiguous()
        for min_keep, max_keep in [(0, None), (1, 1), (n + 2, None), (0, 0)]:
            assert_same(
                dtf_select_triton(bits.to(device), tau.to(device), min_keep, max_keep),
                dtf_select(bits, tau, min_keep, max_keep),
                f"B={b} N={n}",
            )


@pytest.mark.parametrize("device", DEVICES)
def test_input_layouts_and_dtypes(device):
    bits, tau = random_rows(48, 40, seed=3)
    ref = dtf_select(bits, tau)
    assert_same(dtf_select_triton(bits.t().contiguous().t().to(device), tau.to(device)), ref, "non-contiguous")
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = bits.to(dtype)
        assert_same(dtf_select_triton(x.to(device), tau.to(device)), dtf_select(x, tau), str(dtype))
    assert_same(dtf_select_triton(bits.to(device), tau[0].to(device)), dtf_select(bits, tau[0]), "0-d tau")


@pytest.mark.parametrize("device", DEVICES)
def test_rows_per_program_and_algorithm_do_not_change_the_result(device):
    bits, tau = random_rows(40, 33, seed=11)
    ref = dtf_select(bits, tau, 1, 20)
    for rows in (1, 2, 8, 64):
        got = dtf_select_triton(bits.to(device), tau.to(device), 1, 20, rows_per_program=rows, algorithm="count")
        assert_same(got, ref, f"count rows_per_program={rows}")
    # the bitonic tl.sort path (default on CUDA) — slow in the interpreter, so a small batch there
    small_bits, small_tau = (bits, tau) if device == "cuda" else (bits[:16], tau[:16])
    small_ref = dtf_select(small_bits, small_tau, 1, 20)
    for rows in (1, 16):
        got = dtf_select_triton(small_bits.to(device), small_tau.to(device), 1, 20, rows_per_program=rows,
                                algorithm="sort")  # fmt: skip
        assert_same(got, small_ref, f"sort rows_per_program={rows}")


@pytest.mark.parametrize("device", DEVICES)
def test_sort_algorithm_on_small_sizes(device):
    for n in (1, 5, 16, 17):
        bits, tau = random_rows(16, n, seed=50 + n)
        for min_keep, max_keep in [(0, None), (3, 3)]:
            assert_same(
                dtf_select_triton(bits.to(device), tau.to(device), min_keep, max_keep, algorithm="sort"),
                dtf_select(bits, tau, min_keep, max_keep),
                f"sort N={n}",
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_beyond_the_old_token_cap(device, mode):
    """N = 8200 > 8192 (P = 39): the kernel and the reference still agree, in every rule. (N = 2^16 runs
    on the reference in test_dtf_absolute.py; the interpreter's O(N²) count would take minutes there.)"""
    n = 8200
    assert fixed_point_bits(n) == 39
    bits, tau = random_rows(1, n, seed=5)
    value = {"tau": tau, "theta": bits.mean(1), "epsilon": bits.sum(1) / 3}[mode]
    got = dtf_select_triton(bits.to(device), value.to(device), 3, 5000, mode=mode)
    assert_same(got, select_by_rule(bits, mode, value, 3, 5000), f"N={n} {mode}")


@pytest.mark.parametrize("device", DEVICES)
def test_max_total_skips_the_sizing_sync(device):
    bits, tau = random_rows(64, 50, seed=9)
    ref = dtf_select(bits, tau, 1, None)
    total = int(ref.cu_seqlens[-1])

    roomy = dtf_select_triton(bits.to(device), tau.to(device), 1, None, max_total=bits.numel())
    assert roomy.index.shape == (bits.numel(),)
    assert torch.equal(roomy.index[:total].cpu(), ref.index)
    assert bool((roomy.index[total:] == -1).all()), "capacity beyond the kept tokens is filled with -1"
    for field in ("keep", "lengths", "cu_seqlens"):
        assert torch.equal(getattr(roomy, field).cpu(), getattr(ref, field))
    for b in range(bits.shape[0]):
        assert torch.equal(roomy.positions(b).cpu(), ref.positions(b))

    exact = dtf_select_triton(bits.to(device), tau.to(device), 1, None, max_total=total)
    assert_same(exact, ref, "max_total = total")

    short = dtf_select_triton(bits.to(device), tau.to(device), 1, None, max_total=total // 2)
    assert short.index.shape == (total // 2,)
    assert torch.equal(short.index.cpu(), ref.index[: total // 2]), "a short buffer holds the first positions"
    assert int(short.cu_seqlens[-1]) > total // 2  # how a caller detects the overflow
    assert torch.equal(short.keep.cpu(), ref.keep) and torch.equal(short.lengths.cpu(), ref.lengths)

    assert dtf_select_triton(bits.to(device), tau.to(device), max_total=0).index.numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int64_offsets_beyond_2_31_elements():  # pragma: no cover - GPU only
    """B·N ≥ 2^31: offsets must be int64. Checked on the last rows (rows are independent)."""
    free, _ = torch.cuda.mem_get_info()
    batch, n = 2**19, 4096  # 2^31 elements: 8 GiB of bits
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    bits = torch.rand(batch, n, device="cuda")
    bits[-3:] = torch.randint(0, 4, (3, n), device="cuda").float()
    got = dtf_select_triton(bits, 0.5, 1, None, max_total=batch * n)
    tail_ref = dtf_select(bits[-3:].cpu(), 0.5, 1, None)
    assert torch.equal(got.keep[-3:].cpu(), tail_ref.keep)
    for i in range(3):
        assert torch.equal(got.positions(batch - 3 + i).cpu(), tail_ref.positions(i))
    del got, bits
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_missing_triton_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(dtf_triton, "triton", None)
    with pytest.raises(TatokError, match=r"backend='triton' needs the 'triton' package: pip install 'tatok\[triton\]'"):
        dtf_select_triton(torch.rand(2, 4), 0.5)
    with pytest.raises(dtf_triton.TritonUnavailableError):
        dtf_select_triton(torch.rand(2, 4), 0.5)


def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import tatok_core.ops.dtf.triton_kernel as m, torch\n"
        "assert not m.triton_available()\n"
        "try:\n    m.dtf_select_triton(torch.rand(2, 3), 0.5)\n"
        "except m.TritonUnavailableError as e:\n    print('OK', e)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK backend='triton' needs the 'triton' package")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows_per_program": 3}, "rows_per_program"),
        ({"rows_per_program": 0}, "rows_per_program"),
        ({"rows_per_program": True}, "rows_per_program"),
        ({"max_total": -1}, "max_total"),
        ({"max_total": 2.0}, "max_total"),
        ({"algorithm": "bogo"}, "algorithm"),
    ],
)
def test_bad_tunables_raise(kwargs, match):
    with pytest.raises(FilterInputError, match=match):
        dtf_select_triton(torch.rand(2, 4), 0.5, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_errors_are_the_references(device):
    bad = torch.rand(3, 5)
    bad[1, 2] = float("nan")
    cases = [(bad, 0.5, 0, None), (torch.rand(3, 5), 1.5, 0, None), (torch.rand(3, 5), 0.5, 4, 2)]
    for bits, tau, lo, hi in cases:
        with pytest.raises(FilterInputError) as ref:
            dtf_select(bits, tau, lo, hi)
        with pytest.raises(FilterInputError) as got:
            dtf_select_triton(bits.to(device), tau, lo, hi)
        assert str(got.value) == str(ref.value)


def test_interpreted_launch_leaves_triton_unpatched():
    """The CPU path routes nested @jit calls to the interpreter only during the launch."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    call, core_attrs = JITFunction.__call__, dict(vars(tl.core))
    dtf_select_triton(torch.rand(3, 20), 0.5, algorithm="sort")
    assert JITFunction.__call__ is call
    assert {k for k, v in vars(tl.core).items() if core_attrs.get(k) is not v} == set()


def test_interpreter_is_fast_enough_for_tests():
    bits, tau = random_rows(256, 256, seed=1)
    start = time.perf_counter()
    dtf_select_triton(bits, tau)
    assert time.perf_counter() - start < 30, "the sort-free interpreter path should take well under a second"
