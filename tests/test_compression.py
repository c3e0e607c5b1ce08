"""Compressed files: exact round trips at the prior's code length, and every bad file refused by name."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tatok_cli.main import cli
from tatok_core.contract.bitrate import token_bits
from tatok_core.contract.errors import CompositionError, GenerationError, TatokError, TokenFileError
from tatok_core.contract.tokens import Tokens
from tatok_core.io.images import read_image, write_image
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows import compression
from tatok_core.workflows.compression import ImageCoder, compress_files
from tatok_core.workflows.data import load_builtin_photo
from tatok_core.workflows.generation import build_generator, generator_facts
from tatok_core.workflows.rate_control import calibrate_threshold, with_rule
from tatok_core.io.images import fit_longest_side
from tatok_plugins.context_prior import sparse_tokens
from tests.helpers import work_order

HEADER_BYTES = 20  # magic 4, pairing 8, four one-byte sizes, checksum 4 (module docs)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained()  # the default: FSQ (8, 8, 8, 5, 5), 32 globals, 8-px patches


def peaked_coder(tokenizer: Tokenizer, seed: int = 0) -> ImageCoder:
    """The default tokenizer with an untrained ``context`` prior whose distributions are far from uniform."""
    torch.manual_seed(seed)
    facts = generator_facts(tokenizer.quantizer.code_factors, tokenizer.num_global, (4, 4), tokenizer.patch_size)
    prior = build_generator("context", facts, width=8, rings=1, depth=1)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.7)
    return ImageCoder(tokenizer, prior)


def random_tokens(rows: int, cols: int, density: float, seed: int) -> Tokens:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(12800, (1, rows, cols), generator=gen)
    kept = torch.rand(1, rows, cols, generator=gen) < density
    return sparse_tokens(torch.randint(12800, (1, 32), generator=gen), codes, kept, (8 * rows - 3, 8 * cols))


def same(a: Tokens, b: Tokens) -> bool:
    return (all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("global_codes", "codes", "positions"))
            and a.grid == b.grid and a.image_size == b.image_size)


@given(rows=st.integers(1, 6), cols=st.integers(1, 6), density=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
       seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_tokens_come_back_exactly_in_the_prior_s_code_length(tokenizer: Tokenizer, rows: int, cols: int,
                                                             density: float, seed: int) -> None:
    coder = peaked_coder(tokenizer)
    tokens = random_tokens(rows, cols, density, seed)
    data = coder.compress_tokens(tokens)
    assert same(coder.decompress_tokens(data), tokens)
    with torch.no_grad():
        code_bits = -coder.prior.log_likelihood(tokens).item() / math.log(2)
    payload_bits = 8 * (len(data) - HEADER_BYTES)
    assert payload_bits <= 1.01 * code_bits + 64  # what the prior says, to a few bytes (fewer where the coder
    # gives an improbable choice the least probability it can represent, more than the prior did)


def test_a_photo_compresses_to_its_coded_size_and_decodes_whatever_the_thread_count(tokenizer: Tokenizer) -> None:
    """The shipped prior on a held-out photo: the file is the code length plus the header, and it decodes to
    the very tokens (and so the very image) the tokenizer made, though the caller's thread counts differ."""
    coder = ImageCoder.from_pretrained()
    image = fit_longest_side(load_builtin_photo("rocket"), 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tokens = coder.tokens_of(image)
        data = coder.compress_tokens(tokens)
        torch.set_num_threads(1)
        back = coder.decompress_tokens(data)
    finally:
        torch.set_num_threads(threads)
    assert same(back, tokens) and 0 < tokens.codes.numel() < tokens.num_patches
    with torch.no_grad():
        code_bits = -coder.prior.log_likelihood(tokens).item() / math.log(2)
    assert code_bits - 8 <= 8 * (len(data) - HEADER_BYTES - 1) <= code_bits + 64  # the height 128 takes two bytes
    counted = token_bits(tokens.lengths, tokens.num_patches, 32, 12800, tokens.image_size).total.item()
    assert 8 * len(data) < 0.92 * counted  # the point of it: fewer bits than the plain count, header and all
    with torch.inference_mode():
        expected = coder.tokenizer.decode(tokens)[0]
    assert torch.equal(coder.decompress(data), expected)


def test_a_file_decodes_where_another_machine_s_arithmetic_differs_in_the_last_bits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another machine sums the prior's float64 arithmetic in another order (~1e-15 relative); here the
    reading coder's weights differ by 1e-8 relative, ten million times more. Its files still decode to
    the very tokens written: the range coder sees only logits rounded to 1/64 nat. Fed the prior's
    float probabilities, as format version 2 was, the same reader fails on these photos."""
    writer, reader = ImageCoder.from_pretrained(), ImageCoder.from_pretrained()
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in reader.prior.parameters():  # float64: the coder's own copy
            weight.mul_(1 + 1e-8 * torch.randn_like(weight))
    photos = [writer.tokens_of(fit_longest_side(load_builtin_photo(name), 128))
              for name in ("rocket", "coffee", "chelsea")]
    files = [writer.compress_tokens(tokens) for tokens in photos]
    assert all(same(reader.decompress_tokens(data), tokens) for data, tokens in zip(files, photos))

    monkeypatch.setattr(compression, "choice_probabilities", lambda logits: torch.softmax(logits.double(), -1).numpy())
    failed = 0
    for tokens in photos:
        try:
            failed += not same(reader.decompress_tokens(writer.compress_tokens(tokens)), tokens)
        except TokenFileError:
            failed += 1
    assert failed == len(photos)


def test_bad_files_are_refused_by_name(tokenizer: Tokenizer) -> None:
    coder = peaked_coder(tokenizer)
    data = coder.compress_tokens(random_tokens(4, 5, 0.5, 1))
    with pytest.raises(TokenFileError, match=r"photo\.ttk: not a compressed TaTok image"):
        coder.decompress_tokens(b"\x89PNG\r\n" + data, "photo.ttk")
    with pytest.raises(TokenFileError, match="photo.ttk: format version 4; this tatok reads 3$"):
        coder.decompress_tokens(data[:3] + b"\x04" + data[4:], "photo.ttk")
    for earlier in (b"\x01", b"\x02"):
        with pytest.raises(TokenFileError, match=f"photo.ttk: format version {earlier[0]}, written by an earlier tatok"
                                                 ".*compress the image again"):
            coder.decompress_tokens(data[:3] + earlier + data[4:], "photo.ttk")
    with pytest.raises(TokenFileError, match="photo.ttk: written by another tokenizer or prior"):
        peaked_coder(tokenizer, seed=1).decompress_tokens(data, "photo.ttk")
    with pytest.raises(TokenFileError, match="photo.ttk: truncated header"):
        coder.decompress_tokens(data[:13], "photo.ttk")
    with pytest.raises(TokenFileError, match=r"photo.ttk: damaged \(grid"):
        coder.decompress_tokens(data[:12] + bytes([99]) + data[13:], "photo.ttk")  # an image size off its grid
    with pytest.raises(TokenFileError, match=r"photo.ttk: damaged \(a 4294967295×"):
        coder.decompress_tokens(data[:12] + b"\xff\xff\xff\xff\x0f" + data[13:], "photo.ttk")  # no walk over 2^32 rows
    for at in (17, 24, len(data) - 7, len(data) - 1):  # a flipped bit in the checksum or anywhere in the payload
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        with pytest.raises(TokenFileError, match="photo.ttk: (the decoded tokens fail their checksum|damaged)"):
            coder.decompress_tokens(bytes(flipped), "photo.ttk")


def test_a_prior_that_cannot_code_these_tokens_fails_when_the_coder_is_built(tokenizer: Tokenizer) -> None:
    facts = generator_facts(tokenizer.quantizer.code_factors, tokenizer.num_global, (4, 4), tokenizer.patch_size)
    with pytest.raises(CompositionError, match=r"generator 'adaptive'.*cannot drive the entropy coder of tokenizer "
                                               r"'tatok-small8-covered'.*has no walk\(\)"):
        ImageCoder(tokenizer, build_generator("adaptive", facts, width=16, depth=1, heads=2))
    with pytest.raises(GenerationError, match="generator 'adaptive'.* cannot drive an entropy coder"):
        build_generator("adaptive", facts, width=16, depth=1, heads=2).walk(lambda logits, _: logits.argmax(-1),
                                                                            grid=(4, 4))
    other = generator_facts((8, 8), tokenizer.num_global, (4, 4), tokenizer.patch_size)
    with pytest.raises(CompositionError, match=r"models code_factors=\(8, 8\) but tokenizer 'tatok-small8-covered' "
                                               r"writes code_factors=\(8, 8, 8, 5, 5\)"):
        ImageCoder(tokenizer, build_generator("context", other, width=8))


def test_cli_compresses_and_decompresses_to_the_tokenizer_s_reconstruction(tmp_path: Path) -> None:
    """Compressed in another process (with its own thread count), decoded in this one."""
    photo = tmp_path / "rocket.png"
    write_image(photo, fit_longest_side(load_builtin_photo("rocket"), 64))
    runner = CliRunner()
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    done = subprocess.run([sys.executable, "-m", "tatok_cli", "compress", str(photo), str(broken), "-o",
                           str(tmp_path / "small"), "--theta", "211"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "COLUMNS": "200"})
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "skipped" in output and "broken.png" in output  # the rest is written
    compressed = tmp_path / "small" / "rocket.ttk"
    assert f"{compressed.stat().st_size}" in output and "rocket.ttk" in output
    assert not (tmp_path / "small" / "broken.ttk").exists()
    done = runner.invoke(cli, ["decompress", str(compressed), "-o", str(tmp_path / "back")])
    assert done.exit_code == 0, done.output
    coder = ImageCoder.from_pretrained()
    with torch.inference_mode():
        tokens = coder.decompress_tokens(compressed.read_bytes())
        expected = (coder.tokenizer.decode(tokens)[0].clamp(0, 1) * 255).round() / 255
    assert torch.equal(read_image(tmp_path / "back" / "rocket.png"), expected)
    done = runner.invoke(cli, ["decompress", str(compressed), "-o", str(tmp_path / "back")])
    assert done.exit_code == 1 and "rocket.png already exists (--overwrite replaces it)" in done.output
    done = runner.invoke(cli, ["compress", str(photo), "-o", str(tmp_path / "more"), "--theta", "100"])
    assert done.exit_code == 0, done.output  # another rule keeps more tokens; the same model decodes them
    more = coder.decompress_tokens((tmp_path / "more" / "rocket.ttk").read_bytes())
    assert more.codes.numel() > tokens.codes.numel()
    assert coder.tokenizer.rate_aware and coder.tokenizer.refinement[0] > 0  # fitted to photo and prior
    done = runner.invoke(cli, ["compress", str(photo), "-o", str(tmp_path / "plain"), "--theta", "211",
                               "--refine-steps", "0"])
    assert done.exit_code == 0, done.output
    plain = coder.decompress_tokens((tmp_path / "plain" / "rocket.ttk").read_bytes())
    assert torch.equal(plain.positions, tokens.positions)  # the same set, other codes
    assert not torch.equal(plain.global_codes, tokens.global_codes)
    original = read_image(photo)[None]
    errors = [(coder.tokenizer.decode(t) - original).pow(2).mean() for t in (tokens, plain)]
    assert errors[0] < errors[1]
    compressed.write_bytes(compressed.read_bytes()[:-3])
    done = runner.invoke(cli, ["decompress", str(compressed), "-o", str(tmp_path / "again")])
    assert done.exit_code == 1 and f"{compressed}: damaged" in done.output


def test_a_budget_calibrates_one_threshold_on_the_images_and_the_files_keep_it(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--budget``: the mean kept count over the images is the budget (one shared θ, so the busier photo
    gets more tokens), the threshold is the one ``calibrate_threshold`` finds on the same images, and
    every file decodes to the tokens that threshold keeps. The default refines its tokens for the kept
    set, so only each image's bits wait for the threshold: no image's features are held (the analysis
    that keeps them runs per image after calibration)."""
    names = ("coins", "rocket", "coffee")
    sources = []
    for name in names:
        sources.append((tmp_path / f"{name}.png", name))
        write_image(sources[-1][0], fit_longest_side(load_builtin_photo(name), 48))
    sources.append((tmp_path / "broken.png", "broken"))
    sources[-1][0].write_text("not an image")
    coder = ImageCoder.from_pretrained()
    events = work_order(monkeypatch, compression)
    report = compress_files(coder, sources, tmp_path / "small", budget=12.0)
    assert events == ["bits"] * 3 + ["calibrate"] + ["tokens"] * 3
    monkeypatch.undo()
    assert [f.path.name for f in report.written] == ["coins.ttk", "rocket.ttk", "coffee.ttk"]
    assert len(report.failed) == 1 and "broken.png" in report.failed[0]
    kept = [f.kept for f in report.written]
    assert abs(sum(kept) / 3 - 12.0) <= 0.5 and len(set(kept)) > 1  # the mean is the budget, not each count
    images = [read_image(path) for path, _ in sources[:3]]
    theta = calibrate_threshold(coder.tokenizer, [image[None] for image in images], 12.0, mode="theta").threshold
    assert report.calibration is not None and report.calibration.threshold == theta
    kept_by = with_rule(coder.tokenizer, theta=theta)
    for file, image in zip(report.written, images):
        with torch.inference_mode():
            expected = kept_by.encode(image[None])
        assert same(coder.decompress_tokens(file.path.read_bytes(), str(file.path)), expected)
    with pytest.raises(TatokError, match="budget 5000 tokens per image is outside what these images can reach"):
        compress_files(coder, sources[:1], tmp_path / "none", budget=5000.0)
    done = CliRunner().invoke(cli, ["compress", str(sources[0][0]), "-o", str(tmp_path / "cli"), "--budget", "10",
                                    "--theta", "100"])
    assert done.exit_code != 0 and "theta and budget exclude each other" in done.output
