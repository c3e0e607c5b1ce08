"""Training: loss goes down on real photos, a killed run resumes bit for bit, 2-process DDP agrees."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import attrs
import pytest
import safetensors.torch
import torch
from PIL import Image

from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.contract.errors import SpecError, TatokError
from tatok_core.workflows.losses import PerceptualLoss
from tatok_core.workflows.metrics import psnr
from tatok_core.contract.spec import PipelineSpec
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.training import (
    CHECKPOINT,
    FINAL,
    Recipe,
    TrainConfig,
    World,
    check_memory,
    choose_threads,
    estimate_activation_bytes,
    initialise_from,
    lr_factor,
    resumed_config,
    train,
)
from tests.helpers import small_spec

TATOK = [sys.executable, "-m", "tatok_cli"]  # the CLI of this interpreter, never a `tatok` found on PATH
ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, steps: int, checkpoint_every: int) -> Path:
    spec = small_spec().to_toml()
    spec_table = "\n".join(
        line.replace("[", "[spec.", 1) if line.startswith("[") else line for line in spec.splitlines()
    )
    path.write_text(
        f"{spec_table}\n\n[train]\nsteps = {steps}\nbatch_size = 4\ncrop = 16\nwarmup = 2\n"
        f"checkpoint_every = {checkpoint_every}\neval_data = \"\"\nthreads = 1\nlr = 0.003\n"
    )
    return path


def run_tatok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TATOK, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / FINAL / "model.safetensors"))


def test_loss_decreases_on_real_photos(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = TrainConfig(steps=40, batch_size=8, crop=16, warmup=5, lr=3e-3, eval_every=40, eval_crops=16,
                         checkpoint_every=40, threads=0)
    result = train(small_spec(), config, "builtin:photos", tmp_path / "run", progress=False)
    assert (tmp_path / "run" / FINAL / "model.safetensors").is_file()
    # a line per log step (log_every = 10) with the training terms; the held-out metrics at the evaluation
    assert [line["step"] for line in result.history] == [10.0, 20.0, 30.0, 40.0]
    assert all(line.keys() >= {"train_loss", "train_pixel"} and "train_rate_bpp" not in line for line in result.history)
    assert "psnr_all" in result.history[-1] and not any("psnr_all" in line for line in result.history[:-1])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final_eval["psnr_all"] == result.history[-1]["psnr_all"] and "train_loss" not in result.final_eval
    trained = Tokenizer.from_pretrained(tmp_path / "run" / FINAL)
    fresh = Tokenizer(small_spec()).eval()
    held_out = fixed_crops(ImageSource("builtin:photos:heldout").images, 16, 16)
    before = float(psnr(fresh.decode(fresh.encode(held_out, filter="all")), held_out).mean())
    after = float(psnr(trained.decode(trained.encode(held_out, filter="all")), held_out).mean())
    assert after > before + 3.0, (before, after)


def test_lr_schedule_warms_up_then_decays() -> None:
    config = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def write_shards(folder: Path, count: int = 4, per_shard: int = 6) -> str:
    """webdataset-style shards of built-in photo crops; returns their brace pattern."""
    folder.mkdir()
    crops = fixed_crops(ImageSource("builtin:photos").images, 24, count * per_shard, seed=3)
    for s in range(count):
        with tarfile.open(folder / f"train-{s:04d}.tar", "w") as archive:
            for i in range(per_shard):
                buf = io.BytesIO()
                pixels = (crops[s * per_shard + i] * 255).round().byte().permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(buf, "PNG")
                info = tarfile.TarInfo(f"sample{s:02d}{i:02d}.png")
                info.size = len(buf.getvalue())
                archive.addfile(info, io.BytesIO(buf.getvalue()))
    return str(folder / f"train-{{0000..{count - 1:04d}}}.tar")


def test_killed_run_with_workers_resumes_bit_for_bit(tmp_path: Path) -> None:
    # enough steps that the kill lands mid-way however fast the machine: a step of this model takes
    # milliseconds, and 12 steps once finished between two polls
    recipe = write_recipe(tmp_path / "recipe.toml", steps=120, checkpoint_every=3)
    data = ["--data", write_shards(tmp_path / "shards"), "--workers", "2"]
    straight = run_tatok("train", str(recipe), "--out", str(tmp_path / "straight"), *data)
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "killed"
    process = subprocess.Popen([*TATOK, "train", str(recipe), "--out", str(run_dir), *data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline:
        checkpoint = run_dir / CHECKPOINT
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["step"] >= 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = torch.load(run_dir / CHECKPOINT, weights_only=False)["step"]
    assert 6 <= step < 120, "the run must be killed mid-way for this test to mean anything"
    assert not (run_dir / FINAL).exists()

    resumed = run_tatok("train", str(recipe), "--out", str(run_dir), "--resume", *data)
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "straight"), weights(run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.toml", steps=2, checkpoint_every=1)
    assert run_tatok("train", str(recipe), "--out", str(tmp_path / "run")).returncode == 0
    again = run_tatok("train", str(recipe), "--out", str(tmp_path / "run"))
    assert again.returncode == 1
    assert "already holds a run; pass --resume" in again.stderr


def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.toml", steps=4, checkpoint_every=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               "-m", "tatok_cli", "train", str(recipe), "--out", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters agree across 2 ranks" in result.stdout
    checkpoint = torch.load(tmp_path / "ddp" / CHECKPOINT, weights_only=False)
    assert checkpoint["step"] == 4 and len(checkpoint["loaders"]) == 2
    assert checkpoint["loaders"][0]["rank"] == 0 and checkpoint["loaders"][1]["rank"] == 1
    assert len(list((tmp_path / "ddp").glob("*.pt"))) == 1
    assert PipelineSpec.load(tmp_path / "ddp" / "spec.toml") == small_spec()


def test_bf16_autocast_training_learns_like_float32(tmp_path: Path) -> None:
    # the same run (seed, data, held-out crops) in float32 and under bf16 autocast: bf16 must really run,
    # improve the held-out reconstruction step by step and end where float32 ends
    runs = {}
    for bf16 in (False, True):
        config = TrainConfig(steps=6, batch_size=4, crop=16, warmup=1, lr=3e-3, eval_data="builtin:photos:heldout",
                             eval_crops=4, eval_every=1, checkpoint_every=6, bf16=bf16)
        result = train(small_spec(), config, "builtin:photos", tmp_path / f"run-{bf16}", progress=False)
        runs[bf16] = (result.history, Tokenizer.from_pretrained(tmp_path / f"run-{bf16}" / FINAL))
    (fp32_history, fp32), (bf16_history, bf16) = runs[False], runs[True]
    assert bf16_history[-1]["psnr_all"] > bf16_history[0]["psnr_all"] + 1.0, [h["psnr_all"] for h in bf16_history]
    assert abs(bf16_history[-1]["psnr_all"] - fp32_history[-1]["psnr_all"]) < 0.5
    assert bf16.weights_digest() != fp32.weights_digest(), "bf16 autocast did not change the arithmetic"


# ---- settings, resources, crash safety ------------------------------------------------------------


def test_bad_settings_refused_in_one_line(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.toml", steps=2, checkpoint_every=1)
    result = run_tatok("train", str(recipe), "--out", str(tmp_path / "run"), "--steps", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: train.steps must be ≥ 1, got 0"]
    assert not (tmp_path / "run").exists()
    for settings, words in [({"steps": -5}, "train.steps must be ≥ 1"), ({"lr": "abc"}, "train.lr must be float"),
                            ({"lr": -1.0}, "train.lr must be > 0"), ({"reconstruction": "l3"}, "'mse', 'log_mse', 'l1'"),
                            ({"batch_size": 0}, "train.batch_size"), ({"ema_decay": 1.0}, "ema_decay must be < 1"),
                            ({"zoom_min": 1.5}, "train.zoom_min must be ≤ 1"), ({"zoom_min": 0.0}, "train.zoom_min"),
                            ({"augment": "scaled"}, "'random', 'resized', 'zoomed'")]:
        with pytest.raises(SpecError, match=words):
            TrainConfig.from_dict(settings)


def test_memory_estimate_refuses_a_crop_that_cannot_fit() -> None:
    with pytest.raises(SpecError, match=r"train.crop=5000 .* needs an estimated [\d.]+ GiB .* available") as e:
        check_memory(small_spec(), TrainConfig(crop=5000), torch.device("cpu"))
    assert "\n" not in str(e.value)
    small = estimate_activation_bytes(small_spec(), TrainConfig(crop=16, batch_size=4))
    assert 0 < small < estimate_activation_bytes(small_spec(), TrainConfig(crop=16, batch_size=8))
    assert check_memory(small_spec(), TrainConfig(crop=16, batch_size=4), torch.device("cpu")) == small


def test_resume_keeps_the_runs_plan(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps({"steps": 7, "warmup": 3, "lr": 0.002}))
    recipe = TrainConfig(steps=100, warmup=10)
    assert resumed_config(tmp_path, recipe, {}) == TrainConfig(steps=7, warmup=3, lr=0.002)
    assert resumed_config(tmp_path, recipe, {"steps": 9}).steps == 9
    assert resumed_config(tmp_path / "none", recipe, {}) == recipe


def test_kill_during_final_save_leaves_no_partial_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(steps=2, batch_size=2, crop=16, warmup=1, eval_every=1, eval_crops=2, checkpoint_every=1,
                         threads=1, log_every=1)
    run_dir = tmp_path / "run"
    real_save = Tokenizer.save_pretrained

    def dies_half_way(self: Tokenizer, directory: Path) -> Path:
        (Path(directory)).mkdir(parents=True)
        (Path(directory) / "spec.toml").write_text(self.spec.to_toml())
        raise KeyboardInterrupt  # as a kill between the two files would

    monkeypatch.setattr(Tokenizer, "save_pretrained", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(small_spec(), config, "builtin:photos", run_dir, progress=False)
    assert not (run_dir / FINAL).exists() and (run_dir / (FINAL + ".tmp")).is_dir()
    assert [r["step"] for r in json.loads((run_dir / "history.json").read_text())] == [1.0, 2.0]
    first_elapsed = torch.load(run_dir / CHECKPOINT, weights_only=False)["elapsed"]
    (run_dir / (CHECKPOINT + ".tmp")).write_bytes(b"half a checkpoint")
    (run_dir / "listings").mkdir()
    (run_dir / "listings" / "x.txt.123.tmp").write_text("half a listing")
    monkeypatch.setattr(Tokenizer, "save_pretrained", real_save)
    result = train(small_spec(), config, "builtin:photos", run_dir, resume=True, progress=False)
    assert not list(run_dir.rglob("*.tmp")), "stray temporary files were not cleaned up"
    assert sorted(p.name for p in (run_dir / FINAL).iterdir()) == ["config.json", "model.safetensors", "spec.toml"]
    assert Tokenizer.from_pretrained(run_dir / FINAL).spec == small_spec()
    assert result.seconds > first_elapsed > 0  # elapsed time accumulates across resumes


def test_perceptual_adversarial_ema_and_accumulation_plumbing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    perceptual = PerceptualLoss(TapsNetwork(features), [4])
    fid_net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 4, 4), torch.nn.Flatten(1), torch.nn.LazyLinear(5))
    config = TrainConfig(steps=3, batch_size=2, crop=16, warmup=1, eval_every=3, eval_crops=4, checkpoint_every=3,
                         threads=1, accumulate=2, ema_decay=0.5, perceptual_weight=1.0, adversarial_weight=0.1,
                         discriminator_start=1, eval_fid=True, log_every=1)
    result = train(small_spec(), config, "builtin:photos", tmp_path / "run", progress=False,
                   perceptual=perceptual, fid_features=fid_net)
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert state["discriminator"] is not None and state["d_optimizer"]["state"], "the critic never stepped"
    assert state["loaders"][0]["batches"] == 6  # 3 steps × 2 micro-batches
    saved = weights(tmp_path / "run")
    assert all(torch.equal(saved[k], state["ema"][k].cpu()) for k in saved)  # final/ holds the EMA weights
    assert not all(torch.equal(saved[k], state["model"][k].cpu()) for k in saved)
    assert result.final_eval["rfid_all"] >= 0 and math.isfinite(result.final_eval["rfid_all"])
    with pytest.raises(TatokError, match="perceptual_weight > 0 needs pretrained weights"):
        train(small_spec(), attrs.evolve(config, steps=1), "builtin:photos", tmp_path / "other", progress=False)


class TapsNetwork(torch.nn.Module):
    """A feature network returning one feature map, as PerceptualLoss expects (a list)."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(x)]


