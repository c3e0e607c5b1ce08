"""The built-in quantizers: FSQ conventions (held to the reference), VQ codebook maintenance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tatok_core.contract.interfaces import Facts, Quantizer
from tatok_plugins.fsq import EPS, FSQ
from tatok_plugins.vq import VQ


def facts(dim: int) -> Facts:
    return Facts({"dim": dim}, {"dim": "encoder 'test'"})


def fsq(dim: int = 6, levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)) -> FSQ:
    return FSQ(facts(dim), levels=levels).eval()


def inverse_bound(levels: tuple[int, ...], digits: torch.Tensor) -> torch.Tensor:
    """Inputs z (..., L) that the reference bound maps onto the centre of each digit's level."""
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + EPS) / 2
    offset = (lv % 2 == 0).double() * 0.5
    shift = torch.atanh(offset / half_l)
    r = digits.double() - torch.div(lv, 2, rounding_mode="floor")  # integer level in [-L//2, ...]
    return (torch.atanh((r + offset) / half_l) - shift).float()


# ---------------------------------------------------------------- FSQ


@pytest.mark.parametrize("levels", [(3,), (4,), (8, 5, 5, 5), (2, 3, 4), (8, 8, 8, 5, 5, 5)])
def test_fsq_whole_code_space_bijection(levels: tuple[int, ...]) -> None:
    q = fsq(len(levels), levels)
    codes = torch.arange(q.codebook_size)  # (K,)
    vecs = q.codes_to_levels(codes)  # (K, L)
    assert vecs.shape == (q.codebook_size, len(levels))
    assert torch.unique(vecs, dim=0).shape[0] == q.codebook_size, "two codes share a level vector"
    assert vecs.min() >= -1 and vecs.max() <= 1
    assert torch.equal(q.levels_to_codes(vecs), codes)
    # and forward reaches every code: inputs at each level's centre quantize to exactly that code
    out = q(inverse_bound(levels, q.codes_to_digits(codes)))
    assert torch.equal(out.codes, codes)
    assert torch.equal(out.vectors, vecs)


