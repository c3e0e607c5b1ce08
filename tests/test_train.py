"""Training: loss goes down on real photos, a killed run resumes bit for bit, 2-process DDP agrees."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tatok_core.data import ImageSource, fixed_crops
from tatok_core.metrics import psnr
from tatok_core.spec import PipelineSpec
from tatok_core.tokenizer import Tokenizer
from tatok_core.train import CHECKPOINT, FINAL, TrainConfig, lr_factor, train
from tests.helpers import small_spec

TATOK = shutil.which("tatok") or "tatok"


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
    return subprocess.run([TATOK, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / FINAL / "model.safetensors"))


def test_loss_decreases_on_real_photos(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = TrainConfig(steps=40, batch_size=8, crop=16, warmup=5, lr=3e-3, eval_every=40, eval_crops=16,
                         checkpoint_every=40, threads=0)
    result = train(small_spec(), config, "builtin:photos", tmp_path / "run", progress=False)
    assert (tmp_path / "run" / FINAL / "model.safetensors").is_file()
    assert len(result.history) == 1
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


def test_killed_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.toml", steps=12, checkpoint_every=3)
    straight = run_tatok("train", str(recipe), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "killed"
    process = subprocess.Popen([TATOK, "train", str(recipe), "--out", str(run_dir)],
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
    assert 6 <= step < 12, "the run must be killed mid-way for this test to mean anything"
    assert not (run_dir / FINAL).exists()

    resumed = run_tatok("train", str(recipe), "--out", str(run_dir), "--resume")
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
               TATOK, "train", str(recipe), "--out", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters agree across 2 ranks" in result.stdout
    checkpoint = torch.load(tmp_path / "ddp" / CHECKPOINT, weights_only=False)
    assert checkpoint["step"] == 4 and len(checkpoint["streams"]) == 2
    assert checkpoint["streams"][0]["rank"] == 0 and checkpoint["streams"][1]["rank"] == 1
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
