"""Training and evaluation images: the built-in photos, folders of files, tar shards, and the streams.

There is no network at run time, so the default data are real photographs that ship inside
scikit-image and scikit-learn. They are split into train and held-out **by photo** (never by crop),
so a held-out score measures images the tokenizer has never seen a pixel of.

Training reads every kind of data through one loader: :func:`open_source` turns a ``--data``
argument into a :class:`Source` (:class:`MemorySource` for the built-in sets, :class:`FileSource`
for folders and globs, :class:`ShardSource` for webdataset-style tar shards), and
:class:`StreamLoader` streams its samples through DataLoader workers, split over ranks and workers,
reproducibly and resumably (the scheme is described above :class:`SampleStream`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import io
import math
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tatok_core.workflows.debian_photos import DEBIAN_HELDOUT, DEBIAN_PHOTOS, DEBIAN_TRAIN
from tatok_core.contract.errors import ImageReadError, MissingExtraError
from tatok_core.contract.extras import missing_extra_message
from tatok_core.io.atomic import atomic_write_text
from tatok_core.io.images import IMAGE_EXTENSIONS, pil_to_tensor, list_images, read_image


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

_DEBIAN_BY_NAME = {p.name: p for p in DEBIAN_PHOTOS}

_BUILTIN_SETS: dict[str, tuple[str, ...]] = {
    "builtin:photos": TRAIN_PHOTOS,
    "builtin:photos:heldout": HELDOUT_PHOTOS,
    "builtin:photos:all": tuple(_BY_NAME),
    # the built-in photos plus the Debian ones (tatok_core.workflows.debian_photos): more real training photos
    "builtin:photos:extended": TRAIN_PHOTOS + DEBIAN_TRAIN,
    "builtin:photos:extended:heldout": HELDOUT_PHOTOS + DEBIAN_HELDOUT,
    "builtin:photos:extended:all": tuple(_BY_NAME) + tuple(_DEBIAN_BY_NAME),
}


def split_builtin_photos() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (train, held-out) photo names: disjoint, together every built-in photo."""
    return TRAIN_PHOTOS, HELDOUT_PHOTOS


def load_builtin_photo(name: str) -> Tensor:
    """One built-in photo as a (3, H, W) float32 tensor in [0, 1]."""
    if name in _DEBIAN_BY_NAME:
        return _DEBIAN_BY_NAME[name].load()
    if name not in _BY_NAME:
        raise ImageReadError(f"unknown built-in photo {name!r} (known: {', '.join((*_BY_NAME, *_DEBIAN_BY_NAME))})")
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


# ---- streaming: one loader for built-in photos, folders of files and tar shards ---------------
#
# A *source* is a sequence of units (a file, a tar shard, or a crop slot of an in-memory photo),
# each holding one or more samples. Every epoch permutes the units (seeded by seed and epoch); the
# epochs are concatenated into one endless unit sequence G, and the world's S = ranks × workers
# *streams* deal it out: stream s takes G[s], G[s + S], G[s + 2S], … so no unit is read twice in an
# epoch and none is lost. A stream's position is a cursor (its t-th unit, j-th sample of it), so a
# resumed run jumps straight back to where the stream was. Every sample's augmentation is drawn from
# a generator seeded by (seed, position in G, sample), independent of who reads it.

TAR_SUFFIX = ".tar"
MAX_CONSECUTIVE_FAILURES = 1000
_EPOCH, _ORDER, _SAMPLE = 1, 2, 3  # first word of every seed: the three generators never coincide
_TAR_IMAGE_EXTENSIONS = tuple(sorted({ext.lstrip(".") for ext in IMAGE_EXTENSIONS}))


