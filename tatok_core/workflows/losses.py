"""Optional training losses beyond pixels: an LPIPS-style perceptual loss and a patch discriminator.

Both follow the tokenizers TaTok is compared with (VQGAN, TiTok, FlexTok): the perceptual loss compares
unit-normalised VGG16 features through LPIPS's learned per-channel weights; the discriminator is a
PatchGAN trained with the hinge loss from a warm-up step on.

The perceptual loss needs pretrained weights, and there is no network at run time: they are looked up
in the standard local caches (torch hub's checkpoint folder for VGG16, the installed ``lpips`` package
for the linear heads). When one is absent, :meth:`PerceptualLoss.pretrained` raises a one-line
:class:`TatokError` naming the missing file and how to get it — it never falls back to something else.

**Test-only injection path**: ``PerceptualLoss(network, channels)`` accepts any feature network (a
module returning a list of feature maps) with unit head weights, and ``train(..., perceptual=...)``
takes such an instance instead of the pretrained one. The tests use a small randomly initialised
network this way to check the plumbing; real training uses :meth:`PerceptualLoss.pretrained`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.contract.errors import TatokError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
LPIPS_HEADS = "weights/v0.1/vgg.pth"  # inside the installed lpips package
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision indices)
_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's input scaling layer
_SCALE = (0.458, 0.448, 0.450)


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), where pretrained weights live."""
    return Path(torch.hub.get_dir()) / "checkpoints"


class VGG16Features(nn.Module):
    """VGG16's convolutional trunk with torchvision's layer indices (so its weights load as they are);
    returns the five LPIPS feature maps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                channels = int(item)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG16_TAPS:
                taps.append(x)
        return taps


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: Σ_layers mean_xy ‖w_l ⊙ (f̂_l(a) − f̂_l(b))‖², f̂ unit-normalised over channels.

    ``network`` maps (B, 3, H, W) images in [-1, 1] (after LPIPS's scaling) to a list of feature maps
    with ``channels[i]`` channels; ``heads`` holds the non-negative per-channel weights (ones by default).
    The network and heads are frozen: only the tokenizer learns from this loss.
    """

    def __init__(self, network: nn.Module, channels: Sequence[int], heads: Sequence[Tensor] | None = None) -> None:
        super().__init__()
        self.network = network
        weights = heads if heads is not None else [torch.ones(c) for c in channels]
        if len(weights) != len(channels) or any(w.numel() != c for w, c in zip(weights, channels)):
            raise TatokError(f"perceptual heads {[w.numel() for w in weights]} do not match channels {list(channels)}")
        self.heads = nn.ParameterList([nn.Parameter(w.reshape(1, -1, 1, 1).float(), requires_grad=False)
                                       for w in weights])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always in eval mode: a fixed metric, not a model being trained

    @classmethod
    def pretrained(cls) -> PerceptualLoss:
        """VGG16 + LPIPS heads from the local caches; a one-line TatokError naming what is missing."""
        vgg = hub_checkpoint_dir() / VGG16_FILE
        spec = importlib.util.find_spec("lpips")
        heads = Path(spec.origin).parent / LPIPS_HEADS if spec is not None and spec.origin else None
        missing = []
        if not vgg.is_file():
            missing.append(f"VGG16 weights {vgg} (download {VGG16_URL} into {vgg.parent})")
        if heads is None or not heads.is_file():
            missing.append("the LPIPS linear heads (pip install lpips; they ship as lpips/weights/v0.1/vgg.pth)")
        if missing:
            raise TatokError("train.perceptual_weight > 0 needs pretrained weights that are not on this machine: "
                             + "; ".join(missing))
        network = VGG16Features()
        state = torch.load(vgg, map_location="cpu", weights_only=True)
        network.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
        lin = torch.load(heads, map_location="cpu", weights_only=True)
        head_weights = [lin[f"lin{i}.model.1.weight"].flatten() for i in range(len(_VGG16_TAPS))]
        return cls(network, [int(w.numel()) for w in head_weights], head_weights)

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Mean perceptual distance (a scalar) between (B, 3, H, W) images in [0, 1]."""
        a = self.network(((reconstruction * 2 - 1) - self.shift) / self.scale)
        b = self.network(((target * 2 - 1) - self.shift) / self.scale)
        total = reconstruction.new_zeros(())
        for fa, fb, w in zip(a, b, self.heads):
            diff = (_unit(fa) - _unit(fb)).pow(2)  # (B, C, h, w)
            total = total + (diff * w).sum(1).mean()
        return total


def _unit(features: Tensor) -> Tensor:
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided 4×4 convolutions → a map of real/fake logits per patch.

    GroupNorm instead of BatchNorm, so the logits of an image do not depend on its batch (and DDP
    ranks need no synchronised statistics).
    """

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(channels, out, 4, stride, 1), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, 1, h, w) logits."""
        return self.net(images * 2 - 1)


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Hinge generator loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: real logits above +1, fake logits below −1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
