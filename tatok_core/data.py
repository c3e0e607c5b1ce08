"""Training and evaluation images: the built-in photos, folders of files, and crop streams.

There is no network at run time, so the default data are real photographs that ship inside
scikit-image and scikit-learn. They are split into train and held-out **by photo** (never by crop),
so a held-out score measures images the tokenizer has never seen a pixel of.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from tatok_core.errors import ImageReadError, MissingExtraError
from tatok_core.extras import missing_extra_message
from tatok_core.imageio import list_images, read_image


@attrs.frozen
class BuiltinPhoto:
    """A photograph shipped inside an installed package (``package``/``relpath``)."""

    name: str
    package: str
    relpath: str

    @property
    def path(self) -> Path:
        """Location in the installed package, found without importing it."""
        spec = importlib.util.find_spec(self.package)  # a top-level name: found, not imported
        if spec is None or spec.origin is None:
            raise MissingExtraError(missing_extra_message(self.package, f"built-in photo {self.name!r}"))
        return Path(spec.origin).parent / self.relpath


def _sk(name: str, ext: str = "png") -> BuiltinPhoto:
    return BuiltinPhoto(name, "skimage", f"data/{name}.{ext}")


def _sl(name: str) -> BuiltinPhoto:
    return BuiltinPhoto(name, "sklearn", f"datasets/images/{name}.jpg")


#: Real photographs only (colour and grayscale; grayscale is replicated to RGB). Included textures
#: (brick, grass, gravel) are photos of real surfaces: dense high-frequency detail that the
#: object photos lack. Left out on purpose: synthetic or drawn images (logo, phantom, chessboard_*,
#: color), artificially blurred (clock_motion), binary silhouettes (horse), near-binary document
#: scans (page, text), a flat microscopy slice (cell) and a 102-pixel crop of ``retina``
#: (microaneurysms), which would also leak between the two sides of the split.
BUILTIN_PHOTOS: tuple[BuiltinPhoto, ...] = (
    _sk("astronaut"),
    _sk("brick"),
    _sk("camera"),
    _sk("chelsea"),
    _sk("coffee"),
    _sk("coins"),
    _sk("grass"),
    _sk("gravel"),
    _sk("hubble_deep_field", "jpg"),
    _sk("ihc"),
    _sk("moon"),
    _sk("motorcycle_left"),
    _sk("motorcycle_right"),
    _sk("retina", "jpg"),
    _sk("rocket", "jpg"),
    _sl("china"),
    _sl("flower"),
)

#: Fixed held-out photos: a cat, an object close-up, an outdoor scene, a flower close-up and a
#: texture. The motorcycle stereo pair shows one scene twice, so both halves stay in train.
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "rocket", "flower", "gravel")
TRAIN_PHOTOS: tuple[str, ...] = tuple(
    p.name for p in BUILTIN_PHOTOS if p.name not in HELDOUT_PHOTOS
)

_BY_NAME = {p.name: p for p in BUILTIN_PHOTOS}

_BUILTIN_SETS: dict[str, tuple[str, ...]] = {
    "builtin:photos": TRAIN_PHOTOS,
    "builtin:photos:heldout": HELDOUT_PHOTOS,
    "builtin:photos:all": tuple(_BY_NAME),
}


def split_builtin_photos() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (train, held-out) photo names: disjoint, together every built-in photo."""
    return TRAIN_PHOTOS, HELDOUT_PHOTOS


def load_builtin_photo(name: str) -> Tensor:
    """One built-in photo as a (3, H, W) float32 tensor in [0, 1]."""
    if name not in _BY_NAME:
        raise ImageReadError(f"unknown built-in photo {name!r} (known: {', '.join(_BY_NAME)})")
    return read_image(_BY_NAME[name].path)


SkipReport = Callable[[list[tuple[Path, str]]], None]


class ImageSource:
    """The images named by a data argument, decoded once and kept in memory.

    ``data`` is ``builtin:photos`` (train split), ``builtin:photos:heldout``,
    ``builtin:photos:all``, or a file, folder (recursive) or glob. Unreadable files in a folder
    are skipped, never fatal: they are kept in ``failures`` as (path, message), counted by
    ``skipped`` and reported once, through ``on_skip`` if given, else as a single warning. A
    missing built-in photo is an error: silently training on another set would change the recipe.
    """

    def __init__(self, data: str, on_skip: SkipReport | None = None) -> None:
        self.data = data
        self.names: list[str] = []
        self.images: list[Tensor] = []
        self.failures: list[tuple[Path, str]] = []
        if data.startswith("builtin:"):
            if data not in _BUILTIN_SETS:
                known = ", ".join(_BUILTIN_SETS)
                raise ImageReadError(f"unknown built-in data set {data!r} (known: {known})")
            for name in _BUILTIN_SETS[data]:
                self.names.append(name)
                self.images.append(load_builtin_photo(name))
        else:
            for path in list_images([data]):
                try:
                    self.images.append(read_image(path))
                    self.names.append(str(path))
                except ImageReadError as e:
                    self.failures.append((path, str(e)))
        if self.failures:
            (on_skip or _warn_skipped)(self.failures)
        if not self.images:
            raise ImageReadError(f"no readable images in {data} ({self.skipped} unreadable)")

    @property
    def skipped(self) -> int:
        """How many files were unreadable and left out."""
        return len(self.failures)

    def __len__(self) -> int:
        return len(self.images)