def _seed_of(*words: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), for per-sample generators."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _decode_bytes(data: bytes, name: str) -> Tensor:
    """Decode an image held in memory (a tar member) with read_image's conventions and messages."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_tensor(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        reason = "not an image (unrecognised or corrupt format)"
    except Image.DecompressionBombError as e:
        reason = f"too large to decode safely ({e})"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        reason = f"truncated file ({text})" if "truncat" in text.lower() else text
    raise ImageReadError(f"cannot read image {name}: {reason}")


class Unit:
    """The samples of one unit, opened in a loader worker: ``len`` samples, read by position."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> Tensor:
        """Sample ``index`` as a (3, H, W) float32 tensor in [0, 1]; ImageReadError if unreadable."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the unit holds open (a shard's file)."""


class Source:
    """What a data argument names: ``len(source)`` units, opened one at a time in workers."""

    description: str
    shuffle_within_units: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def open(self, unit: int) -> Unit:
        """Open unit ``unit``; ImageReadError when it is unreadable (then it is skipped)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the unit list, so a resumed run refuses data that changed under it."""
        raise NotImplementedError


class _FileUnit(Unit):
    def __init__(self, path: str) -> None:
        self.path = path

    def __len__(self) -> int:
        return 1

    def read(self, index: int) -> Tensor:
        return read_image(self.path)

    def name(self, index: int) -> str:
        return self.path


