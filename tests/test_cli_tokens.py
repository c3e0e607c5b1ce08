"""`tatok encode | decode | eval | show` on a small saved model: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from tatok_cli.main import cli
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.io.images import read_image, write_image
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows import encoding
from tatok_core.workflows.encoding import encode_files, token_meta
from tests.helpers import small_spec, work_order

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two saved tokenizers with different specs (so their token files are not interchangeable)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    return {entropy: Tokenizer(small_spec(entropy=entropy)).save_pretrained(root / entropy)
            for entropy in ("pixel", "prior")}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    crops = fixed_crops(ImageSource("builtin:photos:heldout").images, 32, 6)
    for i, crop in enumerate(crops):
        write_image(root / f"crop{i}.png", crop if i != 4 else crop[:, :21, :30])
    return root


@pytest.fixture
def run(models: dict[str, Path]):
    def invoke(*args: str | Path, model: str = "pixel") -> Result:
        return CliRunner().invoke(cli, [str(args[0]), "--model", str(models[model]), *map(str, args[1:])],
                                  terminal_width=200)

    return invoke


def one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_encode_decode_round_trip_matches_in_memory(run, models: dict[str, Path], images: Path, tmp_path: Path) -> None:
    result = run("encode", images, "-o", tmp_path / "tokens", "--tau", "0.7", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "encoded 6 images into" in result.stdout and "tau 0.7" in result.stdout
    result = run("decode", tmp_path / "tokens", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "decoded 6 images into" in result.stdout
    model = Tokenizer.from_pretrained(models["pixel"])
    for path in sorted(images.iterdir()):
        write_image(tmp_path / "reference.png", model.decode(model.encode(read_image(path)[None], tau=0.7))[0])
        assert (tmp_path / "out" / path.name).read_bytes() == (tmp_path / "reference.png").read_bytes()


def test_encode_refines_as_the_library_does(models: dict[str, Path], images: Path, tmp_path: Path) -> None:
    # a step large enough for a random model's codes to move in 3 steps
    model = Tokenizer.from_pretrained(models["pixel"]).with_pipeline_options(refine_lr=0.05)
    model.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(cli, ["encode", "--model", str(tmp_path / "model"), str(images), "-o",
                                      str(tmp_path / "refined.safetensors"), "--tau", "0.7", "--batch-size", "1",
                                      "--refine-steps", "3"])
    assert result.exit_code == 0, result.output
    stored = TokenDataset(tmp_path / "refined.safetensors")
    for i, path in enumerate(sorted(images.iterdir())):
        expected = model.encode(read_image(path)[None], tau=0.7, refine_steps=3)
        assert torch.equal(stored[i].global_codes, expected.global_codes[0])
        assert torch.equal(stored[i].codes, expected.per_image()[0].codes)
        assert not torch.equal(expected.global_codes, model.encode(read_image(path)[None], tau=0.7).global_codes)


def test_encode_searches_as_the_library_does(models: dict[str, Path], images: Path, tmp_path: Path) -> None:
    model = Tokenizer.from_pretrained(models["pixel"])
    result = CliRunner().invoke(cli, ["encode", "--model", str(models["pixel"]), str(images), "-o",
                                      str(tmp_path / "searched.safetensors"), "--tau", "0.7", "--batch-size", "1",
                                      "--search-sweeps", "2"])
    assert result.exit_code == 0, result.output
    stored = TokenDataset(tmp_path / "searched.safetensors")
    moved = 0
    for i, path in enumerate(sorted(images.iterdir())):
        expected = model.encode(read_image(path)[None], tau=0.7, search_sweeps=2).per_image()[0]
        assert torch.equal(stored[i].positions, expected.positions) and torch.equal(stored[i].codes, expected.codes)
        moved += not torch.equal(expected.positions, model.encode(read_image(path)[None], tau=0.7).per_image()[0].positions)
    assert moved  # the search chose other members somewhere: the option reached the encoder


def test_a_budget_encode_of_a_refining_model_writes_encode_s_tokens(models: dict[str, Path], images: Path,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrated on the bits first, then each image analysed again for its set's refined tokens."""
    model = Tokenizer.from_pretrained(models["pixel"]).with_pipeline_options(refine_steps=3, refine_lr=0.05)
    model.save_pretrained(tmp_path / "model")
    for batch in ("1", "4"):
        result = CliRunner().invoke(cli, ["encode", "--model", str(tmp_path / "model"), str(images), "-o",
                                          str(tmp_path / f"b{batch}.safetensors"), "--budget", "20",
                                          "--batch-size", batch])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "b1.safetensors").read_bytes() == (tmp_path / "b4.safetensors").read_bytes()
    stored = TokenDataset(tmp_path / "b1.safetensors")
    threshold = stored.metadata["threshold"]
    for i, path in enumerate(sorted(images.iterdir())):
        expected = model.encode(read_image(path)[None], mode="theta", theta=threshold).per_image()[0]
        assert torch.equal(stored[i].codes, expected.codes) and torch.equal(stored[i].positions, expected.positions)
        assert torch.equal(stored[i].global_codes, expected.global_codes)
    # only the bits waited for the threshold: every batch's features were made after it, one batch at a time
    events = work_order(monkeypatch, encoding)
    with TokenWriter(tmp_path / "lib.safetensors", spec_digest=model.spec.digest(), tokenizer="model",
                     meta=token_meta(model, budget=20.0)) as writer:
        encode_files(model, sorted(images.iterdir()), writer, budget=20.0, batch_size=4)
    batches = events.count("bits")  # same-size images batched: the 32² crops in 4 + 1, the odd one alone
    assert batches == 3 and events == ["bits"] * batches + ["calibrate"] + ["tokens"] * batches, events
    monkeypatch.undo()
    for mine, cli_made in zip(TokenDataset(tmp_path / "lib.safetensors"), stored):
        for part in ("global_codes", "codes", "positions"):
            assert torch.equal(getattr(mine, part), getattr(cli_made, part))