SHRINK = {"encoder.dim": 32, "encoder.depth": 1, "encoder.heads": 2, "global_tokenizer.depth": 1,
          "global_tokenizer.heads": 2, "global_tokenizer.num_global": 4, "entropy.width": 32, "entropy.heads": 2,
          "entropy.depth": 1, "decoder.depth": 1, "decoder.heads": 2, "decoder.refine": 8}


@pytest.mark.parametrize("name", ["tiny.toml", "imagenet256.toml"])
def test_recipes_parse_and_dry_run(name: str, tmp_path: Path) -> None:
    recipe = Recipe.load(ROOT / "recipes" / name)
    recipe.spec.check()
    spec = recipe.spec.updated({}, SHRINK)  # the recipe's composition and [train] table, a tiny width
    data = write_shards(tmp_path / "shards", count=2, per_shard=4)
    config = attrs.evolve(recipe.train, steps=2, batch_size=2, crop=32, workers=1, warmup=1, eval_every=2,
                          eval_crops=2, eval_data=data, checkpoint_every=2, threads=1, discriminator_start=1)
    perceptual = PerceptualLoss(TapsNetwork(torch.nn.Conv2d(3, 2, 3)), [2])
    fid_net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(1))
    result = train(spec, config, data, tmp_path / "run", progress=False, perceptual=perceptual, fid_features=fid_net)
    assert result.steps == 2 and math.isfinite(result.final_eval["psnr_all"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_composes(path: Path) -> None:
    """Each documented recipe parses and its components compose (a typo in a recipe fails here, not an
    hour into a training run); a recipe that starts from another model names a run directory or a shipped model."""
    recipe = Recipe.load(path)
    recipe.spec.check()
    Tokenizer(recipe.spec)  # builds: the options every component takes
    shipped = {p.name for p in (ROOT / "plugins" / "pretrained").iterdir() if p.is_dir()}
    assert recipe.train.init in {"", *shipped} or recipe.train.init.startswith("runs/"), recipe.train.init


def test_default_threads_leave_busy_cores_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert choose_threads(TrainConfig(), World()) == 8
    assert choose_threads(TrainConfig(), World(local_size=2)) == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 0.0, 0.0))  # another job keeps six cores busy
    assert choose_threads(TrainConfig(), World()) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 0.0, 0.0))
    assert choose_threads(TrainConfig(), World(local_size=4)) == 1
    assert choose_threads(TrainConfig(threads=3), World()) == 3