@given(st.lists(st.integers(2, 9), min_size=1, max_size=4).map(tuple), st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_fsq_bijection_and_exact_decode_any_levels(levels: tuple[int, ...], seed: int) -> None:
    q = fsq(len(levels), levels)
    codes = torch.arange(q.codebook_size)
    assert torch.equal(q.levels_to_codes(q.codes_to_levels(codes)), codes)
    x = torch.randn(3, 17, len(levels), generator=torch.Generator().manual_seed(seed)) * 3
    out = q(x)
    assert out.codes.dtype == torch.int64 and out.codes.shape == (3, 17)
    assert out.codes.min() >= 0 and out.codes.max() < q.codebook_size
    assert torch.equal(q.codes_to_vectors(out.codes), out.vectors)


@pytest.mark.parametrize(
    ("L", "expected"),
    [
        (3, [-1.0, 0.0, 1.0]),
        (4, [-1.0, -0.5, 0.0, 0.5]),
        (5, [-1.0, -0.5, 0.0, 0.5, 1.0]),
        (8, [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]),
    ],
)
def test_fsq_levels_match_reference_grid(L: int, expected: list[float]) -> None:
    q = fsq(1, (L,))
    assert q.codes_to_levels(torch.arange(L)).squeeze(-1).tolist() == expected
    # saturated inputs hit the ends of the (asymmetric for even L) grid; z = 0 is level 0
    out = q(torch.tensor([[-50.0], [0.0], [50.0]]))
    assert out.vectors.squeeze(-1).tolist() == [expected[0], 0.0, expected[-1]]


def test_fsq_first_dimension_least_significant() -> None:
    levels = (8, 5, 5, 5)
    q = fsq(4, levels)
    digits = torch.tensor([[2, 1, 3, 0]])
    base = q.digits_to_codes(digits).item()
    assert base == 2 + 8 * 1 + 40 * 3 + 200 * 0
    for d, step in enumerate([1, 8, 40, 200]):
        bumped = digits.clone()
        bumped[0, d] += 1
        assert q.digits_to_codes(bumped).item() == base + step
        # through forward as well: the input that lands one level higher in channel d
        assert q(inverse_bound(levels, bumped)).codes.item() == base + step


def test_fsq_straight_through_gradient_is_bound_derivative() -> None:
    levels = (8, 8, 8, 5, 5, 5)
    q = fsq(6, levels)
    x = (torch.randn(4, 10, 6) * 2).requires_grad_()
    q(x).vectors.sum().backward()
    lv = torch.tensor(levels, dtype=torch.float32)
    half_l = (lv - 1) * (1 + EPS) / 2
    shift = torch.atanh(torch.where(lv % 2 == 0, 0.5, 0.0) / half_l)
    expected = (1 - torch.tanh(x.detach() + shift) ** 2) * half_l / torch.div(lv, 2, rounding_mode="floor")
    assert x.grad is not None and (x.grad != 0).all()
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("dim", [6, 32])
def test_fsq_codes_to_vectors_bit_exact_and_token_order(dim: int) -> None:
    torch.manual_seed(0)
    q = fsq(dim)
    x = torch.randn(2, 64, dim) * 2  # (B, N, D)
    out = q(x)
    assert out.vectors.shape == (2, 64, dim) and out.codes.shape == (2, 64)
    assert torch.equal(q.codes_to_vectors(out.codes), out.vectors)
    assert torch.equal(q(x[1, 5:6]).codes[0], out.codes[1, 5]), "token i of the input must be token i out"
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert not out.metrics, "no statistics (host syncs) on the forward pass"
    stats = out.code_statistics(q.codebook_size)
    assert 0 < stats["codebook_usage"] <= 1 and 1 <= stats["perplexity"] <= 128


def test_fsq_projection_only_when_widths_differ() -> None:
    same = fsq(6)
    assert isinstance(same.project_in, nn.Identity) and isinstance(same.project_out, nn.Identity)
    assert sum(p.numel() for p in same.parameters()) == 0
    wide = fsq(16)
    assert isinstance(wide.project_in, nn.Linear) and wide.project_in.out_features == 6
    assert isinstance(wide.project_out, nn.Linear) and wide.project_out.out_features == 16
    assert same.provides() == {"code_factors": (8, 8, 8, 5, 5, 5)}


def test_fsq_bound_penalty_acts_only_beyond_the_active_range_and_only_in_training() -> None:
    """Zero where every level is reachable (it must not pull codes to the centre), positive and
    pushing back beyond it, never on the inference path, and the codes unchanged by it."""
    levels = (8, 5)
    quantizer = FSQ(facts(2), levels=levels, bound_penalty=0.5).train()
    shift = torch.atanh(torch.tensor([0.5 / (3.5 * (1 + EPS)), 0.0]))  # the even level's shift
    inside = (torch.tensor([[1.9, -1.9], [0.3, 1.0]]) - shift).requires_grad_()
    assert quantizer(inside).aux_loss.item() == 0.0
    outside = (torch.tensor([[3.0, -2.5]]) - shift).requires_grad_()
    loss = quantizer(outside).aux_loss
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.0**2 + 0.5**2) / 2))
    loss.backward()
    assert outside.grad[0, 0] > 0 and outside.grad[0, 1] < 0  # descent moves both back towards the range
    assert quantizer.eval()(outside).aux_loss.item() == 0.0
    torch.testing.assert_close(quantizer(outside).codes, FSQ(facts(2), levels=levels).eval()(outside).codes)
    with pytest.raises(Exception, match="bound_penalty"):
        FSQ(facts(2), levels=levels, bound_penalty=-1)