def test_encode_is_deterministic_and_batch_size_invariant(run, images: Path, tmp_path: Path) -> None:
    for name, batch in [("a", "1"), ("b", "4"), ("c", "4")]:
        result = run("encode", images, "-o", tmp_path / f"{name}.safetensors", "--budget", "20", "--batch-size", batch)
        assert result.exit_code == 0, result.output
        assert "calibrated theta" in result.stdout and "budget 20" in result.stdout
    data = [(tmp_path / f"{n}.safetensors").read_bytes() for n in "abc"]
    assert data[0] == data[1] == data[2]
    meta = TokenDataset(tmp_path / "a.safetensors").metadata
    assert meta["budget"] == 20 and meta["filter"] == {"name": "dtf", "options": {}}
    assert meta["mode"] == "theta" and np.float32(result.stdout.split("calibrated theta ")[1].split(":")[0]) == meta["threshold"]


def test_encode_with_a_baseline_filter(run, images: Path, tmp_path: Path) -> None:
    result = run("encode", images / "crop0.png", "-o", tmp_path / "t", "--filter", "topk", "--set", "filter.k=7")
    assert result.exit_code == 0, result.output
    assert [len(im.codes) for im in TokenDataset(tmp_path / "t")] == [7]


def test_a_corrupt_file_is_skipped_and_the_rest_written(run, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(images.iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(PNG + b"garbage")
    result = run("encode", folder, "-o", tmp_path / "tokens")
    assert result.exit_code == 1
    assert f"skipped cannot read image {folder / 'broken.png'}" in result.stderr
    assert [im.source for im in TokenDataset(tmp_path / "tokens")] == ["crop0.png", "crop1.png", "crop2.png"]


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_token_files_are_refused(run, images: Path, tmp_path: Path, damage: str) -> None:
    token_file = tmp_path / "t.safetensors"
    assert run("encode", images, "-o", token_file).exit_code == 0
    data = bytearray(token_file.read_bytes())
    if damage == "tamper":
        data[-3] ^= 1
    else:
        del data[-10:]
    token_file.write_bytes(bytes(data))
    result = run("decode", token_file, "-o", tmp_path / "out")
    one_line_error(result, "checksum mismatch" if damage == "tamper" else "truncated")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_token_file_of_another_tokenizer_is_refused(run, images: Path, tmp_path: Path) -> None:
    assert run("encode", images, "-o", tmp_path / "t").exit_code == 0
    one_line_error(run("decode", tmp_path / "t", "-o", tmp_path / "out", model="prior"), "another tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    write_image(tmp_path / "tiny.png", torch.rand(3, 3, 9))
    write_image(tmp_path / "huge.png", torch.zeros(3, 364, 364))  # 8281 patches of 4×4
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8junk")
    return tmp_path


@pytest.mark.parametrize(("args", "message"), [
    (["encode", "{d}/missing.png", "-o", "{d}/out"], "no such file or folder"),
    (["encode", "{d}/junk.jpg", "-o", "{d}/out"], "cannot read image"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out"], "smaller than one 4×4 patch"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--tau", "1.5"], "tau must be a number in [0, 1]"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--budget", "-2"], "budget must be a number of patch tokens per image > 0"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--tau", "0.5", "--budget", "3"], "exclude each other"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--set", "encoder.dim=3"], "--set takes filter.OPTION=VALUE"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--filter", "nope"], "unknown filter 'nope'"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--refine-steps", "-1"], "--refine-steps must be >= 0, got -1"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--search-sweeps", "-1"], "--search-sweeps must be >= 0, got -1"),
    (["compress", "{d}/tiny.png", "-o", "{d}/out", "--bpp-worth", "-1"], "--bpp-worth must be a finite number >= 0, got -1.0"),
    (["compress", "{d}/tiny.png", "-o", "{d}/out", "--bpp-worth", "nan"], "--bpp-worth must be a finite number >= 0, got nan"),
    (["decode", "{d}/missing", "-o", "{d}/out"], "no token shards"),
    (["show", "{d}/tiny.png", "-o", "{d}/out"], "smaller than one 4×4 patch"),
    (["show", "{d}/junk.jpg", "-o", "{d}/out"], "cannot read image"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--theta", "-1"], "theta must be a finite number of bits >= 0"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--epsilon", "nan"], "epsilon must be a finite number of bits >= 0"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--epsilon", "inf"], "epsilon must be a finite number of bits >= 0"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--theta", "2", "--epsilon", "3"], "theta and epsilon exclude each other"),
    (["encode", "{d}/tiny.png", "-o", "{d}/out", "--budget", "0"], "budget must be a number of patch tokens per image > 0"),
    (["encode", "{d}/huge.png", "-o", "{d}/out", "--budget", "9000"], "budget 9000 tokens per image is outside"),
    (["show", "{d}/tiny.png", "-o", "{d}/out", "--tau", "-0.1"], "tau must be a number in [0, 1]"),
    (["eval", "--taus", "0.5,x", "-o", "{d}/out"], "--taus takes comma-separated numbers"),
    (["eval", "--taus", "2", "-o", "{d}/out"], "tau must be a number in [0, 1]"),
    (["eval", "--whole", "--crop", "16", "-o", "{d}/out"], "--whole evaluates whole images"),
    (["eval", "--data", "{d}/junk.jpg", "-o", "{d}/out"], "no readable images in {d}/junk.jpg (1 unreadable): cannot read image"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, bad_inputs: Path, args: list[str], message: str) -> None:
    one_line_error(run(*(a.format(d=bad_inputs) for a in args)), message.format(d=bad_inputs))
    assert not (bad_inputs / "out").exists()
    assert sorted(p.name for p in bad_inputs.iterdir()) == ["huge.png", "junk.jpg", "tiny.png"]


