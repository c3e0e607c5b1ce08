"""The bad-input corpus: every user error is one line, exit 1, no traceback, and leaves nothing behind.

CLI cases run through click's CliRunner (in process, so writes can be made to fail) or as real
subprocesses (``python -m tatok_cli.main``) where processes must race or be killed; library cases
call the Tokenizer and the token-set reader directly. Models are tiny random ones saved to a temp dir.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from tatok_cli.main import cli
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.contract.errors import OutputBusyError, TatokError, TokenFileError
from tatok_core.io.images import write_image
from tatok_core.io.locking import OutputLock
from tatok_core.io.tokenfile import TokenDataset, resume_position, weights_digest
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.contract.tokens import Tokens
from tests.helpers import small_spec

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"crop{i}.png" for i in range(6)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two saved tokenizers of one architecture and name ("tiny") with different weights ("a", "b")."""
    root = tmp_path_factory.mktemp("models")
    saved = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        saved[name] = Tokenizer(small_spec(entropy="pixel")).save_pretrained(root / name / "tiny")
    return saved


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, crop in zip(NAMES, fixed_crops(ImageSource("builtin:photos:heldout").images, 16, len(NAMES))):
        write_image(root / name, crop)
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "recipe.toml"
    path.write_text(small_spec(entropy="pixel").to_toml())
    return path


def invoke(*args: str | Path, model: Path | None = None) -> Result:
    words = [str(a) for a in args]
    if model is not None:
        words[1:1] = ["--model", str(model)]
    return CliRunner().invoke(cli, words, terminal_width=200)


