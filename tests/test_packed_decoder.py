"""The packed decoder (heavy layers over kept tokens only) and the globals-residual entropy estimator."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tatok_core import Tokenizer
from tatok_core.contract.spec import SpecError
from tatok_core.contract.interfaces import EntropyContext, Facts
from tatok_plugins.entropy_residual import GlobalsResidualEntropy
from tatok_plugins import packed_decoder
from tatok_plugins.packed_decoder import PackedDecoder, Packing, WindowLayout, packings, spread_kept

from .helpers import small_spec

FACTS = Facts({"dim": 32, "patch_size": 4, "channels": 3, "num_global": 3})


def decoder(**options: object) -> PackedDecoder:
    torch.manual_seed(0)
    return PackedDecoder(FACTS, **{"depth": 2, "heads": 2, "fill_width": 16, "window": 4, "layout": 2, **options}).eval()


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (8, 8), (9, 6)])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_packing_by_window_round_trips_and_groups_only_window_mates(grid: tuple[int, int], offset: int) -> None:
    layout = WindowLayout(grid, 4, offset, torch.device("cpu"))
    n = grid[0] * grid[1]
    where = torch.rand(2, n, generator=torch.Generator().manual_seed(offset)) < 0.4
    where[0, 0] = True
    windows, images = packings(layout, where)
    image, position = where.nonzero(as_tuple=True)
    x = torch.randn(image.numel(), 5)
    for packing in (windows, images):
        torch.testing.assert_close(packing.unpack(packing.pack(x)), x, rtol=0, atol=0)
        assert int(packing.valid.sum()) == x.shape[0]  # every token in exactly one slot
    same_row = windows.row[:, None] == windows.row[None, :]  # (K, K)
    window = layout.window_of[position]  # (K,)
    same_window = (image[:, None] == image[None, :]) & (window[:, None] == window[None, :])
    assert torch.equal(same_row, same_window)
    held = sorted({(int(i), int(layout.window_of[p])) for i, p in zip(image, position)})  # (image, window) pairs
    assert windows.rows == len(held) and windows.length <= 16  # only windows that hold a token, ≤ w² each
    assert windows.image.tolist() == [i for i, _ in held]
    assert images.rows == 2 and torch.equal(images.image, torch.arange(2))


def test_dropped_vectors_are_never_read() -> None:
    dec = decoder()
    g, p = torch.randn(1, 3, 32), torch.randn(1, 36, 32)
    keep = torch.rand(1, 36) < 0.4
    changed = torch.where(keep[..., None], p, torch.randn_like(p))
    torch.testing.assert_close(dec(g, p, keep, (6, 6)), dec(g, changed, keep, (6, 6)))


def dense_reference(dec: PackedDecoder, g: torch.Tensor, p: torch.Tensor, keep: torch.Tensor,
                    grid: tuple[int, int]) -> torch.Tensor:
    """The same decoder with attention over the DENSE grid of every window, dropped positions masked out
    as keys (how it was computed before packing by window): packing must change nothing but the cost."""
    def dense_packings(layout: WindowLayout, where: torch.Tensor) -> tuple[Packing, Packing]:
        image, position = where.nonzero(as_tuple=True)
        everything = torch.ones_like(where).nonzero(as_tuple=True)
        windows = Packing(everything[0] * layout.num_windows + layout.window_of[everything[1]],
                          where.shape[0] * layout.num_windows, compact=False, per_image=layout.num_windows)
        kept = where.reshape(-1)
        windows.flat = windows.flat[kept]
        windows.valid = torch.zeros_like(windows.valid)
        windows.valid.view(-1)[windows.flat] = True
        return windows, Packing(image, where.shape[0], compact=False)

    original = packed_decoder.packings
    packed_decoder.packings = dense_packings
    try:
        return dec(g, p, keep, grid)
    finally:
        packed_decoder.packings = original


def test_attention_among_kept_tokens_only_changes_no_output() -> None:
    dec = decoder()
    g, p = torch.randn(2, 3, 32), torch.randn(2, 64, 32)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[0, :10] = True  # image 0: kept tokens in the top windows only
    keep[1, torch.tensor([5, 40, 63])] = True  # image 1: three scattered windows
    torch.testing.assert_close(dec(g, p, keep, (8, 8)), dense_reference(dec, g, p, keep, (8, 8)), rtol=1e-5, atol=1e-6)


def test_attention_work_falls_with_the_kept_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention scores computed (queries × keys, every call), not timed: the FLOP counter does not see
    the CPU flash kernel. A quarter kept, scattered over every window: attention among kept tokens
    only: 0.49 of all kept; the dense windows of before computed 1.0 (the fill stage attends everywhere)."""
    dec = decoder(width=64, depth=4, fill_width=16)
    g, p = torch.randn(1, 3, 32), torch.randn(1, 256, 32)
    real = torch.nn.functional.scaled_dot_product_attention
    scores: list[int] = []

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
        scores.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real(q, k, v, **options)

    monkeypatch.setattr(packed_decoder.F, "scaled_dot_product_attention", counting)

    def work(keep: torch.Tensor) -> int:
        scores.clear()
        dec(g, p, keep, (16, 16))
        return sum(scores)

    scattered = torch.rand(1, 256, generator=torch.Generator().manual_seed(0)) < 0.25
    everything, quarter = work(torch.ones(1, 256, dtype=torch.bool)), work(scattered)
    assert quarter < 0.55 * everything


