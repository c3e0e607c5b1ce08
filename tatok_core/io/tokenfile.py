"""The on-disk format of TaTok tokens, version 1: what downstream models train on.

Layout
------
A token data set is a directory of shards ``shard-00000.safetensors``, ``shard-00001.safetensors``, …
(``shard-r{rank}-{i:05d}.safetensors`` when written by one rank of a ``torchrun`` job, so ranks never
collide) with a manifest, or a single shard file. Image order is shard order — (rank, index), unranked shards first —
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
* ``weights_digest`` — when the writer was given one: :func:`weights_digest` of the model;
* ``checksum`` — ``"sha256:" + hex(sha256(H || P))`` with P the tensor payload (every byte after the
  header) and H the canonical JSON of the header with ``checksum`` removed, so it covers the data,
  every tensor's dtype/shape/offsets and all other metadata.

All shards of one data set share ``format_version``, ``spec_digest``, ``tokenizer``, ``meta`` and
``weights_digest``.

A directory set holds a manifest, ``manifest.json`` (``manifest-r{rank}.json`` per rank): canonical
JSON with ``format`` = ``"tatok.tokens.manifest"``, ``format_version``, ``spec_digest``,
``tokenizer``, ``meta``, ``weights_digest``, ``rank``, ``world_size``, ``shards`` (``name``,
``checksum``, ``images``, ``bytes`` per shard, in order), ``images`` (their total) and ``checksum``
(SHA-256 of the canonical JSON of the rest).

Guarantees
----------
* Deterministic bytes: headers and manifests are canonical JSON (sorted keys, compact; shard headers
  space-padded to 8 bytes — safetensors' own writer orders metadata keys by hash) and nothing depends
  on time or process, so the same tokens and metadata give identical files.
* One writer per target: a :class:`TokenWriter` holds an :class:`~tatok_core.io.locking.OutputLock` on
  it while open; a second writer fails at once, naming the first.
* Atomic and resumable: full shards are staged (temp file, fsync, rename) in a hidden sibling folder
  as they fill; :meth:`TokenWriter.close` stages the manifest, then moves the shards and last the
  manifest into the target. The target is always the previous set or the new one; a kill during the
  moves is rolled forward by the next writer; ``resume=True`` takes up the staged shards of a killed
  writer. An exception inside the ``with`` block removes everything staged.
* Checked: opening reads only headers and manifests and refuses missing, extra, replaced or
  duplicated shards, a damaged manifest, a lost rank, a half-committed set and (``expect_*``) tokens
  of another spec or other weights. Checksums are verified lazily, once per shard, before any data of
  that shard is returned — opening a million-image set stays instant, and no byte is served
  unverified. :meth:`TokenDataset.verify` checks every shard up front.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from tatok_core import __version__
from tatok_core.contract.errors import TokenFileError
from tatok_core.io.locking import OutputLock
from tatok_core.io.atomic import atomic_write
from tatok_core.contract.selection import cu_seqlens_from_lengths
from tatok_core.contract.tokens import ImageTokens, Tokens

FORMAT = "tatok.tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tatok.tokens.manifest"
REQUIRED_META = ("codebook_size", "num_global", "patch_size")
TENSORS = frozenset({"global_codes", "codes", "positions", "cu_seqlens", "grids", "image_sizes"})
_SHARD_RE = re.compile(r"shard-(?:r(\d+)-)?(\d+)\.safetensors")
_MANIFEST_RE = re.compile(r"manifest(?:-r(\d+))?\.json")
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


def write_durably(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never a torn file; the temporary file has the fixed
    name ``.NAME.tmp``, which the writer removes after a killed run."""
    atomic_write(path, data, tmp=path.with_name(f".{path.name}.tmp"))


