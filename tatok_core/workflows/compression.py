"""Compressed images: one image's tokens written by an arithmetic coder that a prior drives, as bytes.

A token file stores each code plainly; its rate is the count (log2 of the codebook per code and an
enumerative code of the kept positions, :mod:`tatok_core.contract.bitrate`). A prior that walks the
tokens choice by choice (:meth:`~tatok_core.contract.interfaces.Generator.walk`: the built-in
``context`` prior) predicts each choice from those before it; a range coder
(`constriction <https://bamler-lab.github.io/constriction/>`_) writes each choice in about −log2 p bits.
So the file's length is the prior's code length plus a few bytes, and the rate an entropy coder writes
becomes a file a user can compare with a JPEG.

File layout, version 3 (what :meth:`ImageCoder.compress_tokens` writes):

==============  ===========  ===========================================================================
field           size         meaning
==============  ===========  ===========================================================================
magic           4 bytes      ``b"TTK"`` and the format version (3)
pairing         8 bytes      :func:`pairing_digest` of the tokenizer and the prior: tokens are decoded
                             only by the pair that wrote them (whatever rule kept them)
sizes           4 varints    image height and width, grid rows and columns (LEB128, 2 bytes each < 16384)
checksum        4 bytes      CRC-32 of the token set (globals, kept positions, codes), big-endian
payload         rest         the range coder's 32-bit words, little-endian
==============  ===========  ===========================================================================

Decoding re-runs the encoder's walk with the choices read back from the payload, so both ends must
give the range coder the very same probabilities, bit for bit — also on another machine, whose float
arithmetic sums in another order. So the coder never sees the prior's floats: the prior runs in float64
(its logits then agree across machines to ~1e-13), each logit is rounded to a grid of
:data:`LOGIT_STEPS` per nat, and the probabilities are integer weights from a table computed in exact
decimal arithmetic (:data:`EXP_WEIGHTS`), divided by their sum — one correctly rounded IEEE division.
Two machines then disagree only where a logit lies within ~1e-13 of a rounding boundary: about once
in 10^11 logits, under one file in 10^6. Where they do (or the file is damaged) the decoded tokens
fail the checksum and the file is refused by name — a wrong image is never returned. The rounding
changed no held-out photo's file size (docs/results.md).
"""

from __future__ import annotations

import contextlib
import copy
import decimal
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import constriction
import numpy as np
import torch
from torch import Tensor

from tatok_core.contract.errors import CompositionError, ImageReadError, TatokError, TokenFileError
from tatok_core.contract.interfaces import Generator
from tatok_core.contract.tokens import Tokens
from tatok_core.io.atomic import atomic_write
from tatok_core.io.images import fit_longest_side, read_image, write_image
from tatok_core.io.persistence import state_digest
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer, pretrained_folder
from tatok_core.pipeline.set_search import searches
from tatok_core.workflows.analysis import Analysed, analysed_bits
from tatok_core.workflows.generation import load_prior
from tatok_core.workflows.inference import evaluating
from tatok_core.workflows.progress import progress_bar
from tatok_core.workflows.rate_control import RateResult, calibrate_bits, check_rate, rule_filter

MAGIC = b"TTK"
FORMAT_VERSION = 3
SUFFIX = ".ttk"
MAX_SIDE = 1 << 16  # pixels: a header beyond it is damaged (and would have the decoder walk a vast grid)
CODING_PRIOR = "context-prior"
"""The folder, inside a saved tokenizer's, of the prior its tokens are coded with."""

_CHOICE_MODEL = constriction.stream.model.Categorical(perfect=False)  # probabilities given per choice


LOGIT_STEPS = 64
"""Logits are rounded to multiples of 1/64 nat before they become probabilities (module docs)."""
LOGIT_FLOOR = 16 * LOGIT_STEPS
"""A choice more than 16 nats below the likeliest gets the weight of one exactly 16 below (the range
coder's own resolution, 2^-24, is about e^-16.6)."""


