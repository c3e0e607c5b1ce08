"""Windowed attention: every window of a large image is encoded exactly as a crop of that window."""

from __future__ import annotations

import torch

from tatok_core import Facts
from tatok_plugins.layers import patch_layout
from tatok_plugins.vit import ViTEncoder


def test_layout_masks_cross_window_attention_and_keeps_globals_global() -> None:
    positions, mask = patch_layout((4, 6), 8, window=2, prefix=3, shift=False)
    assert positions.shape == (24, 8) and mask.shape == (27, 27)
    assert mask[:3].all() and mask[:, :3].all()  # globals see and are seen by everything
    patches = mask[3:, 3:]
    assert patches[0, 1] and patches[0, 6] and patches[0, 7]  # (0,0) with (0,1), (1,0), (1,1)
    assert not patches[0, 2] and not patches[0, 12]  # (0,2) and (2,0) are other windows
    assert torch.equal(positions[0], positions[2])  # positions are within the window


def test_no_window_is_full_attention_with_absolute_positions() -> None:
    positions, mask = patch_layout((3, 3), 8, window=0, prefix=2, shift=True)
    assert mask is None and not torch.equal(positions[0], positions[4])


def test_training_shift_moves_window_borders() -> None:
    torch.manual_seed(0)
    masks = {tuple(patch_layout((4, 4), 8, window=4, prefix=0, shift=True)[1].sum(1).tolist()) for _ in range(20)}
    assert len(masks) > 1  # windows of different shapes were drawn


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
