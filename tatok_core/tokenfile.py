"""The on-disk format of TaTok tokens, version 1: what downstream models train on.

Layout
------
A token data set is a directory of shards ``shard-00000.safetensors``, ``shard-00001.safetensors``, …
(``shard-r{rank}-{i:05d}.safetensors`` when written by one rank of a ``torchrun`` job, so ranks never
collide), or a single shard file. Image order is shard order — (rank, index), unranked shards first —
then order within a shard. Every shard is a standard safetensors file, readable by any safetensors
tool, holding I images in packed ("varlen") form:

==================  ========  ====================================================================
tensor              shape     dtype / meaning
==================  ========  ====================================================================
``global_codes``    (I, M)    global codes of each image
``codes``           (K,)      kept patch codes, images concatenated
``positions``       (K,)      raster positions of those codes, increasing within each image
``cu_seqlens``      (I+1,)    int64; image i owns ``[cu_seqlens[i], cu_seqlens[i+1])``
``grids``           (I, 2)    int64; (rows, cols) of patches per image — a shard may mix grids
``image_sizes``     (I, 2)    int64; original (H, W) per image
==================  ========  ====================================================================

``global_codes``, ``codes`` and ``positions`` are each stored as the narrowest of uint8, int16, int32,
int64 that holds all of that tensor's values in that shard (codes are often < 2^15, positions < 256),
which halves to eighths the size of a shard; readers always return int64, the :class:`Tokens`
convention.

Metadata (safetensors ``__metadata__``, string → string):

* ``format`` = ``"tatok.tokens"``; ``format_version`` = ``"1"`` (:data:`FORMAT_VERSION`);
* ``spec_digest`` — :meth:`PipelineSpec.digest` of the tokenizer; ``tokenizer`` — its name;
* ``meta`` — canonical JSON object (sorted keys, no NaN) that must hold ``codebook_size``,
  ``num_global`` and ``patch_size`` (ints) and by convention ``code_factors``, the rate control
  (``tau`` or ``budget``) and ``filter`` (``{"name": ..., "options": {...}}``);
* ``sources`` — JSON list of ``[file name, byte size]``, one per image;
* ``tool_version`` — the tatok version that wrote the shard (may differ between appended shards);
* ``checksum`` — ``"sha256:" + hex(sha256(H || P))`` with P the tensor payload (every byte after the
  header) and H the canonical JSON of the header with ``checksum`` removed, so it covers the data,
  every tensor's dtype/shape/offsets and all other metadata.

All shards of one data set share ``format_version``, ``spec_digest``, ``tokenizer`` and ``meta``.

Guarantees
----------
* Deterministic bytes: the header is canonical JSON (sorted keys, compact, space-padded to 8 bytes;
  safetensors' own writer orders metadata keys by hash) and nothing depends on time or process, so the
  same tokens and metadata give identical files.
* Atomic: a :class:`TokenWriter` writes its shards into a hidden sibling temp directory and moves them
  into place only at :meth:`TokenWriter.close`; an exception inside its ``with`` block removes the temp
  directory, leaving the target exactly as it was (no data-set directory is created).
* Checked: opening reads only headers and checks that each file's size matches its header (catches
  truncation) and that shards agree. Checksums are verified lazily, once per shard, before any data of
  that shard is returned — opening a million-image set stays instant, and no byte is served
  unverified. :meth:`TokenDataset.verify` checks every shard up front.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from tatok_core import __version__
from tatok_core.errors import TokenFileError
from tatok_core.tokens import ImageTokens, Tokens

FORMAT = "tatok.tokens"
FORMAT_VERSION = 1
REQUIRED_META = ("codebook_size", "num_global", "patch_size")
TENSORS = frozenset({"global_codes", "codes", "positions", "cu_seqlens", "grids", "image_sizes"})
_SHARD_RE = re.compile(r"shard-(?:r(\d+)-)?(\d+)\.safetensors")
_MAX_HEADER = 100_000_000  # safetensors' own limit
_Index = tuple[list[int], list[tuple[int, int]], list[tuple[int, int]], list[tuple[str, int]]]


@attrs.frozen(eq=False)
class StoredImageTokens(ImageTokens):
    """One image read back from a token file, with the file it was encoded from."""

    source: str
    source_bytes: int


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _checksum(header: Mapping[str, Any], payload_chunks: Iterator[bytes]) -> str:
    head = dict(header, __metadata__={k: v for k, v in header["__metadata__"].items() if k != "checksum"})
    digest = hashlib.sha256(_canonical(head).encode())
    for chunk in payload_chunks:
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _narrow(t: Tensor) -> Tensor:
    """The narrowest of uint8/int16/int32/int64 holding every value of ``t``: a function of the values only."""
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return t.to(torch.int64)


def _shard_name(rank: int | None, index: int) -> str:
    return f"shard-{index:05d}.safetensors" if rank is None else f"shard-r{rank}-{index:05d}.safetensors"


def _list_shards(directory: Path) -> list[tuple[int, int, Path]]:
    """(rank or -1, index, path) of every shard in ``directory``, in data-set order."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _SHARD_RE.fullmatch(p.name)
        if m:
            found.append((int(m[1]) if m[1] is not None else -1, int(m[2]), p))
    return sorted(found)