def test_images_of_a_batch_do_not_mix() -> None:
    """Packing concatenates the kept tokens of every image: image b must decode as it would alone."""
    dec = decoder()
    g, p = torch.randn(3, 3, 32), torch.randn(3, 30, 32)
    keep = torch.rand(3, 30) < torch.tensor([[0.0], [0.5], [1.0]])
    together = dec(g, p, keep, (5, 6))
    for b in range(3):
        alone = dec(g[b : b + 1], p[b : b + 1], keep[b : b + 1], (5, 6))
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-4, atol=1e-5)


def test_globals_only_decode_depends_on_the_globals() -> None:
    dec = decoder()
    p, nothing = torch.randn(1, 16, 32), torch.zeros(1, 16, dtype=torch.bool)
    a = dec(torch.randn(1, 3, 32), p, nothing, (4, 4))
    b = dec(torch.randn(1, 3, 32), p, nothing, (4, 4))
    assert a.shape == (1, 3, 16, 16) and (a - b).abs().max() > 1e-4


def test_decoding_costs_less_with_fewer_kept_tokens() -> None:
    """Counted in FLOPs (deterministic), not timed: 25 % kept must cost well under the full grid."""
    dec = decoder(width=64, depth=4, fill_width=16)
    g, p = torch.randn(1, 3, 32), torch.randn(1, 256, 32)

    def flops(fraction: float) -> int:
        keep = torch.arange(256)[None] < int(256 * fraction)
        with FlopCounterMode(display=False) as counter:
            dec(g, p, keep, (16, 16))
        return counter.get_total_flops()

    everything, quarter, nothing = flops(1.0), flops(0.25), flops(0.0)
    # the heavy projections run on the kept tokens only: with them on the dense grid, 0.58 and 0.44
    assert nothing < 0.25 * everything and quarter < 0.45 * everything


