"""Finite scalar quantization (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Conventions follow the google-research reference (and ``vector_quantize_pytorch.FSQ``) exactly, because
codes are only portable between FSQ implementations when every one of them agrees:

- **Bound**: ``tanh(z + shift) * half_l - offset`` with ``half_l = (L-1)(1+eps)/2``, ``offset = 0.5`` for
  even L, ``shift = atanh(offset / half_l)``. So z = 0 maps to level 0, and an even L gets the
  *asymmetric* integer grid {-L/2 … L/2-1}: for L = 8 the normalised levels are {-1, -0.75, …, 0.75}.
- **Normalise** by ``half_width = L // 2`` so every level lies in [-1, 1].
- **Index**: mixed radix, the FIRST dimension LEAST significant (``basis = cumprod([1] + levels[:-1])``),
  the same order as :meth:`Quantizer.codes_to_digits` (LFQ uses the opposite order: never mix them).
- **Round before casting** to int, and quantize in float32 even under bf16 autocast: bf16 has 8 bits of
  mantissa, so tanh-bounded values near a rounding boundary would otherwise land on the wrong level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.contract.errors import SpecError
from tatok_core.contract.interfaces import Facts, Quantized, Quantizer

EPS = 1e-3  # the reference's margin: keeps the extreme levels reachable without saturating tanh
ACTIVE_RANGE = 2.0  # |z + shift| beyond this sits where tanh' < 0.08: every level is reachable below it


@contextlib.contextmanager
def float32_region(device: torch.device) -> Iterator[None]:
    """Autocast off (where the device has one), so quantization math really runs in float32."""
    try:
        ctx = torch.autocast(device.type, enabled=False)
    except RuntimeError:  # e.g. the meta device: no autocast to turn off
        ctx = contextlib.nullcontext()
    with ctx:
        yield


class FSQ(Quantizer):
    """Finite scalar quantization: each of ``len(levels)`` channels rounded to one of L_i levels.

    Options: ``levels`` (per-channel level counts, default (8, 8, 8, 5, 5, 5) ≈ 2^16 codes);
    ``bound_penalty`` (default 0: off), the weight of a training-only hinge ``mean(relu(|z + shift| − 2)²)``
    returned as ``aux_loss``. Why: once a channel's pre-tanh value drifts past ~2, tanh's gradient
    vanishes and the channel sticks at its extreme level — measured on tatok-small, one channel put 81 %
    of tokens on one level and 4608 tokens used 333 codes of 12 800. The hinge is zero inside the range
    where every level is reachable, so it does not pull codes towards the centre (a plain L2 on z does,
    and collapsed the codebook). A linear projection maps the model width to ``len(levels)`` channels
    and back only when they differ.
    ``dim`` is the encoder's width when composed; standalone it defaults to ``len(levels)`` (no
    projection), as in ``vector_quantize_pytorch.FSQ``.
    """

    def __init__(self, facts: Facts | None = None, *, levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5),
                 dim: int | None = None, bound_penalty: float = 0.0) -> None:
        super().__init__(facts)
        if bound_penalty < 0:
            raise SpecError(f"{self.label}: bound_penalty must be >= 0, got {bound_penalty}")
        self.bound_penalty = float(bound_penalty)
        levels = tuple(int(level) for level in levels)
        dim = self.need("dim", dim, default=len(levels))
        if not levels or min(levels) < 2:
            raise SpecError(f"{self.label}: levels must be a non-empty tuple of integers >= 2, got {levels}")
        self.levels = levels
        self.code_factors = levels
        self.dim = dim
        # identity when widths agree: no parameters, so codes are the encoder's own channels
        project = dim != len(levels)
        self.project_in: nn.Module = nn.Linear(dim, len(levels)) if project else nn.Identity()
        self.project_out: nn.Module = nn.Linear(len(levels), dim) if project else nn.Identity()
        self._constants_by_device: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    # constants are built per device on first use (not buffers, so a meta-built module materialises
    # without state to load) and cached: building them from Python lists copies host → device, which on
    # CUDA waits for the stream, so rebuilding them per call would be a host sync per call.
    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cached = self._constants_by_device.get(device)
        if cached is None:
            with torch.inference_mode(False):  # usable by autograd later even when first built in inference
                levels = torch.tensor(self.levels, dtype=torch.float32, device=device)  # (L,)
                half_l = (levels - 1) * (1 + EPS) / 2
                offset = torch.where(torch.remainder(levels, 2) == 0, 0.5, 0.0)
                shift = torch.atanh(offset / half_l)
                half_width = torch.tensor([lv // 2 for lv in self.levels], dtype=torch.float32, device=device)
            cached = self._constants_by_device[device] = (half_l, offset, shift, half_width)
        return cached

    def quantize(self, z: Tensor) -> Tensor:
        """Projected z (..., L) float32 → normalised levels (..., L) in [-1, 1], straight-through."""
        half_l, offset, shift, half_width = self._constants(z.device)
        bounded = torch.tanh(z + shift) * half_l - offset  # (..., L)
        rounded = bounded + (torch.round(bounded) - bounded).detach()  # exact: Sterbenz, |r - b| <= 1/2
        return rounded / half_width

    def forward(self, x: Tensor) -> Quantized:
        dtype = x.dtype
        z = self.project_in(x)  # (..., L)
        with float32_region(x.device):
            levels = self.quantize(z.float())  # (..., L) float32
            codes = self.levels_to_codes(levels)  # (...)
            penalised = self.training and self.bound_penalty > 0
            aux_loss = self.saturation_loss(z.float()) if penalised else z.new_zeros((), dtype=torch.float32)
        return Quantized(
            vectors=self.project_out(levels).to(dtype),  # (..., D), cast back after float32 quantization
            codes=codes,
            aux_loss=aux_loss,
        )  # codebook statistics on request only (Quantized.code_statistics): no host sync here

    def relaxed_digits(self, x: Tensor) -> Tensor:
        """Vectors (..., D) → digit weights (..., ΣL): forward one-hot at each channel's digit, backward
        the tent ``max(0, 1 − |b − l|)`` of the bounded value b over the levels l, so a rate read
        through the weights moves b towards the cheaper of its two neighbouring levels."""
        with float32_region(x.device):
            half_l, offset, shift, half_width = self._constants(x.device)
            centred = torch.tanh(self.project_in(x).float() + shift) * half_l - offset  # (..., L) as quantize
            digits = (torch.round(centred) + half_width).long()  # (..., L) the digits forward gives, in [0, L_i)
            bounded = centred + half_width  # (..., L) on the digits' scale
            blocks = []
            for i, size in enumerate(self.levels):
                grid = torch.arange(size, dtype=torch.float32, device=x.device)  # (L_i,)
                tent = F.relu(1 - (bounded[..., i, None] - grid).abs())  # (..., L_i)
                hard = F.one_hot(digits[..., i], size).float()  # (..., L_i)
                blocks.append(hard + (tent - tent.detach()))
        return torch.cat(blocks, dim=-1)  # (..., ΣL)

    def saturation_loss(self, z: Tensor) -> Tensor:
        """``bound_penalty`` · mean hinge² of projected z (..., L) beyond the active range of tanh."""
        shift = self._constants(z.device)[2]
        return self.bound_penalty * F.relu((z + shift).abs() - ACTIVE_RANGE).square().mean()

    def codes_to_levels(self, codes: Tensor) -> Tensor:
        """Codes (...) → normalised levels (..., L) in [-1, 1]."""
        half_width = self._constants(codes.device)[3]
        return (self.codes_to_digits(codes).float() - half_width) / half_width

    def levels_to_codes(self, levels: Tensor) -> Tensor:
        """Normalised levels (..., L) → codes (...) int64; rounds first (never truncate a float)."""
        half_width = self._constants(levels.device)[3]
        digits = torch.round(levels.float() * half_width + half_width).long()  # (..., L) in [0, L_i)
        return self.digits_to_codes(digits)

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """Codes (...) → vectors (..., D), bit-identical to ``forward`` in eval mode."""
        return self.project_out(self.codes_to_levels(codes))