def _digest_mismatch(path: Path, found: str, expected: str) -> TokenFileError:
    return TokenFileError(
        f"{path}: token file from another tokenizer: written with spec digest {found!r}, expected {expected!r}"
    )


class _Shard:
    """One shard file: header read at open; checksum, index and data loaded on first use."""

    def __init__(self, path: Path) -> None:
        """Read the header; check the format, the version and that the file is whole."""
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > min(size - 8, _MAX_HEADER):
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
            meta: dict[str, str] = dict(header["__metadata__"])
            self.count: int = header["cu_seqlens"]["shape"][0] - 1
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise TokenFileError(f"{path}: not a readable token shard ({exc})") from exc
        if meta.get("format") != FORMAT or set(header) - {"__metadata__"} != TENSORS:
            raise TokenFileError(f"{path}: not a TaTok token shard (format {meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise TokenFileError(
                f"{path}: token format version {meta.get('format_version')!r}; this tatok reads version "
                f"{FORMAT_VERSION} — use the tatok version that wrote it ({meta.get('tool_version')})"
            )
        if 8 + n + end != size:
            raise TokenFileError(f"{path}: truncated or damaged: header describes {8 + n + end} bytes, file has {size}")
        self.header_len, self.header, self.meta = n, header, meta
        self._verified = False
        self._handle: Any = None
        self._index: _Index | None = None

    def __getstate__(self) -> dict[str, Any]:  # safetensors handles do not pickle (DataLoader workers)
        return dict(self.__dict__, _handle=None)

    def verify(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(8 + self.header_len)
            found = _checksum(self.header, iter(lambda: f.read(1 << 20), b""))
        if found != self.meta.get("checksum"):
            raise TokenFileError(
                f"{self.path}: checksum mismatch (stored {self.meta.get('checksum')}, computed {found}): "
                "the file was modified or corrupted after it was written"
            )
        self._verified = True

    @property
    def handle(self) -> Any:
        """The safetensors memory map, opened only after the checksum was verified."""
        if self._handle is None:
            if not self._verified:
                self.verify()
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except SafetensorError as exc:
                raise TokenFileError(f"{self.path}: {exc}") from exc
        return self._handle

    def index(self) -> _Index:
        """(cu_seqlens, grids, image sizes, sources), after verifying the checksum once."""
        if self._index is None:
            h = self.handle
            bounds = h.get_tensor("cu_seqlens").tolist()
            grids = [tuple(g) for g in h.get_tensor("grids").tolist()]
            sizes = [tuple(s) for s in h.get_tensor("image_sizes").tolist()]
            self._index = (bounds, grids, sizes, [(n, b) for n, b in json.loads(self.meta["sources"])])
        return self._index

    def image(self, j: int, global_codes: Tensor, codes: Tensor, positions: Tensor) -> StoredImageTokens:
        _, grids, sizes, sources = self.index()
        return StoredImageTokens(
            global_codes=global_codes.to(torch.int64),
            codes=codes.to(torch.int64),
            positions=positions.to(torch.int64),
            grid=grids[j],
            image_size=sizes[j],
            source=sources[j][0],
            source_bytes=sources[j][1],
        )

    def images(self) -> Iterator[StoredImageTokens]:
        """Every image, reading the shard's data in one go (for sequential access)."""
        bounds = self.index()[0]
        g, c, p = (self.handle.get_tensor(k).to(torch.int64) for k in ("global_codes", "codes", "positions"))
        for j in range(self.count):
            yield self.image(j, g[j], c[bounds[j] : bounds[j + 1]], p[bounds[j] : bounds[j + 1]])


class TokenWriter:
    """Writes :class:`Tokens` batches into a token data set (see the module docs for the format).

    ``path`` is a directory, or a ``*.safetensors`` file for a single-shard set (no ``append`` or
    ``rank`` then). Shards appear only at :meth:`close`; images are validated as they are written, so
    a bad batch raises before anything reaches disk. Under ``torchrun`` every rank opens the same
    directory with its own ``rank``; a directory that already holds shards needs ``append=True``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        spec_digest: str,
        tokenizer: str,
        meta: Mapping[str, Any],
        shard_size: int = 4096,
        rank: int | None = None,
        append: bool = False,
    ) -> None:
        self.path = Path(path)
        self._single = self.path.suffix == ".safetensors"
        if shard_size < 1 or (rank is not None and rank < 0):
            raise TokenFileError(f"{self.path}: shard_size must be >= 1 and rank >= 0 (got {shard_size}, {rank})")
        for key in REQUIRED_META:
            value, least = meta.get(key), 0 if key == "num_global" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TokenFileError(f"{self.path}: meta[{key!r}] must be an int >= {least}, got {value!r}")
        if set(meta) & {"format_version", "spec_digest", "tokenizer"}:
            raise TokenFileError(f"{self.path}: meta may not redefine format_version, spec_digest or tokenizer")
        self._meta = dict(meta)
        self._header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "spec_digest": spec_digest,
            "tokenizer": tokenizer,
            "tool_version": __version__,
            "meta": _canonical(self._meta),
        }
        self._shard_size, self._rank = shard_size, rank
        self._buffer: list[tuple[ImageTokens, tuple[str, int]]] = []
        self._written: list[str] = []
        self._tmp: Path | None = None
        self._closed = False
        self._next = 0
        self._had_shards = False
        if self._single:
            if append or rank is not None:
                raise TokenFileError(f"{self.path}: a single-file token set cannot be appended to or split by rank")
            if self.path.exists():
                raise TokenFileError(f"{self.path}: already exists; remove it or choose another name")
            return
        if self.path.exists() and not self.path.is_dir():
            raise TokenFileError(f"{self.path}: exists and is not a directory")
        existing = _list_shards(self.path)
        if existing and not append:
            raise TokenFileError(
                f"{self.path}: holds {len(existing)} shard(s) already; pass append=True or use a new directory"
            )
        if existing:
            self._check_same_set(existing[0][2])
        self._had_shards = bool(existing)
        own = [i for r, i, _ in existing if r == (-1 if rank is None else rank)]
        self._next = max(own, default=-1) + 1

    def _check_same_set(self, shard: Path) -> None:
        found = _Shard(shard).meta
        if found["spec_digest"] != self._header["spec_digest"]:
            raise _digest_mismatch(shard, found["spec_digest"], self._header["spec_digest"])
        for key in ("tokenizer", "meta"):
            if found[key] != self._header[key]:
                raise TokenFileError(f"{shard}: cannot append: {key} is {found[key]} there, {self._header[key]} here")

    def update_meta(self, extra: Mapping[str, Any]) -> None:
        """Add ``meta`` keys known only once encoding has begun (a budget's calibrated threshold).

        Only before the first image is written, so every shard of the set carries the same meta.
        """
        if self._buffer or self._written or self._had_shards or self._closed:
            raise TokenFileError(f"{self.path}: meta can change only before the first image is written")
        if set(extra) & (set(REQUIRED_META) | {"format_version", "spec_digest", "tokenizer"}):
            raise TokenFileError(f"{self.path}: update_meta may not change {sorted(set(extra) & set(REQUIRED_META))}")
        self._meta.update(extra)
        self._header["meta"] = _canonical(self._meta)

    def write(self, tokens: Tokens, sources: Sequence[tuple[str, int]]) -> None:
        """Append a batch; ``sources[b]`` = (file name, byte size) of image b."""
        if self._closed:
            raise TokenFileError(f"{self.path}: writer is closed")
        t = tokens.to("cpu")
        self._validate(t, sources)
        self._buffer.extend(zip(t.per_image(), [(name, nbytes) for name, nbytes in sources]))
        while not self._single and len(self._buffer) >= self._shard_size:
            self._flush(self._buffer[: self._shard_size])
            del self._buffer[: self._shard_size]

    def _validate(self, t: Tokens, sources: Sequence[tuple[str, int]]) -> None:
        """Reject tokens this data set could not describe, before they reach disk."""
        codebook, num_global = self._meta["codebook_size"], self._meta["num_global"]
        cu = t.cu_seqlens.to(torch.int64)
        problems = [
            (len(sources) != t.batch_size, f"{len(sources)} sources for {t.batch_size} images"),
            (any(x.is_floating_point() for x in (t.global_codes, t.codes, t.positions)), "codes must be integers"),
            (t.global_codes.dim() != 2 or t.global_codes.shape[1] != num_global,
             f"global_codes {tuple(t.global_codes.shape)}, meta says num_global={num_global}"),
            (int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != t.codes.numel(),
             "cu_seqlens must rise from 0 to the number of codes"),
            (any(bool(((x < 0) | (x >= codebook)).any()) for x in (t.codes, t.global_codes)),
             f"codes outside [0, codebook_size={codebook})"),
            (bool(((t.positions < 0) | (t.positions >= t.num_patches)).any()), f"positions outside grid {t.grid}"),
            (any(not (isinstance(n, str) and isinstance(b, int) and b >= 0) for n, b in sources),
             "sources must be (str name, int byte size >= 0) pairs"),
        ]
        if not any(bad for bad, _ in problems[:4]):  # row ids need a valid cu_seqlens
            rows = t.row_ids()
            same = rows[1:] == rows[:-1]
            problems.append((bool((t.positions[1:][same] <= t.positions[:-1][same]).any()),
                             "positions must increase within each image"))
        for bad, what in problems:
            if bad:
                raise TokenFileError(f"{self.path}: cannot write these tokens: {what}")

    def _flush(self, items: Sequence[tuple[ImageTokens, tuple[str, int]]]) -> None:
        images = [im for im, _ in items]
        lengths = torch.tensor([im.codes.numel() for im in images], dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)  # seeds each cat, so an empty shard has the right shapes
        tensors = {
            "global_codes": _narrow(
                torch.cat([empty.reshape(0, self._meta["num_global"]), *(im.global_codes[None] for im in images)])
            ),
            "codes": _narrow(torch.cat([empty, *(im.codes for im in images)])),
            "positions": _narrow(torch.cat([empty, *(im.positions for im in images)])),
            "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]),
            "grids": torch.tensor([im.grid for im in images], dtype=torch.int64).reshape(-1, 2),
            "image_sizes": torch.tensor([im.image_size for im in images], dtype=torch.int64).reshape(-1, 2),
        }
        data = _serialize(tensors, {**self._header, "sources": _canonical([list(s) for _, s in items])})
        if self._tmp is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        name = self.path.name if self._single else _shard_name(self._rank, self._next)
        with open(self._tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._written.append(name)
        self._next += 1

    def close(self) -> None:
        """Flush the last shard and move every shard into place.

        A new set that received no images still gets one empty shard, so it exists and records its
        tokenizer. Each shard appears atomically; they appear one after another.
        """
        if self._closed:
            return
        try:
            if self._buffer or not (self._written or self._had_shards):
                self._flush(self._buffer)
            self._buffer.clear()
            if self._tmp is not None:
                if not self._single:
                    self.path.mkdir(parents=True, exist_ok=True)
                for name in self._written:
                    os.replace(self._tmp / name, self.path if self._single else self.path / name)
                self._tmp.rmdir()
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything this writer wrote; the target stays as it was."""
        self._closed = True
        self._buffer.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header (deterministic) carrying the checksum."""
    raw = save({k: v.contiguous() for k, v in tensors.items()})
    n = int.from_bytes(raw[:8], "little")
    header, payload = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header["__metadata__"] = dict(metadata)
    header["__metadata__"]["checksum"] = _checksum(header, iter([payload]))
    head = _canonical(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + payload


class TokenDataset:
    """A token data set opened for reading: ``len``, indexing, iteration and training batches.

    Opening reads headers only (see the module docs for what is checked when); data is read through
    safetensors' memory map, per image for indexing and per shard for iteration and :meth:`batches`.
    """

    def __init__(self, path: str | Path, *, expect_spec_digest: str | None = None) -> None:
        self.path = Path(path)
        files = [self.path] if self.path.is_file() else [p for _, _, p in _list_shards(self.path)]
        if not files:
            raise TokenFileError(f"{self.path}: no token shards (shard-*.safetensors) found")
        self._shards = [_Shard(p) for p in files]
        first = self._shards[0]
        for shard in self._shards[1:]:
            for key in ("spec_digest", "tokenizer", "meta"):
                if shard.meta[key] != first.meta[key]:
                    raise TokenFileError(
                        f"{self.path}: shards disagree on {key}: {first.path.name} has {first.meta[key]}, "
                        f"{shard.path.name} has {shard.meta[key]}"
                    )
        if expect_spec_digest is not None and first.meta["spec_digest"] != expect_spec_digest:
            raise _digest_mismatch(first.path, first.meta["spec_digest"], expect_spec_digest)
        self._starts = [0]
        for shard in self._shards:
            self._starts.append(self._starts[-1] + shard.count)

    @property
    def metadata(self) -> dict[str, Any]:
        """``format_version``, ``spec_digest``, ``tokenizer`` and the writer's ``meta`` keys."""
        m = self._shards[0].meta
        return {
            **json.loads(m["meta"]),
            "format_version": int(m["format_version"]),
            "spec_digest": m["spec_digest"],
            "tokenizer": m["tokenizer"],
        }

    def verify(self) -> None:
        """Check every shard's checksum now (otherwise each is checked on first access)."""
        for shard in self._shards:
            shard.verify()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> StoredImageTokens:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        i %= len(self)
        s = bisect.bisect_right(self._starts, i) - 1
        shard, j = self._shards[s], i - self._starts[s]
        a, b = shard.index()[0][j : j + 2]
        h = shard.handle
        return shard.image(
            j, h.get_slice("global_codes")[j : j + 1][0], h.get_slice("codes")[a:b], h.get_slice("positions")[a:b]
        )

    def __iter__(self) -> Iterator[StoredImageTokens]:
        for shard in self._shards:
            yield from shard.images()

    def batches(self, batch_size: int, *, padded: bool = False) -> Iterator[Tokens | dict[str, Tensor]]:
        """Batches of up to ``batch_size`` images sharing (grid, image size), every image exactly once.

        Images are read in data-set order and go to the batch being filled for their (grid, size);
        a batch is yielded as soon as it is full, and the partial batches left at the end follow in
        the order their (grid, size) first appeared. Deterministic; shuffle downstream if needed.

        ``padded=True`` yields dicts for training: ``codes`` and ``positions`` (B, L) padded with -1,
        ``valid`` (B, L) bool, ``global_codes`` (B, M), ``lengths`` (B,), ``index`` (B,) data-set
        indices (for labels via ``self[i].source``), ``grid`` and ``image_size`` (2,), all int64.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: dict[tuple[tuple[int, int], tuple[int, int]], list[tuple[int, StoredImageTokens]]] = {}
        for i, image in enumerate(self):
            group = pending.setdefault((image.grid, image.image_size), [])
            group.append((i, image))
            if len(group) == batch_size:
                yield _collate(group, padded)
                group.clear()
        for group in pending.values():
            if group:
                yield _collate(group, padded)


def _collate(group: Sequence[tuple[int, StoredImageTokens]], padded: bool) -> Tokens | dict[str, Tensor]:
    tokens = Tokens.from_images([im for _, im in group])
    if not padded:
        return tokens
    codes, positions, valid = tokens.to_padded()
    return {
        "codes": codes,
        "positions": positions,
        "valid": valid,
        "global_codes": tokens.global_codes,
        "lengths": tokens.lengths,
        "index": torch.tensor([i for i, _ in group], dtype=torch.int64),
        "grid": torch.tensor(tokens.grid, dtype=torch.int64),
        "image_size": torch.tensor(tokens.image_size, dtype=torch.int64),
    }