def _exp_weights() -> Tensor:
    """(LOGIT_FLOOR + 1,) int64: round(2^32 · e^(−i / LOGIT_STEPS)), computed in exact decimal arithmetic
    (correctly rounded, so every machine builds the same table); the smallest, 2^32 · e^-16, is 483."""
    with decimal.localcontext() as context:
        context.prec = 40
        scale = decimal.Decimal(2) ** 32
        exact = [scale * (decimal.Decimal(-i) / LOGIT_STEPS).exp() for i in range(LOGIT_FLOOR + 1)]
        return torch.tensor([int(w.to_integral_value(decimal.ROUND_HALF_EVEN)) for w in exact], dtype=torch.int64)


EXP_WEIGHTS = _exp_weights()


def choice_probabilities(logits: Tensor) -> np.ndarray:
    """Logits (B, V) → float64 probabilities (B, V) the range coder quantizes: the logits rounded to
    1/:data:`LOGIT_STEPS` nat, weighted by :data:`EXP_WEIGHTS` relative to the likeliest choice, divided
    by their sum (integers exact in float64 for V < 2^21, so the result is one correctly rounded
    division: the same on every machine)."""
    steps = torch.round(logits.double() * LOGIT_STEPS).long()  # (B, V)
    below = (steps.amax(dim=-1, keepdim=True) - steps).clamp_max(LOGIT_FLOOR)  # (B, V) ≥ 0
    weights = EXP_WEIGHTS[below]  # (B, V) int64
    return (weights.double() / weights.sum(dim=-1, keepdim=True).double()).numpy()


class _Writer:
    """The encoder's pick: writes the known choice under the logits' probabilities."""

    def __init__(self) -> None:
        self.coder = constriction.stream.queue.RangeEncoder()

    def __call__(self, logits: Tensor, given: Tensor | None) -> Tensor:
        assert given is not None, "the encoder walks a given token set"
        self.coder.encode(given.numpy().astype(np.int32), _CHOICE_MODEL, choice_probabilities(logits))
        return given


class _Reader:
    """The decoder's pick: reads the choice back under the same probabilities."""

    def __init__(self, words: np.ndarray) -> None:
        self.coder = constriction.stream.queue.RangeDecoder(words)

    def __call__(self, logits: Tensor, given: Tensor | None) -> Tensor:
        return torch.from_numpy(self.coder.decode(_CHOICE_MODEL, choice_probabilities(logits)).astype(np.int64))


@contextlib.contextmanager
def _reproducible() -> Iterator[None]:
    """One CPU thread and no autograd while the prior walks: the logits must not depend on the machine's load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int, source: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise TokenFileError(f"{source}: truncated header")
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if not byte & 0x80:
            return value, at


def token_checksum(tokens: Tokens) -> int:
    """CRC-32 of one image's token set: its grid, image size, global codes, kept positions and codes."""
    crc = zlib.crc32(np.asarray([*tokens.grid, *tokens.image_size], dtype="<i8").tobytes())
    for values in (tokens.global_codes, tokens.positions, tokens.codes):
        crc = zlib.crc32(values.cpu().numpy().astype("<i8").tobytes(), crc)
    return crc


def pairing_digest(tokenizer: Tokenizer, prior: Generator) -> bytes:
    """8 bytes of SHA-256 over what decoding a file depends on: the tokenizer's weights and the components
    that give tokens their meaning (encoder, globals, quantizer, decoder — not the entropy estimator and
    filter, which only choose the tokens kept), and the prior's weights (as float32, the precision they are
    trained and saved in)."""
    meaning = {kind: tokenizer.spec.component(kind).to_dict()
               for kind in ("encoder", "global_tokenizer", "quantizer", "decoder")}
    weights = {name: value.float() if value.is_floating_point() else value  # the coder's float64 copy: the same
               for name, value in prior.state_dict().items()}
    text = json.dumps([meaning, tokenizer.weights_digest(), state_digest(weights)], sort_keys=True)
    return hashlib.sha256(text.encode()).digest()[:8]