def test_show_writes_a_panel(run, images: Path, tmp_path: Path) -> None:
    result = run("show", images / "crop1.png", "-o", tmp_path / "panel.png", "--tau", "0.5")
    assert result.exit_code == 0, result.output
    assert "patch tokens (tau 0.5)" in result.stdout
    assert (tmp_path / "panel.png").read_bytes().startswith(PNG)


def test_show_takes_the_absolute_rules_one_at_a_time(run, images: Path, tmp_path: Path) -> None:
    none = run("show", images / "crop1.png", "-o", tmp_path / "none.png", "--theta", "1e9")
    assert none.exit_code == 0, none.output
    assert "kept 1/64 patch tokens (theta 1e+09)" in none.stdout  # no token holds 1e9 bits: the floor min_keep = 1
    lossless = run("show", images / "crop1.png", "-o", tmp_path / "lossless.png", "--epsilon", "0")
    assert lossless.exit_code == 0 and "patch tokens (epsilon 0)" in lossless.stdout, lossless.output
    kept = int(re.search(r"kept (\d+)/64", lossless.stdout).group(1))  # every token holding any bits
    assert kept > 1
    one_line_error(run("show", images / "crop1.png", "-o", tmp_path / "both.png", "--tau", "0.5", "--theta", "3"),
                   "tau and theta exclude each other")