class FileSource(Source):
    """Image files (a folder searched recursively, a glob, a file), listed once.

    The listing is kept as one numpy byte-string array, not a list of Python strings: forked loader
    workers then share its pages instead of copying them as reference counts change, so memory
    stays flat with millions of files. With ``listing`` (a path) the listing is written there on
    first use and read back afterwards, so a resumed run sees exactly the files it started with.
    """

    def __init__(self, data: str, listing: Path | None = None) -> None:
        self.description = data
        cached = _read_listing(listing, data) if listing is not None else None
        if cached is None:
            paths = _list_files(data)
            if listing is not None:
                _write_listing(listing, data, paths)
        else:
            paths = cached
        self.paths = np.array([p.encode("utf-8", "surrogateescape") for p in paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, unit: int) -> str:
        return bytes(self.paths[unit]).decode("utf-8", "surrogateescape")

    def open(self, unit: int) -> Unit:
        return _FileUnit(self.path(unit))

    def fingerprint(self) -> str:
        return _digest(self.description, self.paths.tobytes())


def _list_files(data: str) -> list[str]:
    """Sorted image paths under a folder (os.scandir walk: no Path object per file), or list_images."""
    root = Path(data)
    if not root.is_dir():
        return [str(p) for p in list_images([data])]
    found: list[str] = []
    pending = [str(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(entry.path)
    if not found:
        raise ImageReadError(f"folder {root} contains no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
    found.sort()
    return found


def _read_listing(listing: Path, data: str) -> list[str] | None:
    if not listing.is_file():
        return None
    header, _, body = listing.read_text(encoding="utf-8", errors="surrogateescape").partition("\n")
    if header != f"# {data}":
        return None
    return body.splitlines()


def _write_listing(listing: Path, data: str, paths: list[str]) -> None:
    listing.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(listing, f"# {data}\n" + "".join(p + "\n" for p in paths), errors="surrogateescape")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def _split_key(member: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/n0153_12.seg.png`` → key ``dir/n0153_12``, extension ``seg.png``."""
    folder, base = os.path.split(member)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _ShardUnit(Unit):
    """One tar shard: samples are webdataset-style groups of consecutive members sharing a key (path
    minus extensions); the image is the group's first member with an image extension (so a ``.seg.png``
    after a ``.jpg`` is not a sample). Opening indexes the headers once; samples are read by offset,
    which is what lets a resumed stream start in the middle of a shard."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.samples: list[tuple[str, int, int]] = []  # (key, data offset, size)
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
            with tarfile.open(fileobj=self.file, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    is_image = ext.rsplit(".", 1)[-1] in _TAR_IMAGE_EXTENSIONS
                    if is_image and not (self.samples and self.samples[-1][0] == key):  # first image of a key
                        self.samples.append((key, member.offset_data, member.size))
        except (OSError, tarfile.TarError) as e:
            raise ImageReadError(f"cannot read shard {path}: {' '.join(str(e).split()) or type(e).__name__}") from e
        if not self.samples:
            self.file.close()
            raise ImageReadError(f"shard {path} holds no images")

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Tensor:
        key, offset, size = self.samples[index]
        self.file.seek(offset)
        data = self.file.read(size)
        if len(data) != size:
            raise ImageReadError(f"cannot read image {self.name(index)}: truncated shard")
        return _decode_bytes(data, self.name(index))

    def name(self, index: int) -> str:
        return f"{self.path}:{self.samples[index][0]}"

    def close(self) -> None:
        self.file.close()


class ShardSource(Source):
    """webdataset-style tar shards: paths, globs and brace patterns such as ``train-{0000..1023}.tar``.

    Shards are the units: shuffled per epoch and dealt out to the streams; the samples inside a
    shard are read in a seeded random order. Write shards from a shuffled file list (as webdataset
    recommends), since one batch of one worker comes from one shard.
    """

    shuffle_within_units = True

    def __init__(self, data: str) -> None:
        self.description = data
        self.shards = expand_shards(data)

    def __len__(self) -> int:
        return len(self.shards)

    def open(self, unit: int) -> Unit:
        return _ShardUnit(self.shards[unit])

    def fingerprint(self) -> str:
        return _digest(self.description, "\n".join(self.shards))


def is_shard_pattern(data: str) -> bool:
    """A data argument naming tar shards (after brace expansion every name ends in ``.tar``)."""
    return data.endswith(TAR_SUFFIX) or data.endswith(TAR_SUFFIX + "}")


def expand_shards(data: str) -> list[str]:
    """Brace patterns (via ``braceexpand``, webdataset's own expander) and globs → existing shard paths."""
    if "{" in data:
        try:
            from braceexpand import braceexpand
        except ImportError as e:
            raise ImageReadError(
                f"brace pattern {data!r} needs the braceexpand package: pip install 'tatok[stream]'") from e
        names = list(braceexpand(data))
    else:
        names = [data]
    shards: list[str] = []
    missing: list[str] = []
    for name in names:
        if glob.has_magic(name):
            shards += sorted(glob.glob(name, recursive=True))
        elif Path(name).is_file():
            shards.append(name)
        else:
            missing.append(name)
    if missing:
        raise ImageReadError(f"{len(missing)} of {len(names)} shard(s) named by {data!r} do not exist (first: {missing[0]})")
    if not shards:
        raise ImageReadError(f"shard pattern {data!r} matches no files")
    return list(dict.fromkeys(shards))


class _MemoryUnit(Unit):
    def __init__(self, image: Tensor, name: str) -> None:
        self.image, self._name = image, name

    def __len__(self) -> int:
        return 1

    def read(self, index: int) -> Tensor:
        return self.image

    def name(self, index: int) -> str:
        return self._name


class MemorySource(Source):
    """Small sets decoded once in memory (the built-in photos). Forked workers share the pixels.

    A unit is a *crop slot*: photo i has ⌈area_i / crop area⌉ of them, so an epoch visits each photo
    in proportion to its area (every pixel about equally often, as :class:`RandomCrops`).
    """

    def __init__(self, images: Sequence[Tensor], names: Sequence[str], crop: int, description: str) -> None:
        if not images:
            raise ImageReadError(f"no readable images in {description}")
        self.description = description
        self.images = [_fit(im, crop, crop) for im in images]
        self.names = list(names)
        slots = [math.ceil(im.shape[-2] * im.shape[-1] / crop**2) for im in self.images]
        self.slot_ends = np.cumsum(slots)

    def __len__(self) -> int:
        return int(self.slot_ends[-1])

    def open(self, unit: int) -> Unit:
        i = int(np.searchsorted(self.slot_ends, unit, side="right"))
        return _MemoryUnit(self.images[i], self.names[i])

    def fingerprint(self) -> str:
        return _digest(self.description, ",".join(self.names), self.slot_ends.tobytes())


def open_source(data: str, crop: int, listing: Path | None = None) -> Source:
    """The source a ``--data`` argument names; fails at once (one line) when it names nothing."""
    if data.startswith("builtin:"):
        loaded = ImageSource(data)
        return MemorySource(loaded.images, loaded.names, crop, data)
    if is_shard_pattern(data):
        return ShardSource(data)
    return FileSource(data, listing)


# ---- augmentation --------------------------------------------------------------------------


@attrs.frozen
class Augment:
    """How a sample becomes a training or evaluation image of ``crop``².

    ``mode``: ``"random"`` (a random crop at the image's own scale; smaller images upscaled first),
    ``"resized"`` (a random-resized crop: area fraction in [``scale_min``, 1], aspect ratio in
    [3/4, 4/3], resized to the crop, as ImageNet training does), ``"zoomed"`` (the whole image scaled
    by a log-uniform factor in [``zoom_min``, 1], aspect kept, then a random crop: the crops see the
    scene at the scales the model will meet, e.g. photos shown whole at 256 px when the training copies
    are 512 px) or ``"center"`` (shorter side resized to the crop, centre crop: evaluation).
    ``flip``: horizontal flip with probability 1/2.
    """

    crop: int
    mode: str = attrs.field(default="random",
                            validator=attrs.validators.in_(("random", "resized", "zoomed", "center")))
    scale_min: float = 0.8
    zoom_min: float = 0.5
    flip: bool = True

    def __call__(self, image: Tensor, g: torch.Generator) -> Tensor:
        """(3, H, W) → (3, crop, crop)."""
        c = self.crop
        if self.mode == "center":
            out = _center_crop(image, c)
        elif self.mode == "resized":
            out = _resize(_random_box(image, self.scale_min, g), c, c)
        elif self.mode == "zoomed":
            out = _crop(_fit(_zoom(image, self.zoom_min, g), c, c), c, c, g, flip=False)
        else:
            out = _crop(_fit(image, c, c), c, c, g, flip=False)
        if self.flip and self.mode != "center" and bool(torch.rand((), generator=g) < 0.5):
            out = out.flip(-1)
        return out.contiguous()


def _resize(image: Tensor, h: int, w: int) -> Tensor:
    if image.shape[-2:] == (h, w):
        return image
    out = F.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0.0, 1.0)


def _zoom(image: Tensor, zoom_min: float, g: torch.Generator) -> Tensor:
    """The whole image scaled by a log-uniform factor in [``zoom_min``, 1] (aspect kept, antialiased)."""
    factor = math.exp(math.log(zoom_min) * float(torch.rand((), generator=g)))
    ih, iw = image.shape[-2:]
    return _resize(image, max(1, round(ih * factor)), max(1, round(iw * factor)))


def _center_crop(image: Tensor, c: int) -> Tensor:
    ih, iw = image.shape[-2:]
    s = c / min(ih, iw)
    image = _resize(image, max(c, round(ih * s)), max(c, round(iw * s)))
    ih, iw = image.shape[-2:]
    top, left = (ih - c) // 2, (iw - c) // 2
    return image[:, top : top + c, left : left + c]


def _random_box(image: Tensor, scale_min: float, g: torch.Generator) -> Tensor:
    """A random region of area fraction U(scale_min, 1) and log-uniform aspect in [3/4, 4/3]."""
    ih, iw = image.shape[-2:]
    for _ in range(10):
        area = ih * iw * (scale_min + (1 - scale_min) * float(torch.rand((), generator=g)))
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=g)))
        h, w = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
        if 0 < h <= ih and 0 < w <= iw:
            top = int(torch.randint(ih - h + 1, (1,), generator=g))
            left = int(torch.randint(iw - w + 1, (1,), generator=g))
            return image[:, top : top + h, left : left + w]
    side = min(ih, iw)  # every draw fell outside: the largest centred square
    return image[:, (ih - side) // 2 : (ih - side) // 2 + side, (iw - side) // 2 : (iw - side) // 2 + side]


# ---- the stream and its loader -----------------------------------------------------------------

Cursor = tuple[int, int]  # (t: the stream's t-th unit, j: next sample of it)


class SampleStream(IterableDataset[dict[str, Any]]):
    """One rank's endless batches, produced by its ``workers`` loader processes (or the main one).

    Logical stream ``l`` of rank ``r`` is global stream ``r · W + l``; DataLoader worker ``w`` plays
    logical stream ``(w + rotation) mod W``, so a resumed loader whose next batch is the b-th hands
    it to the stream that would have produced it (DataLoader asks its workers round-robin). Each item
    is a dict: ``images`` (B, 3, crop, crop), ``stream``, ``cursor`` after the batch, and ``failures``
    (one-line messages of the samples skipped on the way), or ``error`` when nothing is readable.
    """

    def __init__(self, source: Source, augment: Augment, batch_size: int, *, seed: int, rank: int,
                 world_size: int, workers: int, cursors: Sequence[Cursor] | None = None, rotation: int = 0) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.source, self.augment, self.batch_size = source, augment, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.streams = max(1, workers)
        self.cursors = list(cursors) if cursors is not None else [(0, 0)] * self.streams
        self.rotation = rotation
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        logical = ((info.id if info is not None else 0) + self.rotation) % self.streams
        return self.batches(logical)

    def unit_at(self, position: int) -> int:
        """The unit at ``position`` of the endless sequence G (concatenated per-epoch permutations)."""
        epoch, k = divmod(position, len(self.source))
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(_seed_of(_EPOCH, self.seed, epoch)))
            self._epoch_cache = (epoch, rng.permutation(len(self.source)))
        return int(self._epoch_cache[1][k])

    def batches(self, logical: int) -> Iterator[dict[str, Any]]:
        """Batches of logical stream ``logical``, from its saved cursor on."""
        total = self.world_size * self.streams
        stream = self.rank * self.streams + logical
        t, j = self.cursors[logical]
        images: list[Tensor] = []
        failures: list[str] = []
        consecutive = 0
        while True:
            position = stream + t * total
            try:
                unit = self.source.open(self.unit_at(position))
            except ImageReadError as e:
                failures.append(str(e))
                consecutive += 1
                unit = None
            if unit is not None:
                try:
                    order = self._order(unit, position)
                    while j < len(unit):
                        g = torch.Generator().manual_seed(_seed_of(_SAMPLE, self.seed, position, j))
                        index = order[j]
                        j += 1
                        try:
                            images.append(self.augment(unit.read(index), g))
                            consecutive = 0
                        except ImageReadError as e:
                            failures.append(str(e))
                            consecutive += 1
                        if consecutive >= MAX_CONSECUTIVE_FAILURES:
                            break
                        if len(images) == self.batch_size:
                            yield {"images": torch.stack(images), "stream": logical, "cursor": (t, j),
                                   "failures": failures}
                            images, failures = [], []
                finally:
                    unit.close()
            if consecutive >= MAX_CONSECUTIVE_FAILURES:
                yield {"error": f"no readable image in {self.source.description}: {consecutive} samples in a row "
                                f"failed (last: {failures[-1]})"}
                return
            t, j = t + 1, 0

    def _order(self, unit: Unit, position: int) -> Sequence[int]:
        if not self.source.shuffle_within_units or len(unit) == 1:
            return range(len(unit))
        return np.random.Generator(np.random.PCG64(_seed_of(_ORDER, self.seed, position))).permutation(len(unit))


def _quiet_worker(worker_id: int) -> None:
    """Loader workers decode one image at a time: one thread each, so they do not starve training."""
    torch.set_num_threads(1)


class StreamLoader:
    """A rank's endless training batches through a DataLoader with ``workers`` processes, resumable.

    ``state_dict`` holds every logical stream's cursor after the last batch *handed out* (batches
    the workers prefetched beyond it are read again after a resume) and how many were handed out, so
    a restarted loader continues the exact batch sequence. Skipped samples are passed to ``on_skip``
    (one-line message each) and counted in ``skipped``.
    """

    def __init__(self, source: Source, augment: Augment, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, on_skip: Callable[[str], None] | None = None,
                 pin_memory: bool = False) -> None:
        if workers < 0:
            raise ValueError(f"workers must be ≥ 0, got {workers}")
        self.source, self.augment, self.batch_size = source, augment, batch_size
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.on_skip, self.pin_memory = on_skip, pin_memory
        self.cursors: list[Cursor] = [(0, 0)] * max(1, workers)
        self.batches = 0
        self.skipped = 0

    def __iter__(self) -> Iterator[Tensor]:
        dataset = SampleStream(self.source, self.augment, self.batch_size, seed=self.seed, rank=self.rank,
                               world_size=self.world_size, workers=self.workers, cursors=self.cursors,
                               rotation=self.batches % max(1, self.workers))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            worker_init_fn=_quiet_worker if self.workers else None,
                            generator=torch.Generator().manual_seed(self.seed))  # leaves the global RNG alone
        for item in loader:
            if "error" in item:
                raise ImageReadError(item["error"])
            for message in item["failures"]:
                self.skipped += 1
                if self.on_skip is not None:
                    self.on_skip(message)
            self.cursors[item["stream"]] = tuple(int(v) for v in item["cursor"])
            self.batches += 1
            yield item["images"]

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.source.fingerprint(), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "workers": self.workers, "batches": self.batches,
                "cursors": list(self.cursors), "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved loader; refuses other data, seed, rank layout or worker count."""
        mine = self.state_dict()
        for key, what in (("fingerprint", "data"), ("seed", "seed"), ("rank", "rank"),
                          ("world_size", "number of processes"), ("workers", "number of loader workers")):
            if state[key] != mine[key]:
                raise ImageReadError(
                    f"cannot resume the data stream: the checkpoint's {what} ({state[key]}) differs from this "
                    f"run's ({mine[key]}); the sample stream depends on it")
        self.cursors = [tuple(c) for c in state["cursors"]]
        self.batches, self.skipped = int(state["batches"]), int(state["skipped"])