def test_the_last_fill_block_skips_the_prefix_update_and_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last block's prefix is read by nothing, so the decoder does not compute it: forcing the update
    back on must give the same pixels (and every heavy block still updates it)."""
    dec = decoder(fill_depth=2)
    g, p = torch.randn(2, 3, 32), torch.randn(2, 36, 32)
    keep = torch.rand(2, 36, generator=torch.Generator().manual_seed(1)) < 0.5
    skipped = dec(g, p, keep, (6, 6))
    real, flags = packed_decoder.PackedBlock.forward, []

    def always_update(self, tokens, prefix, packed, *, update_prefix=True):  # noqa: ANN001, ANN202
        flags.append(update_prefix)
        return real(self, tokens, prefix, packed, update_prefix=True)

    monkeypatch.setattr(packed_decoder.PackedBlock, "forward", always_update)
    torch.testing.assert_close(dec(g, p, keep, (6, 6)), skipped, rtol=0, atol=0)
    assert flags == [True, True, True, False]  # 2 heavy, 2 fill: only the very last skips


def test_a_narrow_prefix_mlp_is_the_first_hidden_units_of_the_shared_one() -> None:
    """prefix_mlp_ratio r: the prefix goes through hidden units [0, r·W) of each heavy block's MLP. So a
    full-width decoder whose units beyond r·W are switched off (GELU(0) = 0) decodes globals-only (the
    prefix path alone) exactly as the narrow one; and r = 0 leaves the prefix to attention alone."""
    narrow, full = decoder(prefix_mlp_ratio=1.0), decoder()
    with torch.no_grad():
        for block in narrow.heavy:  # MLPs that matter (a fresh init barely moves the prefix)
            block.mlp[0].weight.mul_(30)
            block.mlp[2].weight.mul_(30)
    full.load_state_dict(narrow.state_dict())
    switched_off = decoder()
    switched_off.load_state_dict(narrow.state_dict())
    with torch.no_grad():
        for block in switched_off.heavy:
            block.mlp[0].weight[32:] = 0
            block.mlp[0].bias[32:] = 0
    g, p, nothing = torch.randn(2, 3, 32), torch.randn(2, 16, 32), torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(narrow(g, p, nothing, (4, 4)), switched_off(g, p, nothing, (4, 4)), rtol=1e-5, atol=1e-6)
    assert (narrow(g, p, nothing, (4, 4)) - full(g, p, nothing, (4, 4))).abs().max() > 1e-4  # 100× the tolerance: the units beyond r·W do matter
    attention_only = decoder(prefix_mlp_ratio=0.0)
    with torch.no_grad():
        for block in attention_only.heavy:
            block.mlp[2].bias.add_(5.0)  # the prefix never reads the MLP: its decode must not move
    torch.testing.assert_close(attention_only(g, p, nothing, (4, 4)), decoder(prefix_mlp_ratio=0.0)(g, p, nothing, (4, 4)))


def test_the_canvas_reaches_dropped_positions_only() -> None:
    """canvas: the layout tokens, interpolated, start the dropped positions that no kept token is near.
    With every token kept, or a kept token within fill_spread rings of every position, the decode is the
    canvas-free one; globals only, each position gets its own start, following the layout tokens."""
    with_canvas, without = decoder(canvas=True, fill_spread=3), decoder(fill_spread=3)
    without.load_state_dict(with_canvas.state_dict())  # the option adds no parameter
    g, p = torch.randn(1, 3, 32), torch.randn(1, 36, 32)
    everything, nothing = torch.ones(1, 36, dtype=torch.bool), torch.zeros(1, 36, dtype=torch.bool)
    near = torch.zeros(1, 36, dtype=torch.bool)
    near[0, 14] = True  # (2, 2): every position of the 6×6 grid lies within 3 rings
    far = torch.zeros(1, 36, dtype=torch.bool)
    far[0, 0] = True  # (0, 0): the far corner is 5 rings away
    for reached_everywhere in (everything, near):
        torch.testing.assert_close(with_canvas(g, p, reached_everywhere, (6, 6)), without(g, p, reached_everywhere, (6, 6)),
                                   rtol=0, atol=0)
    for somewhere_unreached in (nothing, far):
        assert (with_canvas(g, p, somewhere_unreached, (6, 6)) - without(g, p, somewhere_unreached, (6, 6))).abs().max() > 1e-4
    canvas = with_canvas._canvas(torch.arange(4.0).reshape(1, 4, 1), (6, 6))  # a 2×2 layout of one channel
    assert canvas.shape == (1, 36, 1) and canvas[0, 0, 0] == 0 and canvas[0, -1, 0] == 3  # corners: their tokens
    with pytest.raises(ValueError, match="canvas = true interpolates the layout tokens"):
        decoder(canvas=True, layout=0)


def test_the_canvas_gate_starts_as_the_canvas_and_learns_a_share_per_ring() -> None:
    """canvas_gate: a learned gain per ring to the nearest kept token, 1 out of reach and 0 nearer at
    initialisation — exactly ``canvas`` — so that training can let the canvas reach nearer positions."""
    gated, plain = decoder(canvas=True, canvas_gate=True, fill_spread=2), decoder(canvas=True, fill_spread=2)
    start = gated.canvas_gain.detach().clone()
    gated.load_state_dict(plain.state_dict())  # saved without the gate (train.init): the gain keeps its start
    assert torch.equal(gated.canvas_gain, start) and start[-1].eq(1).all() and start[:-1].eq(0).all()
    g, p = torch.randn(2, 3, 32), torch.randn(2, 36, 32)
    keep = torch.zeros(2, 36, dtype=torch.bool)
    keep[:, 0] = True  # one kept corner: rings 1 and 2 around it, the rest out of reach
    with torch.no_grad():
        torch.testing.assert_close(gated(g, p, keep, (6, 6)), plain(g, p, keep, (6, 6)), rtol=0, atol=0)
        gated.canvas_gain[0] = 1.0  # the first ring now takes the canvas too
        changed = (gated(g, p, keep, (6, 6)) - plain(g, p, keep, (6, 6))).abs().amax(dim=(0, 1))  # (H, W)
    assert changed.max() > 1e-4
    with pytest.raises(ValueError, match="canvas_gate = true weighs the canvas, so it needs canvas = true"):
        decoder(canvas_gate=True, fill_spread=2)


def test_a_prefix_mlp_wider_than_the_blocks_mlp_is_refused() -> None:
    with pytest.raises(ValueError, match=r"prefix_mlp_ratio must lie in \[0, mlp_ratio = 4\], got 6"):
        decoder(prefix_mlp_ratio=6.0)


def test_residual_bits_measure_what_the_globals_miss() -> None:
    estimator = GlobalsResidualEntropy(FACTS, distortion=1e-3)
    images = torch.rand(1, 3, 8, 8)
    base = images.clone()
    base[..., :4, :4] += 0.1  # patch 0 is missed by 0.1 everywhere, the others are exact
    rest = (torch.zeros(1, 3, 32), torch.zeros(1, 3), torch.zeros(1, 4, 32), torch.zeros(1, 4))
    bits = estimator(EntropyContext(images, (2, 2), *rest, base)).bits  # (1, 4)
    expected = 0.5 * 48 * torch.log2(torch.tensor(1 + 0.01 / 1e-3))
    torch.testing.assert_close(bits[0, 0], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(bits[0, 1:], torch.zeros(3))
    with pytest.raises(ValueError, match="globals-only reconstruction"):
        estimator(EntropyContext(images, (2, 2), *rest))


def test_tokenizer_feeds_the_globals_only_decode_to_the_estimator() -> None:
    spec = small_spec(entropy="residual", decoder="packed")
    model = Tokenizer(spec).eval()
    images = torch.rand(2, 3, 16, 16)
    analysis = model.analyse(images)
    nothing = torch.zeros(2, 16, dtype=torch.bool)
    base = model.decoder(analysis.globals_.vectors, analysis.patches.vectors, nothing, analysis.grid)
    torch.testing.assert_close(analysis.base_reconstruction, base)
    residual = ((images - base) ** 2).reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1)
    assert torch.equal(analysis.entropy.bits.argmax(1), residual.mean(-1).argmax(1))


def test_topk_training_selection_spans_every_budget_and_ranks_by_bits() -> None:
    spec = small_spec(entropy="residual", decoder="packed")
    spec = type(spec).from_dict({**spec.to_dict(), "pipeline": {"train_keep": "topk", "train_random_rank": 0.0}})
    model = Tokenizer(spec).train()
    torch.manual_seed(0)
    bits = torch.rand(400, 16)
    selection = model.sample_topk(bits)
    assert {0, 16} <= set(selection.lengths.tolist())
    for b in range(400):
        kept, dropped = bits[b][selection.keep[b]], bits[b][~selection.keep[b]]
        assert kept.numel() == 0 or dropped.numel() == 0 or kept.min() >= dropped.max()
    out = model(torch.rand(2, 3, 16, 16))
    assert set(out.losses) >= {"mse", "globals"} and torch.isfinite(out.losses["globals"])


def test_full_share_keeps_every_token_for_that_share_of_the_images() -> None:
    spec = small_spec(entropy="residual", decoder="packed")
    spec = type(spec).from_dict({**spec.to_dict(), "pipeline": {"train_keep": "topk", "train_full_share": 0.5}})
    model = Tokenizer(spec).train()
    torch.manual_seed(0)
    lengths = model.sample_topk(torch.rand(2000, 16)).lengths
    full = float((lengths == 16).double().mean())
    assert 0.47 < full < 0.56, full  # 0.5 + 0.5/17 from the uniform budgets that land on 16
    assert (lengths < 16).any() and (lengths == 0).any()  # the other half still spans every budget
    spec = type(spec).from_dict({**spec.to_dict(), "pipeline": {"train_keep": "topk", "train_full_share": 0.0}})
    plain = Tokenizer(spec).train().sample_topk(torch.rand(2000, 16)).lengths
    assert float((plain == 16).double().mean()) < 0.1


def test_max_fraction_bounds_the_partial_budgets_and_still_draws_globals_only() -> None:
    spec = small_spec(entropy="residual", decoder="packed")
    pipeline = {"train_keep": "topk", "train_full_share": 0.25, "train_max_fraction": 0.5}
    spec = type(spec).from_dict({**spec.to_dict(), "pipeline": pipeline})
    torch.manual_seed(0)
    lengths = Tokenizer(spec).train().sample_topk(torch.rand(4000, 16)).lengths
    partial = lengths[lengths < 16]
    assert int(partial.max()) == 8 and (partial == 0).any()  # k ~ U{0 … ⌊0.5·16⌋}
    assert 0.22 < float((lengths == 16).double().mean()) < 0.28  # only the full share keeps every token
    assert abs(float((partial == 0).double().mean()) - 1 / 9) < 0.03  # uniform over the 9 budgets


def test_max_fraction_outside_zero_to_one_is_refused_by_name() -> None:
    spec = small_spec(entropy="residual", decoder="packed")
    with pytest.raises(SpecError, match="train_max_fraction.*1.5"):
        type(spec).from_dict({**spec.to_dict(), "pipeline": {"train_max_fraction": 1.5}})


def test_spread_gives_dropped_positions_the_mean_of_their_nearest_kept_ones() -> None:
    dense = torch.zeros(1, 9, 2)
    dense[0, 0], dense[0, 2] = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])  # corners of the top row
    keep = torch.zeros(1, 9, dtype=torch.bool)
    keep[0, [0, 2]] = True
    dense[0, 4] = 100.0  # a dropped position's own vector is never read
    (one, ring_one), (two, ring_two) = spread_kept(dense, keep, (3, 3), 1), spread_kept(dense, keep, (3, 3), 2)
    assert ring_one[0].tolist() == [0, 1, 0, 1, 1, 1, 2, 2, 2]  # kept, the first ring, out of reach (steps + 1)
    assert ring_two[0].tolist() == [0, 1, 0, 1, 1, 1, 2, 2, 2]  # the bottom row is the second ring
    torch.testing.assert_close(one[0, [0, 2]], dense[0, [0, 2]])  # kept positions unchanged
    torch.testing.assert_close(one[0, 1], torch.tensor([2.0, 4.0]))  # between both: their mean
    torch.testing.assert_close(one[0, 3], dense[0, 0])  # below the first corner: only it is in reach
    torch.testing.assert_close(one[0, 4], torch.tensor([2.0, 4.0]))
    assert one[0, 6:].abs().max() == 0  # bottom row: two rings away, not reached in one step
    torch.testing.assert_close(two[0, 7], torch.tensor([2.0, 4.0]))  # ring 1's guesses spread on


def test_fill_spread_changes_only_dropped_positions() -> None:
    """Same weights: with every token kept the spread has nothing to fill; with holes it fills them
    from the neighbours, which a smooth input rewards."""
    g, p = torch.randn(1, 3, 32), torch.randn(1, 36, 32)
    plain, spread = decoder(), decoder(fill_spread=2)
    spread.load_state_dict(plain.state_dict())
    everything = torch.ones(1, 36, dtype=torch.bool)
    torch.testing.assert_close(plain(g, p, everything, (6, 6)), spread(g, p, everything, (6, 6)))
    holes = torch.rand(1, 36, generator=torch.Generator().manual_seed(0)) < 0.5
    assert (plain(g, p, holes, (6, 6)) - spread(g, p, holes, (6, 6))).abs().max() > 1e-4


def test_fill_spread_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="fill_spread"):
        decoder(fill_spread=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
def test_packed_attention_on_cuda_matches_the_cpu() -> None:
    dec = decoder(width=64, depth=2, fill_width=16)
    g, p = torch.randn(3, 3, 32), torch.randn(3, 100, 32)
    keep = torch.rand(3, 100, generator=torch.Generator().manual_seed(2)) < torch.tensor([[0.0], [0.25], [1.0]])
    on_cpu = dec(g, p, keep, (10, 10))
    on_cuda = dec.cuda()(g.cuda(), p.cuda(), keep.cuda(), (10, 10)).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-3, atol=1e-4)


def test_the_global_grid_reaches_the_decoder_and_places_the_anchored_globals() -> None:
    """A tokenizer with anchored globals provides ``global_grid``; the packed decoder adds each anchored
    global's cell position — the very features its layout tokens carry at the same cells."""
    spec = small_spec(decoder="packed")
    plain = Tokenizer(spec).eval()
    anchored = Tokenizer(spec.updated({}, {"global_tokenizer.anchored": 2})).eval()
    assert plain.decoder.global_grid == 0 and anchored.decoder.global_grid == 2
    anchored.load_state_dict(plain.state_dict())  # the same weights: only the placement differs
    seen: dict[str, torch.Tensor] = {}

    def capture(name: str):  # the prefix (B, P, W) entering the first heavy block
        return lambda module, args: seen.__setitem__(name, args[1])

    inputs = (torch.randn(1, 4, 32), torch.randn(1, 16, 32), torch.zeros(1, 16, dtype=torch.bool), (4, 4))
    for name, model in (("plain", plain), ("anchored", anchored)):
        model.decoder.heavy[0].register_forward_pre_hook(capture(name))
        with torch.no_grad():
            model.decoder(*inputs)
    dec = anchored.decoder
    cells = dec._grid_positions(2, dec.width, torch.device("cpu"))  # (4, W) = the 2×2 layout tokens' positions
    torch.testing.assert_close(seen["anchored"][0, :4] - seen["plain"][0, :4], cells)
    torch.testing.assert_close(seen["anchored"][0, 4:], seen["plain"][0, 4:])


def test_a_decoder_told_another_global_grid_than_the_tokenizer_provides_fails_at_compose_time() -> None:
    from tatok_core import CompositionError

    spec = small_spec(decoder="packed").updated({}, {"global_tokenizer.anchored": 2, "decoder.global_grid": 1})
    with pytest.raises(CompositionError, match=r"global_grid=1 but global_tokenizer 'learned' provides global_grid=2"):
        Tokenizer(spec)


@pytest.mark.parametrize("name", ["packed", "vit"])
def test_a_training_step_follows_an_inference_mode_decode_of_the_same_size(name: str) -> None:
    """The decoder's cached layouts are built outside inference mode, so autograd can save them later."""
    torch.manual_seed(0)
    model = Tokenizer(small_spec(entropy="chain", decoder=name)).eval()
    x = torch.rand(2, 3, 16, 24)
    with torch.inference_mode():
        model.decode(model.encode(x))
    model.train()
    model(x, tau=0.5).losses["mse"].backward()
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
