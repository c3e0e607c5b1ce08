"""Variable-length image tokens: what a tokenizer produces and what users keep.

``Tokens`` compare by value (``==`` and :meth:`Tokens.equal`), print compactly, convert to plain
lists (:meth:`Tokens.to_list` / :meth:`Tokens.from_list`) and load with ``torch.load(...,
weights_only=True)`` once ``tatok_core`` is imported (they pickle as their tensors and two tuples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from tatok_core.contract.interfaces import Grid
from tatok_core.contract.selection import Selection, cu_seqlens_from_lengths


@attrs.frozen(eq=False)
class ImageTokens:
    """The tokens of one image: M global codes and k (position, code) pairs."""

    global_codes: Tensor  # (M,) int64
    codes: Tensor  # (k,) int64
    positions: Tensor  # (k,) int64, increasing, raster order in the grid
    grid: Grid
    image_size: tuple[int, int]  # (H, W) before padding to the grid

    def __repr__(self) -> str:
        n = self.grid[0] * self.grid[1]
        return (f"ImageTokens(globals={self.global_codes.numel()}, kept={self.codes.numel()}/{n}, "
                f"grid={self.grid}, image_size={self.image_size})")


@attrs.frozen(eq=False, repr=False)
class Tokens:
    """A batch of variable-length tokens in packed layout (FlashAttention "varlen").

    * ``global_codes`` (B, M) int64
    * ``codes`` (K,) int64 and ``positions`` (K,) int64 — kept patch tokens of all images
      concatenated; image b owns ``[cu_seqlens[b], cu_seqlens[b+1])``, positions increasing.
    * ``cu_seqlens`` (B+1,) int32, ``grid`` = (rows, cols) of patches, ``image_size`` = (H, W).
    """

    global_codes: Tensor
    codes: Tensor
    positions: Tensor
    cu_seqlens: Tensor
    grid: Grid
    image_size: tuple[int, int]

    def __attrs_post_init__(self) -> None:
        batch = self.global_codes.shape[0]
        if self.cu_seqlens.shape != (batch + 1,):
            raise ValueError(f"cu_seqlens must have shape ({batch + 1},), got {tuple(self.cu_seqlens.shape)}")
        if self.codes.shape != self.positions.shape or self.codes.dim() != 1:
            raise ValueError(f"codes {tuple(self.codes.shape)} and positions {tuple(self.positions.shape)} must be (K,)")

    @property
    def batch_size(self) -> int:
        return self.global_codes.shape[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def lengths(self) -> Tensor:
        """(B,) int64 kept patch tokens per image."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)

    def row_ids(self) -> Tensor:
        """(K,) int64 image index of every packed token."""
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.codes.device), self.lengths,
                                       output_size=self.positions.shape[0])  # size known: no host sync

    def keep_mask(self) -> Tensor:
        """(B, N) bool: which grid positions each image kept."""
        keep = torch.zeros(self.batch_size, self.num_patches, dtype=torch.bool, device=self.codes.device)
        keep[self.row_ids(), self.positions] = True
        return keep

    def to_grid(self, fill: int = -1) -> tuple[Tensor, Tensor]:
        """(codes (B, N) with ``fill`` at dropped positions, keep mask (B, N))."""
        grid_codes = torch.full((self.batch_size, self.num_patches), fill, dtype=torch.int64, device=self.codes.device)
        grid_codes[self.row_ids(), self.positions] = self.codes
        return grid_codes, self.keep_mask()

    def to_padded(self, pad_code: int = -1, pad_position: int = -1) -> tuple[Tensor, Tensor, Tensor]:
        """(codes (B, L), positions (B, L), valid (B, L)) with L the longest image, padding at the end."""
        lengths = self.lengths
        longest = int(lengths.max()) if self.batch_size else 0
        slot = torch.arange(longest, device=self.codes.device)
        valid = slot[None, :] < lengths[:, None]  # (B, L)
        codes = torch.full((self.batch_size, longest), pad_code, dtype=torch.int64, device=self.codes.device)
        positions = torch.full_like(codes, pad_position)
        codes[valid] = self.codes
        positions[valid] = self.positions
        return codes, positions, valid

    def per_image(self) -> list[ImageTokens]:
        bounds = self.cu_seqlens.tolist()
        return [
            ImageTokens(
                global_codes=self.global_codes[b],
                codes=self.codes[bounds[b] : bounds[b + 1]],
                positions=self.positions[bounds[b] : bounds[b + 1]],
                grid=self.grid,
                image_size=self.image_size,
            )
            for b in range(self.batch_size)
        ]

    @classmethod
    def from_selection(cls, global_codes: Tensor, patch_codes: Tensor, selection: Selection, grid: Grid,
                       image_size: tuple[int, int]) -> Tokens:
        """Pack the selected patch codes (B, N) with the globals (B, M): what a tokenizer emits."""
        rows = torch.repeat_interleave(torch.arange(selection.batch_size, device=selection.index.device), selection.lengths)
        return cls(
            global_codes=global_codes,
            codes=patch_codes[rows, selection.index],
            positions=selection.index,
            cu_seqlens=selection.cu_seqlens,
            grid=grid,
            image_size=image_size,
        )

    @classmethod
    def from_images(cls, images: Sequence[ImageTokens]) -> Tokens:
        """Pack per-image tokens (same grid and image size) back into a batch."""
        if not images:
            raise ValueError("cannot pack an empty list of ImageTokens")
        grid, size = images[0].grid, images[0].image_size
        if any(t.grid != grid or t.image_size != size for t in images):
            raise ValueError("all images of one Tokens batch must share grid and image size")
        lengths = torch.tensor([t.codes.numel() for t in images], dtype=torch.int64)
        cu_seqlens = cu_seqlens_from_lengths(lengths)  # (B+1,) int32
        return cls(
            global_codes=torch.stack([t.global_codes for t in images]),
            codes=torch.cat([t.codes for t in images]),
            positions=torch.cat([t.positions for t in images]),
            cu_seqlens=cu_seqlens.to(images[0].codes.device),
            grid=grid,
            image_size=size,
        )

    def to(self, device: torch.device | str) -> Tokens:
        return attrs.evolve(
            self,
            global_codes=self.global_codes.to(device),
            codes=self.codes.to(device),
            positions=self.positions.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
        )

    def equal(self, other: Tokens) -> bool:
        """Same grid, image size and codes, positions and offsets (on any devices)."""
        return (
            isinstance(other, Tokens)
            and self.grid == other.grid
            and self.image_size == other.image_size
            and all(
                torch.equal(getattr(self, f).cpu(), getattr(other, f).cpu())
                for f in ("global_codes", "codes", "positions", "cu_seqlens")
            )
        )

    __eq__ = equal  # value equality; tensors inside are mutable, so Tokens are not hashable
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        lengths = self.lengths.tolist()
        shown = ", ".join(map(str, lengths[:8])) + (f", … ({len(lengths)} images)" if len(lengths) > 8 else "")
        return (f"Tokens(batch={self.batch_size}, globals={self.global_codes.shape[1]}, kept=[{shown}] of "
                f"{self.num_patches}, grid={self.grid}, image_size={self.image_size}, device={self.codes.device})")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the constructor and its fields: what ``torch.load(weights_only=True)`` accepts."""
        return (Tokens, (self.global_codes, self.codes, self.positions, self.cu_seqlens, tuple(self.grid),
                         tuple(self.image_size)))

    def to_list(self) -> list[dict[str, Any]]:
        """Plain Python, one dict per image: ``{"global_codes": [c, …], "patches": [(position, code), …]}``.

        Grid and image size are batch-wide (:attr:`grid`, :attr:`image_size`); :meth:`from_list` inverts it.
        """
        return [
            {"global_codes": image.global_codes.tolist(),
             "patches": list(zip(image.positions.tolist(), image.codes.tolist()))}
            for image in self.per_image()
        ]

    @classmethod
    def from_list(cls, images: Sequence[Mapping[str, Any]], grid: Grid, image_size: tuple[int, int]) -> Tokens:
        """Tokens from :meth:`to_list`'s form; positions must increase inside the grid."""
        n = grid[0] * grid[1]
        unpacked = []
        for i, image in enumerate(images):
            pairs = [tuple(pair) for pair in image["patches"]]
            positions = torch.tensor([p for p, _ in pairs], dtype=torch.int64)
            if positions.numel() and (bool((positions[1:] <= positions[:-1]).any()) or positions[0] < 0
                                      or positions[-1] >= n):
                raise ValueError(f"image {i}: positions must increase inside the {n} grid positions, got {positions.tolist()}")
            unpacked.append(ImageTokens(torch.tensor(image["global_codes"], dtype=torch.int64).reshape(-1),
                                        torch.tensor([c for _, c in pairs], dtype=torch.int64), positions,
                                        tuple(grid), tuple(image_size)))  # type: ignore[arg-type]
        return cls.from_images(unpacked)


torch.serialization.add_safe_globals([Tokens])
