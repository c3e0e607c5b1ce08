"""Reading and writing images as (3, H, W) float32 tensors in [0, 1].

Every reader failure becomes one :class:`~tatok_core.contract.errors.ImageReadError` whose one-line message
names the file and the reason, so the CLI can report it and a folder loader can skip the file.

Conventions (one place, so every tool sees the same pixels):

* grayscale is replicated to RGB; CMYK, YCbCr, palette and 1-bit go through Pillow's RGB conversion;
* transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited over **white**
  in float, because tokenizers have no alpha channel and white is how viewers show the empty page;
* single-channel 16-bit (``I;16*``) and 32-bit integer (``I``) images are divided by 65535 (and
  clipped), float (``F``) images are clipped to [0, 1]; multi-channel 16-bit files are reduced to
  8 bits by Pillow, which is below what an 8-bit-trained tokenizer can tell apart;
* the EXIF orientation tag is applied, so the tensor is upright as a viewer shows it;
* animated / multi-page files give their first frame.
"""

from __future__ import annotations

import glob
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from tatok_core.contract.errors import ImageReadError, TatokError
from tatok_core.io.atomic import atomic_write

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def read_image(path: str | os.PathLike[str]) -> Tensor:
    """Decode one image file to a (3, H, W) float32 tensor in [0, 1] (conventions: module doc)."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"cannot read image {p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"cannot read image {p}: it is a directory")
    try:
        with Image.open(p) as im:
            im.load()  # decode now, so truncation surfaces here and not on first pixel access
            return pil_to_tensor(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        reason = "not an image (unrecognised or corrupt format)"
    except Image.DecompressionBombError as e:
        reason = f"too large to decode safely ({e})"
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise
        text = " ".join(str(e).split()) or type(e).__name__
        reason = f"truncated file ({text})" if "truncat" in text.lower() else text
    raise ImageReadError(f"cannot read image {p}: {reason}")


def pil_to_tensor(im: Image.Image) -> Tensor:
    """Pillow image in any mode → (3, H, W) float32 in [0, 1]."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    elif im.mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        arr = rgba[..., :3] * alpha + (1.0 - alpha)  # over white
    else:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def write_image(path: str | os.PathLike[str], image: Tensor) -> None:
    """Save a (3, H, W) tensor as PNG (clamped, rounded to uint8), atomically.

    The file is written under a temporary name in the same folder and renamed over ``path``, so a
    crash or a concurrent reader never sees a half-written image.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"write_image expects a (3, H, W) tensor, got shape {tuple(image.shape)}")
    pixels = image.detach().float().cpu().nan_to_num(0.0).clamp(0.0, 1.0)
    arr = (pixels * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    p = Path(path)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    try:
        atomic_write(p, png.getvalue())
    except OSError as e:
        raise TatokError(f"cannot write image {p}: {e.strerror or e}") from e


def tile_images(images: Tensor, columns: int | None = None, pad: int = 2, fill: float = 1.0) -> Tensor:
    """Images (B, 3, H, W) → one contact sheet (3, H', W'), row-major, ``pad`` pixels of ``fill`` between.

    ``columns`` defaults to ⌈√B⌉, so a batch of samples reads as a near-square grid.
    """
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = -(-count // columns)
    blank = images.new_full((rows * columns - count, channels, height, width), fill)
    cells = F.pad(torch.cat([images, blank]), (0, pad, 0, pad), value=fill)  # (R·K, 3, H + pad, W + pad)
    sheet = rearrange(cells, "(r k) c h w -> c (r h) (k w)", k=columns)
    return F.pad(sheet, (pad, 0, pad, 0), value=fill)


def list_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, folders (recursive, sorted, by extension) and glob patterns into image paths.

    A file named explicitly is kept whatever its extension; folders and globs keep only files with
    an image extension. Duplicates are dropped, first occurrence wins. An input that names nothing
    (missing path, glob or folder without images) raises :class:`ImageReadError`.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        text = os.fspath(item)
        p = Path(text)
        if p.is_file():
            paths = [p]
        elif p.is_dir():
            paths = _images_under(p)
            if not paths:
                raise ImageReadError(f"folder {p} contains no images ({_ext_list()})")
        elif glob.has_magic(text):
            paths = []
            for m in map(Path, sorted(glob.glob(text, recursive=True))):
                if m.is_dir():
                    paths += _images_under(m)
                elif _is_image(m):
                    paths.append(m)
            if not paths:
                raise ImageReadError(f"pattern {text!r} matches no images ({_ext_list()})")
        else:
            raise ImageReadError(f"no such file or folder: {p}")
        found.update(dict.fromkeys(paths))
    return list(found)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _images_under(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*") if _is_image(q))


def _ext_list() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def fit_longest_side(image: Tensor, max_side: int) -> Tensor:
    """Downscale (C, H, W) so that max(H, W) ≤ ``max_side`` (antialiased bicubic); never upscales.

    Whole photos at full size cost seconds each on a CPU; a downscaled photo is still the whole photo,
    which is what evaluation on whole photos needs (crops hide the borders and the layout).
    """
    height, width = image.shape[-2:]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