def _manifest_name(rank: int | None) -> str:
    return MANIFEST if rank is None else f"manifest-r{rank}.json"


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return (_canonical({**body, "checksum": "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()})
            + "\n").encode()


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest whose own checksum holds (so a flipped bit in it is caught like one in a shard)."""
    try:
        manifest = json.loads(path.read_bytes())
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        entry_types = {"name": str, "checksum": str, "images": int, "bytes": int}
        if not isinstance(manifest["shards"], list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in entry_types.items())
            for e in manifest["shards"]
        ):
            raise TypeError("shard entries need name, checksum, images and bytes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TokenFileError(f"{path}: not a readable token-set manifest ({exc})") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TokenFileError(f"{path}: not a TaTok token-set manifest (format {manifest.get('format')!r})")
    if manifest.get("checksum") != "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest():
        raise TokenFileError(f"{path}: checksum mismatch: the manifest was modified or corrupted after it was written")
    return manifest


def _staging_dir(path: Path, rank: int | None) -> Path:
    return path.parent / (f".{path.name}.partial" + ("" if rank is None else f"-r{rank}"))


def weights_digest(model: torch.nn.Module) -> str:
    """16 hex digits of SHA-256 over every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes).

    Token files record it, so tokens are never decoded by weights other than those that made them
    (two models of one architecture share a spec digest but not this).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(_canonical([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()[:16]


def resume_position(done: Sequence[tuple[str, int]], inputs: Sequence[tuple[str, int]]) -> int:
    """How many of ``inputs`` (name, byte size) an interrupted write already covered.

    ``done`` are the sources of the images it wrote, in order: a subsequence of the inputs (inputs it
    skipped as unreadable are not in it). Raises when they do not follow the inputs — other inputs.
    """
    position = 0
    for source in done:
        while position < len(inputs) and tuple(inputs[position]) != tuple(source):
            position += 1
        if position == len(inputs):
            raise TokenFileError(
                f"cannot resume: the interrupted output holds {source[0]!r} ({source[1]} bytes), which is not "
                "among these inputs in this order; resume with the same inputs, or run again without resume"
            )
        position += 1
    return position


class TokenWriter:
    """Writes :class:`Tokens` batches into a token data set (see the module docs for the format).

    ``path`` is a directory, or a ``*.safetensors`` file for a single-shard set (no ``append``,
    ``rank`` or ``resume`` then). Images are validated as they are written, so a bad batch raises
    before anything reaches disk. Full shards go into a hidden staging folder beside the target as
    they fill; :meth:`close` commits them and the manifest into the target. Under ``torchrun`` every
    rank opens the same directory with its own ``rank`` and the job's ``world_size``. A directory
    that already holds shards needs ``append=True``. While open, the writer holds a lock on the target
    (:class:`~tatok_core.io.locking.OutputLock`): a second writer fails at once.

    ``resume=True`` keeps the staged shards of a writer that was killed (or interrupted with Ctrl-C)
    before it closed: :attr:`resumed_sources` lists their images, and the caller writes only what
    follows (:func:`resume_position`). Without it, such leftovers are discarded
    (:attr:`discarded_images` says how many images they held). A writer killed while committing had
    written everything: any next writer finishes that commit, and a resuming one is then
    :attr:`already_complete` (closing it adds nothing).
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
        weights_digest: str | None = None,
        world_size: int | None = None,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self._single = self.path.suffix == ".safetensors"
        if shard_size < 1 or (rank is not None and rank < 0):
            raise TokenFileError(f"{self.path}: shard_size must be >= 1 and rank >= 0 (got {shard_size}, {rank})")
        if world_size is not None and rank is None:
            raise TokenFileError(f"{self.path}: world_size needs a rank")
        if world_size is not None and rank is not None and not rank < world_size:
            raise TokenFileError(f"{self.path}: rank {rank} outside a world of {world_size}")
        for key in REQUIRED_META:
            value, least = meta.get(key), 0 if key == "num_global" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TokenFileError(f"{self.path}: meta[{key!r}] must be an int >= {least}, got {value!r}")
        if set(meta) & {"format_version", "spec_digest", "tokenizer", "weights_digest"}:
            raise TokenFileError(
                f"{self.path}: meta may not redefine format_version, spec_digest, tokenizer or weights_digest"
            )
        if self._single and (append or rank is not None):
            raise TokenFileError(f"{self.path}: a single-file token set cannot be appended to or split by rank")
        self._meta = dict(meta)
        self._header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "spec_digest": spec_digest,
            "tokenizer": tokenizer,
            "tool_version": __version__,
            "meta": _canonical(self._meta),
            **({"weights_digest": weights_digest} if weights_digest is not None else {}),
        }
        self._shard_size, self._rank, self._world_size = shard_size, rank, world_size
        self._buffer: list[tuple[ImageTokens, tuple[str, int]]] = []
        self._entries: list[dict[str, Any]] = []  # staged shards: name, checksum, images, bytes
        self._base: list[dict[str, Any]] = []  # shards the target's manifest already lists
        self._closed = False
        self._next = 0
        self.resumed_sources: list[tuple[str, int]] = []
        self.discarded_images = 0
        self.already_complete = False
        self._staging = _staging_dir(self.path, rank)
        self._lock = OutputLock(self.path, "" if rank is None else f".r{rank}")
        self._lock.acquire()
        try:
            self._open(append, resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, append: bool, resume: bool) -> None:
        """With the lock held: finish an interrupted commit, check the target, take up or drop leftovers."""
        if self._single:
            self.path.with_name(f".{self.path.name}.tmp").unlink(missing_ok=True)  # a killed writer's
            if self.path.exists():
                raise TokenFileError(f"{self.path}: already exists; remove it or choose another name")
            return
        if self.path.exists() and not self.path.is_dir():
            raise TokenFileError(f"{self.path}: exists and is not a directory")
        if (self._staging / _manifest_name(self._rank)).is_file():
            finished = self._roll_forward()
            if resume:  # the interrupted run had written everything: resuming it is finishing its commit
                self.already_complete = True
                self.resumed_sources = [source for p in finished for source in _Shard(p).index()[3]]
                return
        existing = _list_shards(self.path)
        if existing and resume and not append and not _list_shards(self._staging):
            raise TokenFileError(f"{self.path}: nothing to resume: it is a finished token set ({len(existing)} shard(s))")
        if existing and not append:
            raise TokenFileError(
                f"{self.path}: holds {len(existing)} shard(s) already; write a new token set elsewhere or add to "
                "this one (append=True; `tatok encode --append`)"
            )
        if existing:
            self._check_same_set(existing[0][2])
            if not any(_MANIFEST_RE.fullmatch(p.name) for p in self.path.iterdir()):
                raise TokenFileError(f"{self.path}: has no {MANIFEST} (not a complete token set): cannot add to it")
            manifest = self.path / _manifest_name(self._rank)
            self._base = list(_read_manifest(manifest)["shards"]) if manifest.is_file() else []
        staged = [p for _, _, p in _list_shards(self._staging)]
        if staged and resume:
            for p in staged:
                shard = _Shard(p)
                shard.verify()
                self._check_same_set(p)
                self._entries.append(_entry(shard))
                self.resumed_sources.extend((n, b) for n, b in shard.index()[3])
        elif self._staging.exists():
            with contextlib.suppress(TokenFileError):  # a damaged leftover is discarded all the same
                self.discarded_images = sum(_Shard(p).count for p in staged)
            shutil.rmtree(self._staging)
        own = [i for r, i, _ in [*existing, *_list_shards(self._staging)] if r == (-1 if self._rank is None else self._rank)]
        self._next = max(own, default=-1) + 1

    def _check_same_set(self, shard: Path) -> None:
        found = _Shard(shard).meta
        if found["spec_digest"] != self._header["spec_digest"]:
            raise _digest_mismatch(shard, found["spec_digest"], self._header["spec_digest"])
        for key in ("tokenizer", "meta", "weights_digest"):
            if found.get(key) != self._header.get(key):
                raise TokenFileError(
                    f"{shard}: cannot add to it: {key} is {found.get(key)} there, {self._header.get(key)} here"
                )

    def update_meta(self, extra: Mapping[str, Any]) -> None:
        """Add ``meta`` keys known only once encoding has begun (a budget's calibrated threshold).

        Only before the first image is written, so every shard of the set carries the same meta.
        """
        if self._buffer or self._entries or self._base or self.resumed_sources or self._closed:
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
            "cu_seqlens": cu_seqlens_from_lengths(lengths, torch.int64),
            "grids": torch.tensor([im.grid for im in images], dtype=torch.int64).reshape(-1, 2),
            "image_sizes": torch.tensor([im.image_size for im in images], dtype=torch.int64).reshape(-1, 2),
        }
        data, checksum = _serialize(tensors, {**self._header, "sources": _canonical([list(s) for _, s in items])})
        if self._single:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(self.path, data)
            return
        name = _shard_name(self._rank, self._next)
        entry = {"name": name, "checksum": checksum, "images": len(images), "bytes": len(data)}
        twin = next((e["name"] for e in [*self._base, *self._entries] if e["checksum"] == entry["checksum"]), None)
        if twin is not None:
            raise TokenFileError(f"{self.path}: shard {name} would repeat shard {twin} byte for byte: "
                                 "these images are in the set already")
        self._staging.mkdir(parents=True, exist_ok=True)
        write_durably(self._staging / name, data)
        self._entries.append(entry)
        self._next += 1

    def close(self) -> None:
        """Flush the last shard, then commit every staged shard and the manifest into the target.

        A new set that received no images still gets one empty shard, so it exists and records its
        tokenizer. The manifest is staged first and moved last: a kill in between is rolled forward
        by the next writer, and readers refuse the half-committed set until then.
        """
        if self._closed:
            return
        if self.already_complete:
            if self._buffer:
                raise TokenFileError(f"{self.path}: the resumed write was complete; no images may be added")
            self._closed = True
            self._lock.release()
            return
        try:
            if self._buffer or not (self._entries or self._base or _list_shards(self.path)):
                self._flush(self._buffer)
            self._buffer.clear()
            if not self._single:
                manifest = {
                    "format": MANIFEST_FORMAT,
                    "format_version": FORMAT_VERSION,
                    **{k: self._header[k] for k in ("spec_digest", "tokenizer", "meta")},
                    "weights_digest": self._header.get("weights_digest"),
                    "rank": self._rank,
                    "world_size": self._world_size,
                    "shards": [*self._base, *self._entries],
                    "images": sum(e["images"] for e in [*self._base, *self._entries]),
                }
                self._staging.mkdir(parents=True, exist_ok=True)
                write_durably(self._staging / _manifest_name(self._rank), _manifest_bytes(manifest))
                self._commit()
            self._closed = True
        except BaseException as exc:
            self.abort(exc)
            raise
        self._lock.release()

    def _roll_forward(self) -> list[Path]:
        """Finish the commit a killed writer began; returns the shards that commit added."""
        committed = self.path / _manifest_name(self._rank)
        before = {e["name"] for e in _read_manifest(committed)["shards"]} if committed.is_file() else set()
        staged = _read_manifest(self._staging / _manifest_name(self._rank))["shards"]
        self._commit()
        return [self.path / e["name"] for e in staged if e["name"] not in before]

    def _commit(self) -> None:
        """Move the staged shards, then the staged manifest, into the target; remove the staging folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        for _, _, shard in _list_shards(self._staging):
            os.replace(shard, self.path / shard.name)
        os.replace(self._staging / _manifest_name(self._rank), self.path / _manifest_name(self._rank))
        _fsync_dir(self.path)
        shutil.rmtree(self._staging, ignore_errors=True)

    def abort(self, reason: BaseException | None = None, *, keep_staged: bool | None = None) -> None:
        """Discard what this writer staged, leaving the target as it was, and release the target.

        An interruption (Ctrl-C: a ``BaseException`` that is not an ``Exception``) keeps the full
        staged shards for ``resume=True``, as a kill would; an error removes them, unless
        ``keep_staged`` says otherwise (a resume refused before it wrote anything keeps them).
        """
        self._closed = True
        self._buffer.clear()
        if keep_staged is None:
            keep_staged = reason is not None and not isinstance(reason, Exception)
        if not keep_staged:
            if self._single:
                self.path.with_name(f".{self.path.name}.tmp").unlink(missing_ok=True)
            elif not (self._staging / _manifest_name(self._rank)).is_file():  # never undo a commit under way
                shutil.rmtree(self._staging, ignore_errors=True)
        self._lock.release()

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


def _entry(shard: _Shard) -> dict[str, Any]:
    return {"name": shard.path.name, "checksum": shard.meta["checksum"], "images": shard.count,
            "bytes": shard.path.stat().st_size}


def _fsync_dir(path: Path) -> None:
    """Make renames into ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[bytes, str]:
    """safetensors bytes with a canonical header (deterministic) carrying the checksum, and that checksum."""
    raw = save({k: v.contiguous() for k, v in tensors.items()})
    n = int.from_bytes(raw[:8], "little")
    header, payload = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header["__metadata__"] = dict(metadata)
    header["__metadata__"]["checksum"] = _checksum(header, iter([payload]))
    head = _canonical(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + payload, header["__metadata__"]["checksum"]


def _checked_listing(directory: Path) -> list[Path]:
    """The shard files of a token-set directory, after checking it is not half written."""
    shards = [p for _, _, p in _list_shards(directory)]
    manifests = [p for p in directory.iterdir() if _MANIFEST_RE.fullmatch(p.name)] if directory.is_dir() else []
    staging = [p for p in directory.parent.glob(f".{directory.name}.partial*")
               if any(_MANIFEST_RE.fullmatch(q.name) for q in p.iterdir())] if directory.parent.is_dir() else []
    if staging:
        raise TokenFileError(
            f"{directory}: a write into it is committing right now or was interrupted while committing "
            f"({staging[0].name}); if no writer runs, the same `tatok encode ... --resume` finishes it"
        )
    if not shards and not manifests:
        raise TokenFileError(f"{directory}: no token shards (shard-*.safetensors) found")
    if not manifests:
        raise TokenFileError(
            f"{directory}: no {MANIFEST}: not a complete token set (written by an older tatok, or by hand), "
            "so missing or extra shards cannot be ruled out"
        )
    return shards


def _check_against_manifests(directory: Path, shards: Sequence[_Shard]) -> None:
    """Every shard listed exactly once, none missing, none extra, each the very file listed; ranks all there."""
    listed: dict[str, tuple[str, dict[str, Any]]] = {}
    world_sizes: set[int] = set()
    ranks: set[int | None] = set()
    for path in sorted(p for p in directory.iterdir() if _MANIFEST_RE.fullmatch(p.name)):
        manifest = _read_manifest(path)
        ranks.add(manifest.get("rank"))
        if manifest.get("world_size") is not None:
            world_sizes.add(manifest["world_size"])
        for entry in manifest["shards"]:
            listed[entry["name"]] = (path.name, entry)
        keys = ("spec_digest", "tokenizer", "meta", "weights_digest")
        if shards and any(manifest.get(k) != shards[0].meta.get(k) for k in keys):
            raise TokenFileError(f"{path}: the manifest and the shards disagree on the tokenizer or its settings")
    present = {shard.path.name: shard for shard in shards}
    missing = [name for name in listed if name not in present]
    if missing:
        raise TokenFileError(
            f"{directory}: shard(s) {', '.join(sorted(missing)[:3])} listed in {listed[missing[0]][0]} are missing: "
            f"the token set is incomplete ({len(missing)} of {len(listed)} shards gone)"
        )
    extra = [name for name in present if name not in listed]
    if extra:
        raise TokenFileError(
            f"{directory}: shard(s) {', '.join(sorted(extra)[:3])} are in no manifest (copied in, or left by another "
            "write): remove them or move them to their own set"
        )
    seen: dict[str, str] = {}
    for name, (manifest_name, entry) in listed.items():
        shard = present[name]
        if seen.get(entry["checksum"]):
            raise TokenFileError(f"{directory}: shards {seen[entry['checksum']]} and {name} are identical: "
                                 "a duplicated shard would give every image in it twice")
        seen[entry["checksum"]] = name
        if (shard.meta.get("checksum"), shard.count) != (entry["checksum"], entry["images"]):
            raise TokenFileError(f"{shard.path}: not the shard {manifest_name} lists (replaced by another file?)")
    for size in world_sizes:
        lost = sorted(set(range(size)) - ranks)
        if lost:
            raise TokenFileError(f"{directory}: written by {size} ranks, but rank(s) {lost} left no manifest: "
                                 "their shards are missing")


class TokenDataset:
    """A token data set opened for reading: ``len``, indexing, iteration and training batches.

    Opening reads headers only (see the module docs for what is checked when); data is read through
    safetensors' memory map, per image for indexing and per shard for iteration and :meth:`batches`.
    """

    def __init__(self, path: str | Path, *, expect_spec_digest: str | None = None,
                 expect_weights_digest: str | None = None, allow_foreign_weights: bool = False) -> None:
        """Open ``path``; ``expect_*`` refuse tokens of another spec / other weights (see the module docs)."""
        self.path = Path(path)
        if self.path.is_file():
            self._shards = [_Shard(self.path)]
        else:
            self._shards = [_Shard(p) for p in _checked_listing(self.path)]
        first = self._shards[0]
        for shard in self._shards[1:]:
            for key in ("spec_digest", "tokenizer", "meta", "weights_digest"):
                if shard.meta.get(key) != first.meta.get(key):
                    raise TokenFileError(
                        f"{self.path}: shards disagree on {key}: {first.path.name} has {first.meta.get(key)}, "
                        f"{shard.path.name} has {shard.meta.get(key)}"
                    )
        if not self.path.is_file():
            _check_against_manifests(self.path, self._shards)
        if expect_spec_digest is not None and first.meta["spec_digest"] != expect_spec_digest:
            raise _digest_mismatch(first.path, first.meta["spec_digest"], expect_spec_digest)
        found = first.meta.get("weights_digest")
        if expect_weights_digest is not None and found != expect_weights_digest and not allow_foreign_weights:
            made_by = f"weights {found}" if found else "unrecorded weights (the writer gave no weights digest)"
            raise TokenFileError(
                f"{self.path}: tokens made by {made_by}, not by this model's weights {expect_weights_digest}: "
                "decoding them would give wrong images; use the model that encoded them, or accept the risk "
                "with --allow-foreign-weights (allow_foreign_weights=True)"
            )
        self._starts = [0]
        for shard in self._shards:
            self._starts.append(self._starts[-1] + shard.count)

    @property
    def metadata(self) -> dict[str, Any]:
        """``format_version``, ``spec_digest``, ``tokenizer``, ``weights_digest`` and the writer's ``meta`` keys."""
        m = self._shards[0].meta
        return {
            **json.loads(m["meta"]),
            "format_version": int(m["format_version"]),
            "spec_digest": m["spec_digest"],
            "tokenizer": m["tokenizer"],
            "weights_digest": m.get("weights_digest"),
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