def one_line_error(result: Result, *keywords: str) -> None:
    """Exit 1, no traceback, exactly one line on stderr, starting 'error:' and holding every keyword."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in keywords:
        assert word in lines[0], (word, lines[0])


def listing(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def encoded(models: dict[str, Path], images: Path, out: Path, *extra: str, model: str = "a") -> Result:
    result = invoke("encode", images, "-o", out, *extra, model=models[model])
    assert result.exit_code == 0, result.output
    return result


# -- option values, checked at parse time -----------------------------------------------------------
@pytest.mark.parametrize(("args", "keywords"), [
    (["encode", "{img}", "-o", "{d}/t", "--set", "filter.tau=abc"], ["filter.tau='abc'", "takes a float"]),
    (["encode", "{img}", "-o", "{d}/t", "--filter", "topk", "--tau", "0.5"], ["topk", "has no tau", "filter.k"]),
    (["encode", "{img}", "-o", "{d}/t", "--filter", "topk", "--budget", "3"], ["has no tau", "budget 3"]),
    (["encode", "{img}", "-o", "{d}/t", "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    (["encode", "{img}", "-o", "{d}/t", "--shard-size", "0"], ["--shard-size must be >= 1"]),
    (["encode", "{img}", "-o", "{d}/t", "--budget", "3", "--resume"], ["--budget", "cannot be resumed"]),
    (["decode", "{d}/t", "-o", "{d}/out", "--batch-size", "-1"], ["--batch-size must be >= 1, got -1"]),
    (["eval", "--data", "{img}", "--batch-size", "0", "-o", "{d}/rd"], ["--batch-size must be >= 1"]),
    (["compose", "--set", "encoder.dim=-4", "-o", "{d}/s.toml"], ["encoder.dim=-4", "encoder 'vit'"]),
    (["compose", "--set", "encoder.dim=abc", "-o", "{d}/s.toml"], ["encoder.dim='abc'", "takes an int"]),
    (["compose", "--set", "filter.tau=abc", "-o", "{d}/s.toml"], ["filter.tau='abc'", "filter 'dtf'"]),
    (["train", "{recipe}", "--out", "{d}/run", "--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["train", "{recipe}", "--out", "{d}/run", "--set", "train.lr=abc"], ["train.lr='abc'", "number"]),
    (["train", "{recipe}", "--out", "{d}/run", "--set", "train.lr=-1"], ["train.lr=-1", "> 0"]),
    (["train", "{recipe}", "--out", "{d}/run", "--set", "train.reconstruction=ssim"], ["ssim", "mse, l1"]),
    (["train", "{recipe}", "--out", "{d}/run", "--set", "train.crop=0"], ["train.crop=0", ">= 1"]),
    (["train", "{recipe}", "--out", "{d}/run", "--set", "train.bf16=1"], ["train.bf16=1", "bool"]),
])
def test_bad_option_values_are_one_line_and_write_nothing(models: dict[str, Path], images: Path, recipe: Path,
                                                          tmp_path: Path, args: list[str], keywords: list[str]) -> None:
    words = [a.format(img=images / "crop0.png", d=tmp_path, recipe=recipe) for a in args]
    takes_model = words[0] in ("encode", "decode", "eval")
    one_line_error(invoke(*words, model=models["a"] if takes_model else None), *keywords)
    assert list(tmp_path.iterdir()) == []


# -- outputs that cannot be written -------------------------------------------------------------------
@pytest.mark.parametrize("command", ["encode", "decode", "eval", "show", "demo", "compose", "train"])
def test_output_under_a_regular_file_is_one_line(models: dict[str, Path], images: Path, recipe: Path,
                                                 tmp_path: Path, command: str) -> None:
    """An output path whose parent is a file cannot be created, even by root."""
    encoded(models, images, tmp_path / "t")
    (tmp_path / "file").write_text("not a folder")
    before = listing(tmp_path)
    args = {
        "encode": ["encode", images, "-o", tmp_path / "file/t"],
        "decode": ["decode", tmp_path / "t", "-o", tmp_path / "file/out"],
        "eval": ["eval", "--data", images, "--crop", "16", "--count", "2", "--taus", "0.5", "--filters", "dtf",
                 "-o", tmp_path / "file/rd"],
        "show": ["show", images / "crop0.png", "-o", tmp_path / "file/panel.png"],
        "demo": ["demo", "--max-side", "32", "-o", tmp_path / "file/demo.png"],
        "compose": ["compose", "-o", tmp_path / "file/spec.toml"],
        "train": ["train", recipe, "--data", images, "--out", tmp_path / "file/run", "--steps", "1"],
    }[command]
    model = None if command in ("compose", "train") else models["a"]
    one_line_error(invoke(*args, model=model), str(tmp_path / "file"))
    assert listing(tmp_path) == before


def _disk_full(path: os.PathLike[str] | str, *_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _read_only(path: os.PathLike[str] | str, *_: object) -> None:
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


def _torn_then(fail: Callable[..., None]) -> Callable[[Path, bytes], None]:
    """A durable write that leaves half a temp file behind and then fails, as a full disk does."""

    def write(path: Path, data: bytes) -> None:
        path.with_name(f".{path.name}.tmp").write_bytes(data[: len(data) // 2])
        fail(path)

    return write


@pytest.mark.parametrize(("fail", "keywords"), [(_disk_full, ["No space left on device", "disk full"]),
                                                (_read_only, ["Permission denied"])])
@pytest.mark.parametrize("target", ["directory", "single file", "appending"])
def test_encode_into_a_full_or_read_only_disk_leaves_the_target_as_it_was(
    models: dict[str, Path], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    fail: Callable[..., None], keywords: list[str], target: str,
) -> None:
    out = tmp_path / ("t.safetensors" if target == "single file" else "t")
    if target == "appending":
        encoded(models, images, out, "--shard-size", "2")
    before = listing(tmp_path)
    monkeypatch.setattr("tatok_core.io.tokenfile.write_durably", _torn_then(fail))
    inputs, extra = (images / "crop0.png", ["--append"]) if target == "appending" else (images, [])
    one_line_error(invoke("encode", inputs, "-o", out, "--shard-size", "2", *extra, model=models["a"]), *keywords)
    assert listing(tmp_path) == before  # no temp file, no staging folder, no lock file, target unchanged


@pytest.mark.parametrize(("fail", "keywords"), [(_disk_full, ["No space left on device"]),
                                                (_read_only, ["Permission denied"])])
def test_decode_into_a_full_or_read_only_disk_leaves_nothing(models: dict[str, Path], images: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             fail: Callable[..., None], keywords: list[str]) -> None:
    encoded(models, images, tmp_path / "t")
    before = listing(tmp_path)
    calls = []

    def write_image(path: Path, image: torch.Tensor) -> None:  # the 3rd PNG fails
        calls.append(path)
        if len(calls) == 3:
            fail(path)
        path.write_bytes(b"png")

    monkeypatch.setattr("tatok_core.workflows.encoding.write_image", write_image)
    one_line_error(invoke("decode", tmp_path / "t", "-o", tmp_path / "out", model=models["a"]), *keywords)
    assert listing(tmp_path) == before and len(calls) == 3


def test_show_into_a_read_only_place_leaves_nothing(models: dict[str, Path], images: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def savefig(self: object, path: Path, **_: object) -> None:
        Path(path).write_bytes(b"half")
        _read_only(path)

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", savefig)
    one_line_error(invoke("show", images / "crop0.png", "-o", tmp_path / "p.png", model=models["a"]),
                   "Permission denied", "p.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04" + bytes(40)])
def test_a_corrupt_checkpoint_is_one_line(recipe: Path, tmp_path: Path, content: bytes) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(content)
    one_line_error(invoke("train", recipe, "--out", tmp_path / "run", "--resume", "--steps", "1"),
                   "checkpoint.pt is unreadable", "delete it to start over")
    assert listing(tmp_path) == {"run/checkpoint.pt": content}


# -- token sets: whole, unchanged, and made by these weights -------------------------------------------
def test_encoding_into_an_existing_set_names_the_real_options(models: dict[str, Path], images: Path,
                                                              tmp_path: Path) -> None:
    encoded(models, images, tmp_path / "t")
    before = listing(tmp_path)
    one_line_error(invoke("encode", images, "-o", tmp_path / "t", model=models["a"]), "holds 1 shard", "--append")
    one_line_error(invoke("encode", images, "-o", tmp_path / "t", "--resume", model=models["a"]), "nothing to resume")
    assert listing(tmp_path) == before
    encoded(models, images / "crop0.png", tmp_path / "t", "--append")
    assert [im.source for im in TokenDataset(tmp_path / "t")] == [*NAMES, "crop0.png"]
    one_line_error(invoke("encode", images, "-o", tmp_path / "t", "--append", model=models["b"]),
                   "weights_digest", "cannot add to it")


def test_tokens_of_other_weights_are_refused_unless_allowed(models: dict[str, Path], images: Path,
                                                            tmp_path: Path) -> None:
    encoded(models, images, tmp_path / "t")
    a, b = (weights_digest(Tokenizer.from_pretrained(models[k])) for k in "ab")
    assert a != b and TokenDataset(tmp_path / "t").metadata["weights_digest"] == a
    one_line_error(invoke("decode", tmp_path / "t", "-o", tmp_path / "out", model=models["b"]),
                   f"tokens made by weights {a}", f"this model's weights {b}", "--allow-foreign-weights")
    assert not (tmp_path / "out").exists()
    result = invoke("decode", tmp_path / "t", "-o", tmp_path / "out", "--allow-foreign-weights", model=models["b"])
    assert result.exit_code == 0 and len(list((tmp_path / "out").iterdir())) == len(NAMES)


@pytest.mark.parametrize(("damage", "keywords"), [
    ("delete a shard", ["shard-00001.safetensors", "listed in manifest.json are missing"]),
    ("copy a shard in", ["shard-00009.safetensors", "in no manifest"]),
    ("swap in another set's shard", ["shards disagree on meta", "shard-00001.safetensors"]),
    ("flip a bit in the manifest", ["manifest.json", "checksum mismatch"]),
    ("delete the manifest", ["no manifest.json", "missing or extra shards"]),
    ("flip a bit in a shard", ["shard-00002.safetensors", "checksum mismatch"]),
])
def test_damaged_token_sets_are_refused_by_decode(models: dict[str, Path], images: Path, tmp_path: Path,
                                                  damage: str, keywords: list[str]) -> None:
    encoded(models, images, tmp_path / "t", "--shard-size", "2")
    encoded(models, images, tmp_path / "other", "--shard-size", "2", "--tau", "0.3")
    shard = tmp_path / "t" / "shard-00001.safetensors"
    if damage == "delete a shard":
        shard.unlink()
    elif damage == "copy a shard in":
        shutil.copy(shard, tmp_path / "t" / "shard-00009.safetensors")
    elif damage == "swap in another set's shard":  # same model, other tau
        shutil.copy(tmp_path / "other" / shard.name, shard)
    elif damage == "flip a bit in the manifest":
        data = bytearray((tmp_path / "t" / "manifest.json").read_bytes())
        data[data.index(b'"images":') + 9] ^= 0x01  # an image count: still valid JSON
        (tmp_path / "t" / "manifest.json").write_bytes(bytes(data))
    elif damage == "delete the manifest":
        (tmp_path / "t" / "manifest.json").unlink()
    else:
        data = bytearray((tmp_path / "t" / "shard-00002.safetensors").read_bytes())
        data[-1] ^= 0x01
        (tmp_path / "t" / "shard-00002.safetensors").write_bytes(bytes(data))
    one_line_error(invoke("decode", tmp_path / "t", "-o", tmp_path / "out", model=models["a"]), *keywords)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_swapped_shard_of_the_same_tau_is_caught_by_the_manifest(models: dict[str, Path], images: Path,
                                                                tmp_path: Path) -> None:
    """A shard moved between two sets of one model and τ has a valid header: only the manifest knows."""
    encoded(models, images, tmp_path / "t", "--shard-size", "3")
    encoded(models, images / "crop0.png", tmp_path / "u")
    shutil.copy(tmp_path / "u" / "shard-00000.safetensors", tmp_path / "t" / "shard-00000.safetensors")
    with pytest.raises(TokenFileError, match="not the shard manifest.json lists"):
        TokenDataset(tmp_path / "t")


def test_a_lost_rank_is_detected(models: dict[str, Path], tmp_path: Path) -> None:
    from tatok_core.io.tokenfile import TokenWriter

    meta = {"codebook_size": 8, "num_global": 1, "patch_size": 4}
    tokens = Tokens(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]), (1, 1), (4, 4))
    for rank in (0, 1):
        with TokenWriter(tmp_path / "t", spec_digest="d", tokenizer="x", meta=meta, rank=rank, world_size=3,
                         append=rank > 0) as w:
            w.write(tokens, [(f"{rank}.png", rank)])
    with pytest.raises(TokenFileError, match=r"written by 3 ranks, but rank\(s\) \[2\] left no manifest"):
        TokenDataset(tmp_path / "t")


def test_resume_position_follows_the_inputs() -> None:
    inputs = [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    assert resume_position([], inputs) == 0
    assert resume_position([("a", 1), ("c", 3)], inputs) == 3  # b was skipped as unreadable
    with pytest.raises(TokenFileError, match="'a' .1 bytes.*not among these inputs in this order"):
        resume_position([("c", 3), ("a", 1)], inputs)
    with pytest.raises(TokenFileError, match="'b' .5 bytes"):
        resume_position([("b", 5)], inputs)  # same name, other file


# -- concurrent writers ---------------------------------------------------------------------------------
def _tatok(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "tatok_cli.main", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_two_encodes_into_one_output_never_lose_a_result(models: dict[str, Path], images: Path,
                                                         tmp_path: Path) -> None:
    """Two real processes race for one output: exactly one wins, the other says why; nothing is lost."""
    out = tmp_path / "t"
    runs = [subprocess.Popen(_tatok("encode", "--model", models[m], images, "-o", out, "--shard-size", "2"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for m in "ab"]
    done = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 1], done
    loser = next(err for code, _, err in done if code == 1)
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1, loser
    assert "another tatok process" in loser or "holds 3 shard(s) already" in loser, loser
    winner = "ab"[next(i for i, (code, _, _) in enumerate(done) if code == 0)]
    dataset = TokenDataset(out)
    assert [im.source for im in dataset] == NAMES
    assert dataset.metadata["weights_digest"] == weights_digest(Tokenizer.from_pretrained(models[winner]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_held_output_is_refused_at_once(models: dict[str, Path], images: Path, tmp_path: Path) -> None:
    encoded(models, images, tmp_path / "t")
    with OutputLock(tmp_path / "t2"), OutputLock(tmp_path / "out"):
        one_line_error(invoke("encode", images, "-o", tmp_path / "t2", model=models["a"]),
                       "another tatok process", f"pid {os.getpid()}")
        one_line_error(invoke("decode", tmp_path / "t", "-o", tmp_path / "out", model=models["a"]),
                       "another tatok process")
        with pytest.raises(OutputBusyError):
            OutputLock(tmp_path / "out").acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # lock files are gone with their holders


def test_decode_never_overwrites_unless_asked(models: dict[str, Path], images: Path, tmp_path: Path) -> None:
    encoded(models, images, tmp_path / "t")
    out = tmp_path / "out"
    out.mkdir()
    (out / "crop3.png").write_bytes(b"mine")
    one_line_error(invoke("decode", tmp_path / "t", "-o", out, model=models["a"]), "crop3.png already exists",
                   "--overwrite")
    assert listing(out) == {"crop3.png": b"mine"}
    assert invoke("decode", tmp_path / "t", "-o", out, "--overwrite", model=models["a"]).exit_code == 0
    assert sorted(listing(out)) == NAMES and (out / "crop3.png").read_bytes() != b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t"]


def test_decode_clears_what_a_killed_decode_left(models: dict[str, Path], images: Path, tmp_path: Path) -> None:
    encoded(models, images, tmp_path / "t")
    for stray in (".out.decoding/crop0.png", "..out.decoding.tmp-x1/.crop1.png.abc.tmp", ".out.lock"):
        (tmp_path / stray).parent.mkdir(exist_ok=True)
        (tmp_path / stray).write_bytes(b"left by a kill")
    assert invoke("decode", tmp_path / "t", "-o", tmp_path / "out", model=models["a"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t"] and sorted(listing(tmp_path / "out")) == NAMES


# -- kill -9 at the worst moments, then --resume -----------------------------------------------------------
KILLER = textwrap.dedent('''
    """Run `tatok encode`, but stop dead (marker file, then sleep) at one chosen moment, to be killed."""
    import os, sys, time
    from pathlib import Path
    import tatok_core.io.tokenfile as tokenfile
    stage, marker = sys.argv[1], Path(sys.argv[2])

    def hang():
        marker.write_text("ready")
        time.sleep(600)

    if stage == "between shards":
        flush, count = tokenfile.TokenWriter._flush, []
        def stop_after_two(self, items):
            flush(self, items)
            count.append(1)
            if len(count) == 2:
                hang()
        tokenfile.TokenWriter._flush = stop_after_two
    elif stage == "inside a shard write":
        write, count = tokenfile.write_durably, []
        def torn(path, data):
            count.append(1)
            if len(count) == 3:
                path.with_name(f".{path.name}.tmp").write_bytes(data[: len(data) // 2])
                hang()
            write(path, data)
        tokenfile.write_durably = torn
    else:  # "during the commit": after the first shard moved into the target
        replace = os.replace
        def stop_in_commit(src, dst):
            replace(src, dst)
            if Path(src).name.startswith("shard-") and not Path(dst).parent.name.startswith("."):
                hang()
        tokenfile.os.replace = stop_in_commit
    from tatok_cli.main import cli
    cli(sys.argv[3:])
''')


@pytest.mark.parametrize("stage", ["between shards", "inside a shard write", "during the commit"])
def test_kill_during_encode_then_resume_equals_an_uninterrupted_run(models: dict[str, Path], images: Path,
                                                                    tmp_path: Path, stage: str) -> None:
    args = ["encode", "--model", str(models["a"]), str(images), "--shard-size", "2", "--batch-size", "1"]
    reference = tmp_path / "reference"
    assert invoke(*args, "-o", reference).exit_code == 0
    work = tmp_path / "work"
    work.mkdir()
    out, marker = work / "t", tmp_path / "marker"
    (tmp_path / "killer.py").write_text(KILLER)
    run = subprocess.Popen([sys.executable, str(tmp_path / "killer.py"), stage, str(marker), *args, "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        while not marker.exists():
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
    finally:
        run.kill()
        run.wait()
    if stage == "during the commit":  # half committed: readers refuse until a writer finishes the commit
        with pytest.raises(TokenFileError, match="interrupted while committing.*--resume. finishes it"):
            TokenDataset(out)
    else:  # the previous state: no token set at all
        assert not out.exists()
    result = invoke(*args, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    kept = {"between shards": 4, "inside a shard write": 4, "during the commit": 6}[stage]
    assert f"after {kept} kept from the interrupted run" in result.stdout
    assert listing(out) == listing(reference)  # bit for bit
    assert sorted(p.name for p in work.iterdir()) == ["t"]  # no staging folder, temp file or lock left


def test_a_wrong_resume_keeps_and_a_fresh_run_discards_the_leftovers(models: dict[str, Path], images: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C keeps the full staged shards (as a kill does); a --resume with other inputs is refused and
    keeps them; a run without --resume drops them and says so."""
    from tatok_core.io import tokenfile

    flush, count = tokenfile.TokenWriter._flush, []

    def interrupted(self: tokenfile.TokenWriter, items: object) -> None:
        flush(self, items)
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tokenfile.TokenWriter, "_flush", interrupted)
    args = ["encode", images, "-o", tmp_path / "t", "--shard-size", "2", "--batch-size", "1"]
    assert invoke(*args, model=models["a"]).exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.partial"]
    monkeypatch.setattr(tokenfile.TokenWriter, "_flush", flush)
    one_line_error(invoke("encode", images / "crop5.png", *args[2:], "--resume", model=models["a"]),
                   "cannot resume", "'crop0.png'", "not among these inputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.partial"]  # the progress survives a wrong resume
    result = invoke(*args, model=models["a"])
    assert result.exit_code == 0 and "discarded 4 images left by an interrupted encode" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"] and len(TokenDataset(tmp_path / "t")) == len(NAMES)