@attrs.frozen(eq=False)
class ImageCoder:
    """A tokenizer and the prior its tokens are coded with: images ↔ compressed bytes (module docs).

    The tokenizer's own rule decides which tokens are kept (give it another with
    :func:`~tatok_core.workflows.rate_control.with_rule`); the prior must model its codes: the same code
    factors and number of globals (checked here, naming both). The coder walks its own copy of the
    prior, on the CPU in float64 (module docs); the prior given is left as it is. With the tokenizer's
    ``refine_bpp_worth`` > 0, its refinement weighs the bits of this prior
    (:meth:`~tatok_core.pipeline.tokenizer.Tokenizer.with_coding_prior`, a float32 copy beside it).
    """

    tokenizer: Tokenizer
    prior: Generator
    pairing: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if type(self.prior).walk is Generator.walk:
            raise CompositionError(f"{self.prior.label} cannot drive the entropy coder of tokenizer "
                                   f"{self.tokenizer.name!r}: it has no walk() (the built-in 'context' prior has one)")
        self.tokenizer.check_prior_models_codes(self.prior)
        object.__setattr__(self, "pairing", pairing_digest(self.tokenizer, self.prior))  # of the weights as saved
        if self.tokenizer.refine_bpp_worth > 0:  # refinement weighs the bits of this very prior
            beside = copy.deepcopy(self.prior).to(self.device, torch.float32).eval()  # where the tokenizer runs
            object.__setattr__(self, "tokenizer", self.tokenizer.with_coding_prior(beside))
        object.__setattr__(self, "prior", copy.deepcopy(self.prior).to("cpu", torch.float64).eval())

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike[str] = DEFAULT_PRETRAINED, *,
                        prior: str | os.PathLike[str] | None = None) -> ImageCoder:
        """A saved tokenizer (a shipped name or a folder) with the prior in its ``context-prior/`` folder,
        or the prior saved in ``prior`` (:func:`~tatok_core.workflows.generation.save_prior`)."""
        tokenizer = Tokenizer.from_pretrained(name_or_dir)
        folder = Path(prior) if prior is not None else pretrained_folder(name_or_dir) / CODING_PRIOR
        if prior is None and not folder.is_dir():
            raise TatokError(f"tokenizer {tokenizer.name!r} ships no {CODING_PRIOR}/ folder (the prior its tokens "
                             "are coded with): fit one with `tatok train-prior --generator context` on its tokens "
                             "and pass that folder as the prior")
        return cls(tokenizer, load_prior(folder))

    # -- tokens ↔ bytes ------------------------------------------------------------------------------
    def compress_tokens(self, tokens: Tokens) -> bytes:
        """One image's tokens (a batch of one) → the bytes of a compressed file."""
        if tokens.batch_size != 1:
            raise TatokError(f"a compressed file holds one image; got {tokens.batch_size}")
        tokens = tokens.to("cpu")
        writer = _Writer()
        with _reproducible():
            self.prior.walk(writer, grid=tokens.grid, given=tokens)
        header = b"".join([MAGIC, bytes([FORMAT_VERSION]), self.pairing,
                           *map(_varint, (*tokens.image_size, *tokens.grid)),
                           token_checksum(tokens).to_bytes(4, "big")])
        return header + writer.coder.get_compressed().astype("<u4").tobytes()

    def decompress_tokens(self, data: bytes, source: str = "compressed data") -> Tokens:
        """The bytes of a compressed file → its tokens; ``source`` names it in errors."""
        header = read_header(data, source)
        if header.pairing != self.pairing:
            raise TokenFileError(f"{source}: written by another tokenizer or prior (pairing {header.pairing.hex()}; "
                                 f"{self.tokenizer.name!r} with this prior is {self.pairing.hex()})")
        if header.grid != tuple(self.tokenizer.grid_for(*header.image_size)) or (len(data) - header.size) % 4:
            raise TokenFileError(f"{source}: damaged (grid {header.grid[0]}×{header.grid[1]} for a "
                                 f"{header.image_size[0]}×{header.image_size[1]} image, {len(data)} bytes)")
        reader = _Reader(np.frombuffer(data[header.size:], dtype="<u4").astype(np.uint32))
        try:
            with _reproducible():
                tokens = self.prior.walk(reader, grid=header.grid, given=None)
        except (ValueError, RuntimeError) as exc:  # the range decoder ran out of data or met an invalid word
            raise TokenFileError(f"{source}: damaged payload ({exc})") from exc
        tokens = attrs.evolve(tokens, image_size=header.image_size)
        if token_checksum(tokens) != header.checksum:
            raise TokenFileError(f"{source}: the decoded tokens fail their checksum: the file is damaged, or was "
                                 "written by a tatok whose prior computed other logits")
        return tokens

    # -- images ↔ bytes, files ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the tokenizer runs (the prior always runs on the CPU)."""
        return next(self.tokenizer.parameters()).device

    def tokens_of(self, image: Tensor, tau: float | None = None) -> Tokens:
        """An image (3, H, W) in [0, 1] → its tokens (a batch of one), kept by the tokenizer's rule."""
        with torch.inference_mode():
            return self.tokenizer.encode(image[None].to(self.device), tau=tau)

    def compress(self, image: Tensor, tau: float | None = None) -> bytes:
        """An image (3, H, W) in [0, 1] → compressed bytes."""
        return self.compress_tokens(self.tokens_of(image, tau))

    def decompress(self, data: bytes, source: str = "compressed data") -> Tensor:
        """Compressed bytes → the reconstructed image (3, H, W) at the original size."""
        tokens = self.decompress_tokens(data, source)
        with torch.inference_mode():
            return self.tokenizer.decode(tokens.to(self.device))[0].cpu()

    def compress_file(self, image_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      tau: float | None = None, longest_side: int | None = None) -> CompressedFile:
        """Compress an image file (downscaled to ``longest_side`` if given) into ``out``, written atomically."""
        return self.write_file(self.tokens_of(_read_image_at(image_path, longest_side), tau), out)

    def write_file(self, tokens: Tokens, out: str | os.PathLike[str]) -> CompressedFile:
        """One image's tokens compressed into ``out``, written atomically."""
        data = self.compress_tokens(tokens)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, data)
        return CompressedFile(Path(out), tokens.image_size, int(tokens.codes.numel()), tokens.num_patches, len(data))

    def decompress_file(self, path: str | os.PathLike[str]) -> Tensor:
        """A compressed file → the reconstructed image (3, H, W); errors name the file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TokenFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return self.decompress(data, str(path))


@attrs.frozen
class FileHeader:
    """What precedes a compressed file's payload (module docs); ``size`` is its length in bytes."""

    pairing: bytes
    image_size: tuple[int, int]
    grid: tuple[int, int]
    checksum: int
    size: int