def _warn_skipped(failures: list[tuple[Path, str]]) -> None:
    lines = "\n".join(f"  {message}" for _, message in failures)
    warnings.warn(f"skipped {len(failures)} unreadable image(s):\n{lines}", stacklevel=3)


def _pair(crop: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (crop, crop) if isinstance(crop, int) else crop
    if h <= 0 or w <= 0:
        raise ValueError(f"crop size must be positive, got {crop}")
    return h, w


def _fit(image: Tensor, h: int, w: int) -> Tensor:
    """Upscale (bicubic, aspect kept) an image smaller than the crop so every crop is real content.

    Upscaling is chosen over padding: mirror padding invents symmetric structure and edge
    replication invents flat smears, both of which a tokenizer would learn to spend codes on.
    """
    ih, iw = image.shape[-2:]
    if ih >= h and iw >= w:
        return image
    s = max(h / ih, w / iw)
    size = (max(h, math.ceil(ih * s)), max(w, math.ceil(iw * s)))
    up = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)
    return up[0].clamp(0.0, 1.0)


def _crop(image: Tensor, h: int, w: int, g: torch.Generator, flip: bool) -> Tensor:
    ih, iw = image.shape[-2:]
    top = int(torch.randint(ih - h + 1, (1,), generator=g))
    left = int(torch.randint(iw - w + 1, (1,), generator=g))
    out = image[:, top : top + h, left : left + w]
    if flip and bool(torch.rand((), generator=g) < 0.5):
        return out.flip(-1)
    return out.clone()


def _stream_seed(seed: int, rank: int) -> int:
    """A well-mixed 63-bit seed per (seed, rank), so ranks draw independent streams."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class RandomCrops(IterableDataset[Tensor]):
    """Endless random (3, h, w) crops of in-memory images, reproducible and resumable.

    An image is picked with probability proportional to its area, so every pixel is about equally
    likely to be seen and large photos give more crops. Then a uniform position, then (if ``flip``)
    a horizontal flip with probability 1/2. The stream depends only on (``seed``, ``rank``);
    ``state_dict`` captures it exactly, so a restarted run continues bit for bit. Use it in the
    main process (``num_workers=0``): worker copies would repeat the same stream.
    """

    def __init__(
        self,
        images: Sequence[Tensor],
        crop: int | tuple[int, int],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = True,
    ) -> None:
        if not images:
            raise ValueError("RandomCrops needs at least one image")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.h, self.w = _pair(crop)
        self.images = [_fit(im, self.h, self.w) for im in images]
        self.seed, self.rank, self.flip = seed, rank, flip
        self.drawn = 0
        self._g = torch.Generator().manual_seed(_stream_seed(seed, rank))
        self._weights = torch.tensor([float(im.shape[-2] * im.shape[-1]) for im in self.images])

    def __iter__(self) -> Iterator[Tensor]:
        if get_worker_info() is not None:
            raise RuntimeError("RandomCrops needs num_workers=0 (workers would repeat its stream)")
        while True:
            yield self.draw()

    def draw(self) -> Tensor:
        """The next crop of the stream."""
        i = int(torch.multinomial(self._weights, 1, generator=self._g))
        self.drawn += 1
        return _crop(self.images[i], self.h, self.w, self._g, self.flip)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly: crops drawn and generator state."""
        rng = self._g.get_state()
        return {"seed": self.seed, "rank": self.rank, "drawn": self.drawn, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved stream; refuses a state from another seed or rank."""
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(
                f"crop state is for seed {state['seed']} rank {state['rank']}, "
                f"not seed {self.seed} rank {self.rank}"
            )
        self._g.set_state(state["rng"])
        self.drawn = int(state["drawn"])


def fixed_crops(
    images: Sequence[Tensor], crop: int | tuple[int, int], count: int, seed: int = 0
) -> Tensor:
    """Evaluation crops, identical on every call: crop i comes from image i mod n, unflipped.

    Round-robin (not area-weighted) so every held-out photo counts equally in a score.
    """
    if not images:
        raise ValueError("fixed_crops needs at least one image")
    h, w = _pair(crop)
    fitted = [_fit(im, h, w) for im in images]
    g = torch.Generator().manual_seed(seed)
    crops = [_crop(fitted[i % len(fitted)], h, w, g, flip=False) for i in range(count)]
    return torch.stack(crops) if crops else torch.empty(0, 3, h, w)


def batches(crops: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stack consecutive crops into (batch_size, 3, h, w) batches (a final short one if finite)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    it = iter(crops)
    while batch := list(islice(it, batch_size)):
        yield torch.stack(batch)
