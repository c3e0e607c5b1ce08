"""Perceptual and adversarial losses, batched SSIM and rFID: the maths, and clear failures offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from tatok_core.contract.errors import TatokError
from tatok_core.workflows.losses import (
    VGG16_FILE,
    PatchDiscriminator,
    PerceptualLoss,
    VGG16Features,
    discriminator_loss,
    generator_loss,
)
from tatok_core.workflows.metrics import ssim as reference_ssim
from tatok_core.workflows.quality import INCEPTION_FILE, ReconstructionFID, inception_features, ssim


class OneTap(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.conv(x)), torch.relu(self.conv(x)).mean(1, keepdim=True)]


def test_perceptual_loss_zero_on_equal_positive_and_differentiable() -> None:
    torch.manual_seed(0)
    loss = PerceptualLoss(OneTap(), [5, 1], [torch.rand(5), torch.ones(1)])
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert float(loss(a, a)) == 0.0 and float(loss(a, b)) > 0
    x = a.clone().requires_grad_(True)
    loss(x, b).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())  # the metric stays fixed
    assert not loss.train().training
    with pytest.raises(TatokError, match="do not match channels"):
        PerceptualLoss(OneTap(), [5, 1], [torch.ones(4), torch.ones(1)])


def test_pretrained_weights_missing_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(TatokError) as e:
        PerceptualLoss.pretrained()
    message = str(e.value)
    assert VGG16_FILE in message and str(tmp_path) in message and "\n" not in message
    if importlib.util.find_spec("lpips") is None:
        assert "pip install lpips" in message
    with pytest.raises(TatokError) as e:
        inception_features()
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "pip install 'tatok[fid]'" in str(e.value)
    else:
        assert INCEPTION_FILE in str(e.value)


def test_vgg_trunk_has_torchvision_layout() -> None:
    names = {k for k in VGG16Features().state_dict()}
    assert {"features.0.weight", "features.28.bias"} <= names and len(names) == 26  # 13 convolutions
    taps = VGG16Features()(torch.rand(1, 3, 32, 32))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512]


def test_patch_discriminator_and_hinge_losses() -> None:
    logits = PatchDiscriminator(width=8, layers=2)(torch.rand(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # one logit per patch
    ones = torch.ones(4)
    assert float(discriminator_loss(2 * ones, -2 * ones)) == 0.0  # both beyond the margin
    assert float(discriminator_loss(-ones, ones)) == pytest.approx(2.0)
    assert float(generator_loss(3 * ones)) == -3.0


def test_batched_ssim_matches_scikit_image() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 24, 20, generator=g)
    b = (a + 0.1 * torch.randn(3, 3, 24, 20, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(b, a), reference_ssim(b, a), atol=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    with pytest.raises(TatokError, match="larger than"):
        ssim(a[..., :8, :8], a[..., :8, :8])


def test_reconstruction_fid_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(1))  # (B, 12)
    real = torch.rand(40, 3, 8, 8, generator=g)
    fake = (real * 0.7 + 0.2 * torch.rand(40, 3, 8, 8, generator=g)).clamp(0, 1)
    same = ReconstructionFID(features)
    for chunk in real.split(16):
        same.update(chunk, chunk)
    assert abs(same.compute()) < 1e-8
    fid = ReconstructionFID(features)
    for r, f in zip(real.split(16), fake.split(16)):
        fid.update(f, r)
    x, y = features(real).double().numpy(), features(fake).double().numpy()
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx + cy - 2 * scipy.linalg.sqrtm(cx @ cy).real)
    assert fid.compute() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(TatokError, match="at least two"):
        ReconstructionFID(features).compute()


def test_pretrained_loads_weights_from_the_local_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision's VGG16 file in torch hub's cache and lpips's heads installed, both are used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    trunk = VGG16Features().state_dict()
    torch.save({**trunk, "classifier.0.weight": torch.zeros(2, 2)},
               tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILE)
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(heads, package / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    loss = PerceptualLoss.pretrained()
    loaded = loss.network.state_dict()
    assert all(torch.equal(loaded[k], trunk[k]) for k in trunk)
    assert all(torch.equal(h.flatten(), heads[f"lin{i}.model.1.weight"].flatten()) for i, h in enumerate(loss.heads))