def test_init_starts_the_components_a_saved_model_shares_and_leaves_the_others_fresh(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fixed = Tokenizer(small_spec(filter="all", entropy="pixel", decoder="packed"))
    fixed.save_pretrained(tmp_path / "fixed")
    adaptive = Tokenizer(small_spec(filter="dtf", entropy="residual", decoder="packed"))
    started = initialise_from(adaptive, tmp_path / "fixed")
    assert started == {"encoder": "loaded", "global_tokenizer": "loaded", "quantizer": "loaded",
                       "entropy": "no weights", "filter": "no weights", "decoder": "loaded"}
    for kind in ("encoder", "global_tokenizer", "decoder"):
        theirs = getattr(fixed, kind).state_dict()
        for key, value in getattr(adaptive, kind).state_dict().items():
            assert torch.equal(value, theirs[key]), (kind, key)
    other = Tokenizer(small_spec(decoder="vit"))
    assert initialise_from(other, tmp_path / "fixed")["decoder"] == "fresh"


def test_init_refuses_weights_that_do_not_fit_naming_the_component(tmp_path: Path) -> None:
    Tokenizer(small_spec(decoder="packed")).save_pretrained(tmp_path / "narrow")
    wider = Tokenizer(small_spec(decoder="packed").updated({}, {"decoder.depth": 3}))
    with pytest.raises(SpecError, match=r"train\.init: decoder 'packed' cannot start from"):
        initialise_from(wider, tmp_path / "narrow")


def test_init_that_names_no_saved_model_says_which_setting(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"train\.init = '.*missing': unknown pretrained tokenizer"):
        initialise_from(Tokenizer(small_spec()), tmp_path / "missing")


def test_a_run_with_init_trains_on_from_the_saved_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    donor = Tokenizer(small_spec(filter="all", entropy="pixel", decoder="packed"))
    donor.save_pretrained(tmp_path / "donor")
    config = TrainConfig(steps=1, batch_size=2, crop=16, warmup=0, lr=1e-9, eval_data="", threads=1,
                         init=str(tmp_path / "donor"))
    train(small_spec(filter="dtf", entropy="residual", decoder="packed"), config, "builtin:photos",
          tmp_path / "run", progress=False)
    after = weights(tmp_path / "run")
    theirs = donor.state_dict()
    assert after.keys() == theirs.keys()
    assert all(torch.allclose(value, theirs[key], atol=1e-6) for key, value in after.items())


def test_trainable_trains_only_the_named_kinds_and_keeps_every_other_weight_exactly(tmp_path: Path) -> None:
    torch.manual_seed(2)
    spec = small_spec(decoder="packed", quantizer="vq").updated({}, {"quantizer.ema": True})
    donor = Tokenizer(spec)
    donor.save_pretrained(tmp_path / "donor")
    config = TrainConfig(steps=3, batch_size=2, crop=16, warmup=0, lr=3e-3, eval_data="builtin:photos:heldout",
                         eval_every=2, eval_crops=2, threads=1, init=str(tmp_path / "donor"), trainable="decoder")
    train(spec, config, "builtin:photos", tmp_path / "run", progress=False)
    after, theirs = weights(tmp_path / "run"), donor.state_dict()
    moved = {key.split(".")[0] for key, value in after.items() if not torch.equal(value, theirs[key])}
    # the encoder, globals and quantizer — its EMA codebook and usage too, after an evaluation switched the
    # model back to training mode — are untouched, so every code is
    assert moved == {"decoder"}


def test_trainable_refuses_an_unknown_kind_with_the_closest_and_a_kind_without_weights(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"unknown component kind 'decodr'.*did you mean 'decoder'"):
        TrainConfig(trainable="decodr")
    config = TrainConfig(steps=1, batch_size=2, crop=16, eval_data="", threads=1, trainable="filter")
    with pytest.raises(SpecError, match=r"train.trainable = 'filter': nothing to train — filter .* has no weights"):
        train(small_spec(), config, "builtin:photos", tmp_path / "run", progress=False)