# -- the library boundary: images and codes --------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(models["a"])


@pytest.mark.parametrize(("make", "keywords"), [
    (lambda x: x * 255, ["must lie in [0, 1]", "divide by 255"]),
    (lambda x: x * 2 - 1, ["must lie in [0, 1]", "(x + 1) / 2"]),
    (lambda x: (x * 255).to(torch.uint8), ["floating point", "torch.uint8", "/ 255"]),
    (lambda x: x.to(torch.int32), ["floating point", "torch.int32"]),
    (lambda x: torch.where(x > 0.5, torch.nan, x), ["NaN or infinite"]),
    (lambda x: x.index_fill(3, torch.tensor([0]), torch.inf), ["NaN or infinite"]),
    (lambda x: torch.empty_like(x, device="meta"), ["meta device"]),
    (lambda x: x[0], ["(B, C, H, W)", "(3, 16, 16)"]),
    (lambda x: x.numpy(), ["torch.Tensor", "ndarray"]),
])
def test_bad_images_are_refused_with_a_clear_message(tokenizer: Tokenizer, make: Callable, keywords: list[str]) -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for call in (tokenizer.encode, tokenizer.analyse):
        with pytest.raises(TatokError) as info:
            call(make(images))
        assert all(word in str(info.value) for word in keywords), str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_converted(tokenizer: Tokenizer, dtype: torch.dtype) -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer.encode(images.to(dtype), tau=1.0)
    assert tokens.equal(tokenizer.encode(images.to(dtype).float(), tau=1.0))  # exactly the float32 result
    assert tokenizer.decode(tokens).dtype == torch.float32


def test_resampling_overshoot_is_clamped_not_refused(tokenizer: Tokenizer) -> None:
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    overshoot = images.clone()
    overshoot[..., 0, 0] = 1.002
    assert tokenizer.encode(overshoot, tau=1.0).equal(tokenizer.encode(overshoot.clamp(0, 1), tau=1.0))


def test_codes_this_model_cannot_have_made_are_refused(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), tau=1.0)
    size = tokenizer.quantizer.codebook_size
    bad = {
        "patch codes span": Tokens(tokens.global_codes, tokens.codes + size, tokens.positions, tokens.cu_seqlens,
                                   tokens.grid, tokens.image_size),
        "global codes span": Tokens(tokens.global_codes - size, tokens.codes, tokens.positions, tokens.cu_seqlens,
                                    tokens.grid, tokens.image_size),
        "global codes per image": Tokens(tokens.global_codes[:, :1], tokens.codes, tokens.positions,
                                         tokens.cu_seqlens, tokens.grid, tokens.image_size),
    }
    for words, wrong in bad.items():
        with pytest.raises(TatokError, match=words):
            tokenizer.decode(wrong)
    assert tokenizer.decode(tokens).shape == (2, 3, 16, 16)