def read_header(data: bytes, source: str = "compressed data") -> FileHeader:
    """The header of a compressed file (checked: magic, version, complete); ``source`` names it in errors."""
    if data[:3] != MAGIC:
        raise TokenFileError(f"{source}: not a compressed TaTok image (it starts with {data[:4]!r})")
    if len(data) < 4:
        raise TokenFileError(f"{source}: truncated header")
    if data[3] < FORMAT_VERSION:  # 1: the walk summed its convolutions in another order; 2: float32 probabilities
        raise TokenFileError(f"{source}: format version {data[3]}, written by an earlier tatok whose prior computed "
                             f"its probabilities another way; this tatok reads {FORMAT_VERSION}: compress the image again")
    if data[3] != FORMAT_VERSION:
        raise TokenFileError(f"{source}: format version {data[3]}; this tatok reads {FORMAT_VERSION}")
    at = 12
    sizes = []
    for _ in range(4):
        value, at = _read_varint(data, at, source)
        sizes.append(value)
    if len(data) < at + 4:
        raise TokenFileError(f"{source}: truncated header")
    height, width, rows, cols = sizes
    if max(sizes) > MAX_SIDE or min(sizes) < 1:
        raise TokenFileError(f"{source}: damaged (a {height}×{width} image on a {rows}×{cols} grid)")
    return FileHeader(data[4:12], (height, width), (rows, cols), int.from_bytes(data[at:at + 4], "big"), at + 4)


def header_size(data: bytes) -> int:
    """Bytes of a compressed file before its payload (20 for sizes under 128, 24 at most below 16384)."""
    return read_header(data).size


@attrs.frozen
class CompressedFile:
    """What :meth:`ImageCoder.compress_file` wrote."""

    path: Path
    image_size: tuple[int, int]
    kept: int  # patch tokens kept, of num_patches
    num_patches: int
    size: int  # bytes

    @property
    def bpp(self) -> float:
        return 8 * self.size / (self.image_size[0] * self.image_size[1])


def _read_image_at(path: str | os.PathLike[str], longest_side: int | None) -> Tensor:
    """An image file (3, H, W), downscaled so its longest side is ``longest_side`` when given."""
    image = read_image(path)
    return image if longest_side is None else fit_longest_side(image, longest_side)


