"""Benchmark the streaming loader and multi-process training (issue 16's targets).

    nice -n 19 python benchmarks/bench_loader.py --quick --json out/loader.json

Three measurements, each in fresh subprocesses so one does not warm the next:

* ``throughput``: training steps/s of ``recipes/tiny.toml`` (its batch and crop, one process, torch's
  threads as ``tatok train`` chooses them) against batches/s of the :class:`StreamLoader` with 2 workers
  on the built-in photos and on a folder of 256×256 JPEGs (random-resized crops); ``keeps_up`` when the
  loader delivers at least the training step rate. Medians of repeated runs; the machine's load
  average is recorded, since the two cores are shared.
* ``rss``: peak resident memory (main process, and the largest worker) listing a folder of 100 and of
  100 000 tiny PNGs in /tmp and drawing batches through 2 workers; the target is ratio ≤ 1.5.
* ``ddp``: ``torchrun --nproc_per_node 2`` (gloo) with 2 workers per rank on tar shards: one straight
  run, one killed with SIGKILL after a mid-way checkpoint and resumed; both ranks' parameter digests
  must agree, and the resumed final weights must equal the straight run's bit for bit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, threads: int | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env,
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


STEP_RATE = """
import json, sys, time, torch, attrs
from tatok_core.workflows.training import Recipe, choose_threads, World
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.data import StreamLoader, Augment, open_source
recipe = Recipe.load('recipes/tiny.toml'); c = recipe.train
torch.set_num_threads(choose_threads(c, World()))
model = Tokenizer(recipe.spec).train(); opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
images = torch.rand(c.batch_size, 3, c.crop, c.crop)
times = []
for i in range(int(sys.argv[1])):
    t = time.perf_counter(); out = model(images); opt.zero_grad(); out.losses['mse'].backward(); opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps({'step_s': sorted(times[2:])[len(times[2:]) // 2], 'threads': torch.get_num_threads()}))
"""

LOADER_RATE = """
import json, sys, time, torch
from tatok_core.workflows.data import StreamLoader, Augment, open_source
data, mode, batches, batch, crop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
loader = StreamLoader(open_source(data, crop), Augment(crop, mode=mode), batch, workers=2)
it = iter(loader); next(it); next(it)  # workers started and warm
t = time.perf_counter()
for _ in range(batches): next(it)
print(json.dumps({'batches_per_s': batches / (time.perf_counter() - t)}))
"""

PEAK_RSS = """
import json, resource, sys
from tatok_core.workflows.data import StreamLoader, Augment, open_source
loader = StreamLoader(open_source(sys.argv[1], 8), Augment(8), 16, workers=2)
it = iter(loader)
for _ in range(int(sys.argv[2])): next(it)
it.close()
print(json.dumps({'main_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  'worker_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def throughput(quick: bool, scratch: Path) -> dict[str, Any]:
    repeats = 3 if quick else 5
    steps = [_python(STEP_RATE, "12" if quick else "30")["step_s"] for _ in range(repeats)]
    folder = scratch / "jpegs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        smooth = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((256, 256), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
    batches = "20" if quick else "60"
    rates = {
        "builtin:photos": [_python(LOADER_RATE, "builtin:photos", "random", batches, "16", "32")["batches_per_s"]
                           for _ in range(repeats)],
        "folder of 256² JPEGs, resized crops": [
            _python(LOADER_RATE, str(folder), "resized", batches, "16", "32")["batches_per_s"] for _ in range(repeats)],
    }
    step_rate = 1 / statistics.median(steps)
    return {
        "recipe": "recipes/tiny.toml (batch 16, crop 32)",
        "train_steps_per_s": step_rate,
        "loader_batches_per_s_2_workers": {k: statistics.median(v) for k, v in rates.items()},
        "keeps_up": {k: statistics.median(v) >= step_rate for k, v in rates.items()},
        "load_average": os.getloadavg()[0],
    }


def rss(quick: bool, scratch: Path) -> dict[str, Any]:
    sizes = {"100": 100, "100000": 100_000}
    tiny = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tiny, "PNG")
    results: dict[str, Any] = {}
    for label, count in sizes.items():
        folder = scratch / f"png-{label}"
        for i in range(count):
            sub = folder / f"{i // 1000:03d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True)
            (sub / f"{i:06d}.png").write_bytes(tiny.getvalue())
        results[label] = _python(PEAK_RSS, str(folder), "20" if quick else "100", threads=1)
        shutil.rmtree(folder)
    small, large = results["100"], results["100000"]
    return {**{f"{k}_files": v for k, v in results.items()},
            "main_ratio": large["main_kib"] / small["main_kib"],
            "worker_ratio": large["worker_kib"] / small["worker_kib"]}


def _recipe(path: Path, steps: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import small_spec

    spec = "\n".join(line.replace("[", "[spec.", 1) if line.startswith("[") else line
                     for line in small_spec().to_toml().splitlines())
    path.write_text(f"{spec}\n\n[train]\nsteps = {steps}\nbatch_size = 4\ncrop = 16\nwarmup = 2\n"
                    f"checkpoint_every = 3\neval_data = \"\"\nthreads = 1\nlr = 0.003\nworkers = 2\nlog_every = 3\n")
    return path


def _shards(folder: Path) -> str:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for s in range(4):
        with tarfile.open(folder / f"train-{s:04d}.tar", "w") as archive:
            for i in range(8):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
                info = tarfile.TarInfo(f"{s:02d}{i:02d}.png")
                info.size = len(buf.getvalue())
                archive.addfile(info, io.BytesIO(buf.getvalue()))
    return str(folder / "train-{0000..0003}.tar")


def ddp(quick: bool, scratch: Path) -> dict[str, Any]:
    import torch

    steps = 9 if quick else 30
    recipe, data = _recipe(scratch / "recipe.toml", steps), _shards(scratch / "shards")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path, port: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "-m", "tatok_cli", "train", str(recipe), "--out", str(out), "--data", data, *extra]

    def digest(stdout: str) -> str:
        line = next(line for line in stdout.splitlines() if "parameters agree across 2 ranks" in line)
        return line.split("sha256 ")[1].rstrip(")")

    start = time.perf_counter()
    straight = subprocess.run(command(scratch / "straight", 29611), capture_output=True, text=True, env=env,
                              check=True)
    straight_s = time.perf_counter() - start
    killed_dir = scratch / "killed"
    process = subprocess.Popen(command(killed_dir, 29612), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, start_new_session=True)
    killed_at = None
    while process.poll() is None:
        checkpoint = killed_dir / "checkpoint.pt"
        if checkpoint.exists():
            try:
                killed_at = torch.load(checkpoint, weights_only=False)["step"]
            except Exception:  # caught mid-rename: read again
                continue
            if killed_at >= 3:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun, both ranks and their loader workers
                break
        time.sleep(0.05)
    process.wait()
    resumed = subprocess.run(command(killed_dir, 29613, "--resume"), capture_output=True, text=True, env=env,
                             check=True)
    from safetensors.torch import load_file

    a = load_file(str(scratch / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed_dir / "final" / "model.safetensors"))
    return {"steps": steps, "killed_after_checkpoint_step": killed_at, "straight_seconds": straight_s,
            "ranks_agree_digest": digest(straight.stdout), "resumed_digest": digest(resumed.stdout),
            "resume_bit_exact": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", choices=("throughput", "rss", "ddp"), action="append")
    args = parser.parse_args()
    results: dict[str, Any] = {"quick": args.quick, "cpus": os.cpu_count()}
    for name, run in (("throughput", throughput), ("rss", rss), ("ddp", ddp)):
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"tatok-bench-{name}-") as scratch:
            results[name] = run(args.quick, Path(scratch))
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
