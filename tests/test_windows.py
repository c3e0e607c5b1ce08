"""Windowed attention: really local (batched per window), and the same as full attention under its mask."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tatok_core import Facts
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_plugins.layers import Transformer, Windows, patch_layout
from tatok_plugins.vit import ViTEncoder


def test_layout_masks_cross_window_attention_and_keeps_globals_global() -> None:
    positions, windows = patch_layout((4, 6), 8, window=2, prefix=3, shift=False)
    assert windows is not None
    mask = windows.dense_mask()
    assert positions.shape == (24, 8) and mask.shape == (27, 27)
    assert mask[:3].all() and mask[:, :3].all()  # globals see and are seen by everything
    patches = mask[3:, 3:]
    assert patches[0, 1] and patches[0, 6] and patches[0, 7]  # (0,0) with (0,1), (1,0), (1,1)
    assert not patches[0, 2] and not patches[0, 12]  # (0,2) and (2,0) are other windows
    assert patches.sum() == 24 * 4  # six full 2×2 windows
    assert torch.equal(positions[0], positions[2])  # positions are within the window


def test_no_window_is_full_attention_with_absolute_positions() -> None:
    positions, windows = patch_layout((3, 3), 8, window=0, prefix=2, shift=True)
    assert windows is None and not torch.equal(positions[0], positions[4])


def test_training_shift_moves_window_borders() -> None:
    torch.manual_seed(0)
    shapes = set()
    for _ in range(20):
        _, windows = patch_layout((4, 4), 8, window=4, prefix=0, shift=True)
        assert windows is not None
        shapes.add(tuple(windows.dense_mask().sum(1).tolist()))
    assert len(shapes) > 1  # windows of different shapes were drawn


def test_shifted_windows_are_partial_at_the_borders() -> None:
    windows = Windows((5, 5), 4, offset=(1, 3))  # borders after row 2 and after column 0
    sizes = windows.dense_mask().sum(1).reshape(5, 5)  # patches in each patch's window
    assert sizes.tolist() == [[3, 12, 12, 12, 12]] * 3 + [[2, 8, 8, 8, 8]] * 2


def masked_reference(grid: tuple[int, int], window: int, prefix: int, offset: tuple[int, int]) -> torch.Tensor:
    """The pre-windowing implementation's (M + N)² mask, written out independently of :class:`Windows`."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    rows, cols = rows.reshape(-1) + offset[0], cols.reshape(-1) + offset[1]
    window_id = (rows // window) * (grid[1] + 2 * window) + cols // window  # (N,)
    mask = torch.ones(prefix + rows.numel(), prefix + rows.numel(), dtype=torch.bool)
    mask[prefix:, prefix:] = window_id[:, None] == window_id[None, :]
    return mask


CASES = [  # (grid, window, prefix, offset): exact tilings, partial windows, shifts, window > grid
    ((4, 4), 2, 0, (0, 0)),
    ((4, 4), 2, 3, (0, 0)),
    ((5, 7), 3, 2, (0, 0)),
    ((6, 9), 4, 0, (1, 3)),
    ((6, 9), 4, 8, (3, 2)),
    ((3, 2), 8, 4, (5, 1)),
    ((1, 1), 8, 2, (7, 7)),
    ((12, 16), 8, 8, (0, 5)),
]


@pytest.mark.parametrize(("grid", "window", "prefix", "offset"), CASES)
@pytest.mark.parametrize("with_key_mask", [False, True])
def test_windowed_transformer_equals_masked_full_attention(
    grid: tuple[int, int], window: int, prefix: int, offset: tuple[int, int], with_key_mask: bool
) -> None:
    """Weight compatibility: the same parameters give the masked computation's outputs."""
    torch.manual_seed(0)
    transformer = Transformer(16, depth=2, heads=2).eval()
    windows = Windows(grid, window, prefix=prefix, offset=offset)
    assert torch.equal(windows.dense_mask(), masked_reference(grid, window, prefix, offset))
    n = grid[0] * grid[1]
    x = torch.randn(2, prefix + n, 16)  # (B, M + N, D)
    key_mask = torch.rand(2, n) > 0.3 if with_key_mask else None
    if key_mask is not None and not prefix:  # a query without keys is NaN under the dense mask: give it itself
        key_mask = key_mask | (windows.dense_mask()[None] & key_mask[:, None]).sum(-1).eq(0)
    with torch.no_grad():
        dense = transformer(x, windows.dense_mask(key_mask) if key_mask is not None else windows.dense_mask())
        windowed = transformer(x, windows=windows, key_mask=key_mask)
    torch.testing.assert_close(windowed, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windowed_transformer_equals_masked_full_attention_on_cuda(dtype: torch.dtype) -> None:
    """The fused CUDA attention kernels (flash / memory-efficient) against the masked computation."""
    torch.manual_seed(0)
    transformer = Transformer(64, depth=2, heads=4).cuda().eval()
    for grid, window, prefix, offset in CASES:
        windows = Windows(grid, window, prefix=prefix, offset=offset, device=torch.device("cuda"))
        n = grid[0] * grid[1]
        x = torch.randn(2, prefix + n, 64, device="cuda")
        key_mask = torch.rand(2, n, device="cuda") > 0.3
        key_mask[:, 0] = True
        if not prefix:
            key_mask = key_mask | (windows.dense_mask()[None] & key_mask[:, None]).sum(-1).eq(0)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            for keys in (None, key_mask):
                dense = transformer(x, windows.dense_mask(keys) if keys is not None else windows.dense_mask())
                windowed = transformer(x, windows=windows, key_mask=keys)
                tolerance = 1e-4 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(windowed.float(), dense.float(), rtol=tolerance, atol=tolerance,
                                           msg=f"{grid} w={window} M={prefix} offset={offset} key_mask={keys is not None}")


def test_key_mask_hides_patches_from_every_query() -> None:
    torch.manual_seed(0)
    transformer = Transformer(16, depth=1, heads=2).eval()
    windows = Windows((4, 4), 2, prefix=2)
    x = torch.randn(1, 18, 16)
    key_mask = torch.ones(1, 16, dtype=torch.bool)
    key_mask[0, 5] = False  # patch (1, 1): in the first window
    changed = x.clone()
    changed[0, 2 + 5] += 10.0
    with torch.no_grad():
        before = transformer(x, windows=windows, key_mask=key_mask)
        after = transformer(changed, windows=windows, key_mask=key_mask)
    same = torch.ones(18, dtype=torch.bool)
    same[2 + 5] = False  # only the hidden patch's own output may change
    torch.testing.assert_close(after[0, same], before[0, same], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_mask must be"):
        transformer(x, windows=windows, key_mask=key_mask[:, :4])


def test_query_without_any_key_gets_zero_attention_not_nan() -> None:
    transformer = Transformer(16, depth=2, heads=2).eval()
    windows = Windows((4, 4), 2, prefix=0)
    key_mask = torch.ones(1, 16, dtype=torch.bool)
    key_mask[0, [0, 1, 4, 5]] = False  # the whole first window
    with torch.no_grad():
        out = transformer(torch.randn(1, 16, 16), windows=windows, key_mask=key_mask)
    assert torch.isfinite(out).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_windowed_attention_never_builds_a_quadratic_tensor() -> None:
    """Memory O(N·(w² + M)): no intermediate grows with N², which (M + N)² masks or scores would."""
    torch.manual_seed(0)
    transformer = Transformer(8, depth=1, heads=2).eval()
    grid, window, prefix = (48, 44), 4, 4  # N = 2112, not a multiple of the window in width
    n = grid[0] * grid[1]
    windows = Windows(grid, window, prefix=prefix, offset=(1, 2))
    with torch.no_grad(), LargestTensor() as largest:
        transformer(torch.randn(1, prefix + n, 8), windows=windows, key_mask=torch.rand(1, n) > 0.5)
    assert largest.numel <= 4 * (n + 200) * (window**2 + prefix), largest.numel  # H·B·N·(w² + M)-sized at most
    assert largest.numel < (n + prefix) ** 2 / 4


def test_windowed_encoder_sees_each_window_as_a_crop() -> None:
    torch.manual_seed(0)
    encoder = ViTEncoder(Facts(), patch_size=4, dim=32, depth=2, heads=2, window=4).eval()
    image = torch.rand(1, 3, 32, 48)  # grid 8×12: six 4×4 windows
    with torch.no_grad():
        whole = encoder(image).reshape(8, 12, 32)
        for top in (0, 16):
            for left in (0, 16, 32):
                crop = encoder(image[..., top : top + 16, left : left + 16]).reshape(4, 4, 32)
                r, c = top // 4, left // 4
                torch.testing.assert_close(whole[r : r + 4, c : c + 4], crop, rtol=1e-5, atol=1e-5)


@pytest.fixture
def dense_attention(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run every windowed Transformer as full attention under the equivalent dense mask."""
    windowed_forward = Transformer.forward

    def dense_forward(self: Transformer, x: torch.Tensor, attn_mask: Any = None, *, windows: Any = None,
                      key_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        if windows is not None:
            attn_mask = windows.dense_mask(key_mask) if key_mask is not None else windows.dense_mask()
        return windowed_forward(self, x, attn_mask, **kwargs)

    monkeypatch.setattr(Transformer, "forward", dense_forward)
    yield


def _shipped_outputs(model: Tokenizer, image: torch.Tensor) -> dict[str, torch.Tensor]:
    padded, _ = model.pad_to_grid(image)
    grid = model.grid_for(*image.shape[2:])
    features = model.encoder(padded)
    globals_, patches = model.global_tokenizer(features, grid)
    quantized = model.quantizer(torch.cat([globals_, patches], dim=1))
    m = globals_.shape[1]
    keep = torch.arange(grid[0] * grid[1]).reshape(1, -1) % 3 != 0  # drop a third of the patches
    return {
        "features": features, "globals": globals_, "patches": patches,
        "log_q": torch.cat(model.entropy.log_probs(quantized.vectors[:, :m], grid), dim=-1),
        "pixels": model.decoder(quantized.vectors[:, :m], quantized.vectors[:, m:], keep, grid),
    }


def test_shipped_weights_give_the_masked_versions_outputs(request: pytest.FixtureRequest) -> None:
    """tatok-tiny (window 8 everywhere) on a 76×100 image: partial windows in both directions."""
    torch.manual_seed(0)
    model = Tokenizer.from_pretrained("tatok-tiny")
    image = torch.rand(1, 3, 76, 100)  # grid 19×25
    with torch.no_grad():
        windowed = _shipped_outputs(model, image)
        request.getfixturevalue("dense_attention")
        dense = _shipped_outputs(model, image)
    for name, reference in dense.items():
        torch.testing.assert_close(windowed[name], reference, rtol=1e-4, atol=1e-4, msg=name)


def _swapped_windows() -> tuple[torch.Tensor, tuple[int, int]]:
    """(2, N, D) features, one map per image, on a 4×8 grid of two 4×4 windows: one marked patch at the same place
    within its window, in the left window of the first and the right window of the second."""
    torch.manual_seed(3)
    grid, dim = (4, 8), 32
    plain, mark = torch.randn(dim), 3.0 * torch.randn(dim)
    features = plain.expand(2, 32, dim).clone()  # (2, N, D)
    features[0, 1 * 8 + 1] += mark  # (1, 1): left window, (1, 1) within it
    features[1, 1 * 8 + 5] += mark  # (1, 5): right window, (1, 1) within it
    return features, grid


@pytest.mark.parametrize("relative", [False, True])
def test_globals_tell_where_only_with_image_relative_positions(relative: bool) -> None:
    """Within-window positions make the two maps the same multiset of windows, so globals (which attend to
    every patch) cannot tell them apart; image-relative positions are what let them lay out a picture."""
    from tatok_plugins.global_tokens import LearnedGlobalTokens

    features, grid = _swapped_windows()
    tokenizer = LearnedGlobalTokens(num_global=4, depth=1, heads=4, window=4, relative_positions=relative,
                                    dim=32).eval()
    with torch.no_grad():
        for parameter in tokenizer.parameters():  # a trained-like model: no zero-initialised branch
            parameter.copy_(torch.randn_like(parameter) * 0.2)
        globals_, _ = tokenizer(features, grid)  # (2, M, D)
    same = torch.allclose(globals_[0], globals_[1], atol=1e-5)
    assert same is not relative


def test_anchored_globals_start_from_the_mean_patch_of_their_cell() -> None:
    """anchored = 2 on a 4×8 grid: global i < 4 starts from its 2×4 cell's mean patch (row-major), the
    rest from their learned token alone; depth 0 leaves only the final norm to see it through."""
    from tatok_plugins.global_tokens import LearnedGlobalTokens

    tokenizer = LearnedGlobalTokens(num_global=6, depth=0, heads=4, window=4, anchored=2, dim=32).eval()
    features = torch.randn(2, 32, 32)  # (B, N, D) on a 4×8 grid
    with torch.no_grad():
        globals_, _ = tokenizer(features, (4, 8))
        cells = features.reshape(2, 2, 2, 2, 4, 32).mean((2, 4)).reshape(2, 4, 32)  # (B, 4, D) cell means
        start = tokenizer.tokens.expand(2, -1, -1).clone()
        start[:, :4] += cells
        torch.testing.assert_close(globals_, tokenizer.transformer.norm(start))


def test_anchored_globals_tell_where_without_relative_positions() -> None:
    """The two maps of :func:`_swapped_windows` hold the same windows in another order: within-window
    positions alone make the globals identical (above); anchored cells tell them apart."""
    from tatok_plugins.global_tokens import LearnedGlobalTokens

    features, grid = _swapped_windows()
    tokenizer = LearnedGlobalTokens(num_global=4, depth=1, heads=4, window=4, anchored=2, dim=32).eval()
    with torch.no_grad():
        globals_, _ = tokenizer(features, grid)  # (2, M, D)
    assert not torch.allclose(globals_[0], globals_[1], atol=1e-5)


def test_more_anchored_cells_than_globals_is_refused() -> None:
    from tatok_plugins.global_tokens import LearnedGlobalTokens

    with pytest.raises(ValueError, match=r"anchored = 3 needs 3² ≤ num_global = 8"):
        LearnedGlobalTokens(num_global=8, anchored=3, dim=32)