@attrs.frozen
class CompressReport:
    """What :func:`compress_files` did: the files written, why others were skipped, and — for a budget —
    the threshold calibrated on the images."""

    written: list[CompressedFile]
    failed: list[str]
    calibration: RateResult | None = None


def compress_files(coder: ImageCoder, sources: Sequence[tuple[Path, str]], out_dir: str | os.PathLike[str], *,
                   tau: float | None = None, budget: float | None = None, budget_mode: str = "theta",
                   longest_side: int | None = None, progress: bool = False) -> CompressReport:
    """Compress (path, name) pairs (:func:`~tatok_core.workflows.encoding.source_names`) into
    ``out_dir``/NAME.ttk; unreadable images are skipped and reported.

    With ``budget`` (mean patch tokens per image) ONE threshold of ``budget_mode`` is calibrated on these
    very images, as ``tatok encode --budget`` does (:func:`~tatok_core.workflows.rate_control.calibrate_bits`):
    every image is analysed first (its codes and bits wait in memory, ~12 bytes per patch), then each is
    coded with that threshold — images holding more information get more tokens, the mean is the budget.
    When the tokens depend on the kept set (refinement) only the bits wait, and each image is read and
    analysed again for its tokens: memory does not grow with the images' features and pixels.
    """
    mode = check_rate(tau, budget, budget_mode=budget_mode)
    out = Path(out_dir)
    failed: list[str] = []
    tokenizer = coder.tokenizer

    def readable() -> Iterator[tuple[Path, str, Tensor]]:
        for path, name in sources:
            try:
                yield Path(path), name, _read_image_at(path, longest_side)
            except ImageReadError as exc:
                failed.append(str(exc))

    def target(name: str) -> Path:
        return out / Path(name).with_suffix(SUFFIX)

    written: list[CompressedFile] = []
    calibration = None
    with progress_bar(progress) as bar:
        if budget is None:
            task = bar.add_task("compress", total=len(sources))
            for _, name, image in readable():
                written.append(coder.write_file(coder.tokens_of(image, tau), target(name)))
                bar.update(task, completed=len(written) + len(failed))
        else:
            task = bar.add_task("analyse", total=len(sources))
            second_pass = tokenizer.works_per_set
            # (path, name, bits, analysed): analysed None when the image is analysed again for its tokens
            waiting: list[tuple[Path, str, Tensor, Analysed | None]] = []
            with evaluating(tokenizer):
                for path, name, image in readable():
                    batch = image[None].to(coder.device)
                    analysed = None if second_pass else Analysed.of(tokenizer, batch)
                    bits = analysed_bits(tokenizer, batch) if analysed is None else analysed.bits
                    waiting.append((path, name, bits, analysed))
                    bar.update(task, completed=len(waiting) + len(failed))
                token_filter = rule_filter(tokenizer, mode)
                calibration = calibrate_bits(token_filter, [bits for _, _, bits, _ in waiting], budget)
                task = bar.add_task("compress", total=len(waiting))
                for path, name, _, analysed in waiting:
                    if analysed is None:  # the same image again: the same bits, now the chosen set's tokens
                        analysed = Analysed.of(tokenizer, _read_image_at(path, longest_side)[None].to(coder.device))
                    selection = token_filter.select(analysed.bits, calibration.threshold)
                    written.append(coder.write_file(analysed.tokens(selection, search=searches(token_filter)), target(name)))
                    bar.advance(task)
    return CompressReport(written, failed, calibration)


def decompress_files(coder: ImageCoder, files: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                     overwrite: bool = False, progress: bool = False) -> list[Path]:
    """Decode compressed files into ``out_dir``/STEM.png; an existing PNG stops it before any work unless
    ``overwrite``."""
    targets = [Path(out_dir) / Path(file).with_suffix(".png").name for file in files]
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None and not overwrite:
        raise TatokError(f"{clash} already exists (--overwrite replaces it)")
    with progress_bar(progress) as bar:
        task = bar.add_task("decompress", total=len(targets))
        for file, target in zip(files, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_image(target, coder.decompress_file(file))
            bar.advance(task)
    return targets
