"""Token filters: DTF (the paper's) and the fixed-count baselines it is compared against."""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from tatok_core.ops.dtf.backends import check_backend, select_with_backend
from tatok_core.ops.dtf.reference import MODES, descending_order, keep_first, validate_bits, validate_bounds, validate_threshold
from tatok_core.contract.interfaces import Facts, TokenFilter
from tatok_core.contract.selection import Selection

def _upper(max_keep: int) -> int | None:
    """Options cannot hold None: ``max_keep = -1`` means "no cap"."""
    return None if max_keep == -1 else max_keep


class DynamicTokenFilter(TokenFilter):
    """DTF: keep the highest-entropy tokens, as many as the rule ``mode`` decides (:mod:`tatok_core.ops.dtf.reference`).

    * ``mode="tau"`` (default, the paper's): the fewest tokens whose cumulative conditional entropy
      reaches τ·total — relative to each image.
    * ``mode="theta"``: every token holding more than ``theta`` bits — absolute, comparable across images.
    * ``mode="epsilon"``: the fewest tokens such that the dropped ones hold at most ``epsilon`` bits.

    The ``tau`` argument of :meth:`select` overrides the threshold *of the filter's mode* for one call
    (τ, θ or ε). ``min_keep``/``max_keep`` (−1: no cap) bound the count in every mode. ``backend``:
    "torch" runs the vectorised reference (:func:`tatok_core.ops.dtf.reference.select_by_rule`); "triton" the Triton
    kernel (compiled on CUDA tensors, interpreted on CPU tensors); "auto" uses Triton for CUDA tensors
    when it is importable and the reference otherwise. Both agree bit for bit.
    """

    role = "entropy-rules"

    def __init__(self, facts: Facts | None = None, *, tau: float = 0.9, mode: str = "tau", theta: float = 8.0,
                 epsilon: float = 256.0, min_keep: int = 1, max_keep: int = -1, backend: str = "auto") -> None:
        super().__init__(facts)
        check_backend(backend)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, value in (("tau", tau), ("theta", theta), ("epsilon", epsilon)):
            validate_threshold(value, 1, torch.device("cpu"), name)  # FilterInputError is a ValueError
        validate_bounds(0, min_keep, _upper(max_keep))
        self.tau, self.theta, self.epsilon, self.mode = float(tau), float(theta), float(epsilon), mode
        self.min_keep, self.max_keep, self.backend = min_keep, _upper(max_keep), backend

    @property
    def threshold(self) -> float:
        """The default threshold of this filter's mode (τ, θ or ε)."""
        return {"tau": self.tau, "theta": self.theta, "epsilon": self.epsilon}[self.mode]

    def select(self, bits: Tensor, tau: float | Tensor | None = None) -> Selection:
        threshold = self.threshold if tau is None else tau
        return select_with_backend(bits, self.mode, threshold, self.min_keep, self.max_keep, self.backend)


class KeepAll(TokenFilter):
    """Keep every patch token (the fixed-rate tokenizer)."""

    role = "keep-all"

    def __init__(self, facts: Facts | None = None) -> None:
        super().__init__(facts)

    def select(self, bits: Tensor, tau: float | Tensor | None = None) -> Selection:
        h = validate_bits(bits)
        return Selection.from_mask(torch.ones_like(h, dtype=torch.bool))


class FixedCountFilter(TokenFilter):
    """Keep k tokens per image (clamped to [min_keep, min(max_keep, N)]) ranked by :meth:`scores`.

    The baselines DTF is measured against at a matched mean token count; τ is ignored.
    """

    def __init__(self, facts: Facts | None = None, *, k: int = 16, min_keep: int = 0, max_keep: int = -1) -> None:
        super().__init__(facts)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer ≥ 0, got {k!r}")
        validate_bounds(0, min_keep, _upper(max_keep))
        self.k, self.min_keep, self.max_keep = k, min_keep, _upper(max_keep)

    @abc.abstractmethod
    def scores(self, bits: Tensor) -> Tensor:
        """(B, N) ranking scores; higher is kept first, ties go to the smaller position."""

    def select(self, bits: Tensor, tau: float | Tensor | None = None) -> Selection:
        h = validate_bits(bits)
        upper = validate_bounds(h.shape[1], self.min_keep, self.max_keep)
        k = min(max(self.k, min(self.min_keep, upper)), upper)
        counts = torch.full((h.shape[0],), k, dtype=torch.int64, device=h.device)
        return Selection.from_mask(keep_first(descending_order(self.scores(h)), counts))


class TopKFilter(FixedCountFilter):
    """Keep the k tokens with the most bits (fixed count, entropy-ranked)."""

    role = "top-k"

    def scores(self, bits: Tensor) -> Tensor:
        return bits


class RandomKFilter(FixedCountFilter):
    """Keep k tokens chosen uniformly at random; ``seed`` makes every call reproducible."""

    role = "random-k"

    positions_from_count = True  # a decoder with the seed knows the positions from k alone

    def __init__(self, facts: Facts | None = None, *, k: int = 16, min_keep: int = 0, max_keep: int = -1,
                 seed: int = 0) -> None:
        super().__init__(facts, k=k, min_keep=min_keep, max_keep=max_keep)
        self.seed = seed

    def scores(self, bits: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(bits.shape, generator=generator).to(bits.device)


class RasterKFilter(FixedCountFilter):
    """Keep the first k tokens in raster order (what a truncated fixed-rate sequence keeps)."""

    role = "raster-k"

    positions_from_count = True  # the positions are 0 … k−1: no side information beyond k

    def scores(self, bits: Tensor) -> Tensor:
        return -torch.arange(bits.shape[1], device=bits.device, dtype=torch.float32).expand_as(bits)