def test_eval_prints_a_table_and_writes_json_and_plot(run, images: Path, tmp_path: Path) -> None:
    result = run("eval", "--data", images, "--taus", "0.5,1", "--filters", "dtf,random,all", "--crop", "16",
                 "--count", "6", "-o", tmp_path / "rd")
    assert result.exit_code == 0, result.output
    assert "rate-distortion" in result.stdout and "PSNR" in result.stdout
    record = json.loads((tmp_path / "rd" / "rate_distortion.json").read_text())
    assert [(p["filter"], p["setting"]) for p in record["points"]][:2] == [("dtf", "tau=0.5"), ("dtf", "tau=1")]
    assert record["points"][-1]["mean_tokens"] == 16 and record["crop"] == 16
    assert (tmp_path / "rd" / "rate_distortion.png").read_bytes().startswith(PNG)
    assert f"wrote {tmp_path / 'rd' / 'rate_distortion.png'}" in result.stdout


def test_eval_oracle_levels_set_the_counts_each_image_is_decoded_at(run, images: Path, tmp_path: Path) -> None:
    result = run("eval", "--data", images, "--taus", "0.7", "--filters", "topk", "--crop", "16", "--count", "6",
                 "--oracle", "--oracle-levels", "4", "--refine-steps", "2", "-o", tmp_path / "rd")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "rd" / "rate_distortion.json").read_text())
    (oracle,) = [p for p in record["points"] if p["filter"] == "oracle"]
    assert oracle["setting"] == "5 counts per image" and record["oracle_levels"] == 4 and record["refine_steps"] == 2
    assert all(k % 4 == 0 for k in oracle["per_image"]["tokens"])  # 0, 4, …, 16 of a 16-token crop
    one_line_error(run("eval", "--data", images, "--oracle-levels", "4"), "--oracle-levels sets the oracle's counts: add --oracle")


@pytest.mark.slow
def test_torchrun_ranks_write_own_shards_with_one_shared_tau(models: dict[str, Path], images: Path,
                                                            tmp_path: Path) -> None:
    """Two gloo ranks: each encodes every 2nd file into its shard; the budget is met over both together."""
    script = tmp_path / "tatok_main.py"
    script.write_text("from tatok_cli.main import cli\ncli()\n")
    out = tmp_path / "tokens"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "encode", "--model", str(models["pixel"]), str(images), "-o", str(out), "--budget", "20"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest-r0.json", "manifest-r1.json",
                                                     "shard-r0-00000.safetensors", "shard-r1-00000.safetensors"]
    dataset = TokenDataset(out)
    assert [im.source for im in dataset] == [f"crop{i}.png" for i in (0, 2, 4, 1, 3, 5)]
    mean = sum(len(im.codes) for im in dataset) / len(dataset)
    assert abs(mean - 20) <= 1 and done.stdout.count("calibrated theta") == 1
    thetas = {line.rsplit("theta ", 1)[1].rstrip(")") for line in done.stdout.splitlines() if "encoded" in line}
    assert len(thetas) == 1 and len(done.stdout.splitlines()) >= 3  # every rank applied the same θ
    assert TokenDataset(out).metadata["threshold"] == np.float32(thetas.pop())  # printed as float32