def evaluation_images(data: str, crop: int, count: int, *, seed: int = 0, listing: Path | None = None,
                      on_skip: Callable[[str], None] | None = None) -> Tensor:
    """Fixed (count, 3, crop, crop) evaluation images, identical on every call.

    Built-in sets: :func:`fixed_crops` (round-robin over the photos). Folders and shards: the centre
    crop of the first ``count`` readable samples in listing order (unreadable ones skipped).
    """
    if data.startswith("builtin:"):
        return fixed_crops(ImageSource(data).images, crop, count, seed=seed)
    source = open_source(data, crop, listing)
    center = Augment(crop, mode="center", flip=False)
    images: list[Tensor] = []
    g = torch.Generator().manual_seed(seed)
    for u in range(len(source)):
        try:
            unit = source.open(u)
        except ImageReadError as e:
            if on_skip is not None:
                on_skip(str(e))
            continue
        try:
            for index in range(len(unit)):
                if len(images) == count:
                    break
                try:
                    images.append(center(unit.read(index), g))
                except ImageReadError as e:
                    if on_skip is not None:
                        on_skip(str(e))
        finally:
            unit.close()
        if len(images) == count:
            break
    if not images:
        raise ImageReadError(f"no readable evaluation images in {data}")
    return torch.stack(images)