def test_fsq_bf16_autocast_quantizes_in_float32() -> None:
    q = fsq(6)
    xb = (torch.randn(8192, 6, generator=torch.Generator().manual_seed(1)) * 2).bfloat16()
    ref = q(xb.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(xb)
    assert out.vectors.dtype == torch.bfloat16
    assert torch.equal(out.codes, ref.codes)
    assert torch.equal(out.vectors.float(), ref.vectors)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # projected: still integer codes in range
        proj = fsq(16)(torch.randn(5, 16))
    assert proj.codes.dtype == torch.int64 and proj.codes.max() < 8**3 * 5**3


# ---------------------------------------------------------------- both


def test_build_and_run_on_meta_device() -> None:
    with torch.device("meta"):
        quantizers: list[Quantizer] = [
            FSQ(facts(6), levels=(8, 8, 8, 5, 5, 5)),
            FSQ(facts(32)),
            VQ(facts(32)),
            VQ(facts(8), ema=True),
        ]
        x6, x32, x8 = torch.empty(2, 16, 6), torch.empty(2, 16, 32), torch.empty(2, 16, 8)
    for q, x in zip(quantizers, [x6, x32, x32, x8]):
        assert all(p.is_meta for p in q.parameters())
        out = q(x)
        assert out.vectors.shape == x.shape and out.codes.shape == (2, 16)
    assert quantizers[2].provides() == {"code_factors": (1024,)}


# ---------------------------------------------------------------- VQ


def vq(dim: int = 4, **options: object) -> VQ:
    return VQ(facts(dim), **options)


def set_codebook(q: VQ, rows: torch.Tensor) -> None:
    with torch.no_grad():
        q.codebook.copy_(rows)
        if q.ema:
            q.embed_avg.copy_(rows * q.cluster_size[:, None])


@pytest.mark.parametrize(("l2", "ema"), [(False, False), (True, False), (False, True), (True, True)])
def test_vq_dead_codes_restarted_to_batch_vectors(l2: bool, ema: bool) -> None:
    torch.manual_seed(0)
    q = vq(4, codebook_size=16, codebook_dim=4, l2_normalized=l2, ema=ema, decay=0.5).train()
    set_codebook(q, torch.cat([torch.ones(1, 4), -torch.ones(15, 4) * 100]))  # only code 0 is reachable
    x = torch.rand(64, 4) + 0.5  # every x is nearest (and most cosine-similar) to code 0
    batch = F.normalize(x, dim=-1) if l2 else x
    for step in range(1, 20):
        out = q(x)
        if out.metrics["dead_codes"]:
            break
        assert out.code_statistics(16)["codebook_usage"] == 1 / 16
    # usage of codes 1..15 halves each step from 1/16; below 0.01 * mean after 7 steps
    assert step == 7 and out.metrics["dead_codes"] == 15
    restarted = q.codebook[1:].detach()  # (15, 4)
    match = (restarted[:, None, :] == batch[None, :, :]).all(-1).any(-1)
    assert match.all(), "restarted codes must be encoder outputs of the current batch"
    assert torch.allclose(q.usage[1:], torch.full((15,), 1 / 16))
    assert q(x).code_statistics(16)["codebook_usage"] > 1 / 16, "restarted codes should now be used"


def test_vq_restart_keeps_backward_valid() -> None:
    q = vq(4, codebook_size=8, codebook_dim=4, decay=0.0).train()  # decay 0: unused now = dead now
    x = torch.randn(2, 3, 4, requires_grad=True)
    first = q(x)
    second = q(x * 2)  # restarts the codebook in place while `first` still awaits backward
    assert first.metrics["dead_codes"] > 0
    (first.vectors.sum() + first.aux_loss + second.aux_loss).backward()
    assert q.codebook.grad is not None and x.grad is not None


def test_vq_ema_moves_codes_toward_assigned_vectors() -> None:
    torch.manual_seed(0)
    q = vq(4, codebook_size=4, codebook_dim=4, l2_normalized=False, ema=True, decay=0.9, restart_dead=False)
    q.train()
    assert "codebook" not in dict(q.named_parameters()), "EMA codebook must not be learned by gradient"
    start = torch.tensor([[0.0, 0, 0, 0], [10, 10, 10, 10], [-10, -10, -10, -10], [10, -10, 10, -10]])
    set_codebook(q, start)
    x = torch.randn(32, 4) * 0.1 + 0.5  # all assigned to code 0
    target = x.mean(0)
    q(x)
    n = 0.9 * 4 + 0.1 * 32  # cluster sizes after one step (all started at 1)
    expected = (0.9 * start[0] + 0.1 * x.sum(0)) / (0.9 + 0.1 * 32) * (1 + 1e-5 * 4 / n)
    torch.testing.assert_close(q.codebook[0], expected, rtol=1e-4, atol=1e-5)
    assert (q.codebook[0] - target).norm() < (start[0] - target).norm()
    torch.testing.assert_close(q.codebook[1:], start[1:], rtol=1e-4, atol=1e-4)  # unassigned: unchanged
    for _ in range(100):
        q(x)
    torch.testing.assert_close(q.codebook[0], target, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("ema", [False, True])
def test_vq_commitment_loss_positive_and_differentiable(ema: bool) -> None:
    torch.manual_seed(0)
    q = vq(4, codebook_size=16, codebook_dim=4, l2_normalized=False, ema=ema).eval()
    x = torch.randn(2, 8, 4, requires_grad=True)
    out = q(x)
    mse = F.mse_loss(x, q.codes_to_vectors(out.codes))
    torch.testing.assert_close(out.aux_loss, mse * (0.25 if ema else 1.25))
    assert out.aux_loss > 0
    out.aux_loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if not ema:
        assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0


def test_vq_straight_through_gradient() -> None:
    q = vq(4, codebook_size=16, codebook_dim=4, l2_normalized=False).eval()
    x = torch.randn(3, 5, 4, requires_grad=True)
    q(x).vectors.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize(("dim", "l2", "ema"), [(8, True, False), (32, True, True), (32, False, False)])
def test_vq_codes_to_vectors_bit_exact_and_token_order(dim: int, l2: bool, ema: bool) -> None:
    torch.manual_seed(0)
    q = vq(dim, codebook_size=64, codebook_dim=8, l2_normalized=l2, ema=ema).eval()
    assert isinstance(q.project_in, nn.Linear) == (dim != 8)
    x = torch.randn(2, 50, dim)  # (B, N, D)
    out = q(x)
    assert out.vectors.shape == x.shape and out.codes.shape == (2, 50) and out.codes.dtype == torch.int64
    assert torch.equal(q.codes_to_vectors(out.codes), out.vectors)
    assert torch.equal(q(x[1, 7:8]).codes[0], out.codes[1, 7])
    assert not out.metrics  # eval: no state changes, no statistics
    p = torch.bincount(out.codes.flatten(), minlength=64).double() / out.codes.numel()
    p = p[p > 0]
    stats = out.code_statistics(64)
    assert stats["codebook_usage"] == p.numel() / 64
    assert math.isclose(stats["perplexity"], math.exp(-(p * p.log()).sum().item()), rel_tol=1e-9)


@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
@settings(max_examples=20, deadline=None)
def test_vq_l2_lookup_picks_max_cosine(seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    q = vq(8, codebook_size=32, codebook_dim=8, l2_normalized=True).eval()
    with torch.no_grad():
        q.codebook.mul_(torch.rand(32, 1) * 5 + 0.1)  # unnormalised rows: lookup must still be cosine
    x = torch.randn(40, 8)
    cos = F.cosine_similarity(x[:, None, :], q.codebook[None].detach(), dim=-1)  # (40, 32)
    best = cos.max(-1).values
    codes = q(x).codes
    torch.testing.assert_close(cos.gather(1, codes[:, None]).squeeze(1), best)  # max-cosine (ties ok)
    assert torch.equal(q(x * scale).codes, codes), "cosine lookup ignores the input's scale"


def test_vq_bf16_autocast_and_usage_buffer_in_state_dict() -> None:
    q = vq(32, codebook_size=64, codebook_dim=8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(torch.randn(4, 16, 32))
    assert out.vectors.dtype == torch.float32, "vectors come back in the input's dtype"
    assert out.aux_loss.dtype == torch.float32 and torch.isfinite(out.aux_loss)
    assert "usage" in q.state_dict() and not torch.allclose(q.usage, torch.full((64,), 1 / 64))


def _ddp_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial codebook on both ranks, as DDP guarantees
    q = VQ(facts(4), codebook_size=8, codebook_dim=4, ema=True, decay=0.0).train()
    torch.manual_seed(100 + rank)  # different batches and RNG streams per rank
    restarted = sum(q(torch.randn(6, 4) + rank).metrics["dead_codes"] for _ in range(3))
    torch.save({"codebook": q.codebook, "usage": q.usage, "restarted": restarted}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_vq_ddp_ranks_stay_identical(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"out.{rank}") for rank in (0, 1))
    assert r0["restarted"] == r1["restarted"] > 0
    assert torch.equal(r0["codebook"], r1["codebook"]) and torch.equal(r0["usage"], r1["usage"])
