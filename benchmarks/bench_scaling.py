"""How encode and decode cost grows with the image: time and peak memory per image, per stage.

    python benchmarks/bench_scaling.py                      # sides 64…1024 + a 2048×1536 photo, tatok-tiny
    python benchmarks/bench_scaling.py --quick              # sides 64…256, one repeat (a smoke run)
    python benchmarks/bench_scaling.py --model DIR --json runs/scaling.json --png runs/scaling.png

Batch 1, random-noise images (the content does not change the cost: every patch goes through every
stage; only the filter's kept count varies). Time: median (and best) of ``--repeats`` rounds after a
warm-up round, every size once per round so that a drifting machine load affects all sizes alike, for
``encode`` and ``decode`` as a whole and for each stage alone on the inputs the stages before it
produced (encoder, global tokens, quantizer, entropy, filter, decoder). Peak memory: on CUDA
``max_memory_allocated`` during one call; on CPU the process's resident set, sampled every 0.5 ms
during one call, as the absolute peak (``peak_mib``: everything the process holds, model and torch
included) and as the growth over the resident set before the call (``extra_mib``).

FSQ is also timed against vector-quantize-pytorch's (``benchmarks/bench_fsq.py``) when that optional
dependency is installed (``pip install 'tatok[bench]'``). The issue-14 targets are checked in the JSON's ``targets``: encode and decode of 1024² within 20× the
time of 256² (16× is linear), and the photo within 4 GiB peak. Every size runs the model's own filter
(DTF has no token cap since issue 13).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer

FULL_SIDES = (64, 128, 256, 512, 768, 1024)
QUICK_SIDES = (64, 128, 256)
PHOTO = (1536, 2048)  # (H, W) of a 3-megapixel photo
STAGES = ("encoder", "global_tokenizer", "quantizer", "base_decode", "entropy", "filter", "decoder")
# base_decode: the globals-only decode an estimator may ask for (0 when the model's does not)
TIME_RATIO_TARGET = 20.0  # 1024² vs 256², encode and decode each
PHOTO_PEAK_TARGET_MIB = 4096.0


def resident_mib() -> float:
    """The process's resident set now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that holds ``peak_mib`` and ``extra_mib`` of the enclosed block once it exits."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        yield result
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        result.update(peak_mib=peak, extra_mib=peak - before)
        return
    before = resident_mib()
    samples = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(resident_mib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        samples.append(resident_mib())
        result.update(peak_mib=max(samples), extra_mib=max(samples) - before)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call (synchronised on CUDA)."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def memory_row(model: Tokenizer, images: torch.Tensor) -> dict[str, Any]:
    """Peak memory of one encode and one decode of ``images``, with nothing else of the benchmark held."""
    start = time.perf_counter()
    with peak_memory(images.device) as encode_memory:
        tokens = model.encode(images)
    encode_once = time.perf_counter() - start
    start = time.perf_counter()
    with peak_memory(images.device) as decode_memory:
        model.decode(tokens)
    decode_once = time.perf_counter() - start
    return {
        "height": images.shape[2], "width": images.shape[3], "patches": tokens.num_patches,
        "kept": int(tokens.lengths.sum()), "filter": model.filter.label,
        "encode_peak_mib": encode_memory["peak_mib"], "encode_extra_mib": encode_memory["extra_mib"],
        "decode_peak_mib": decode_memory["peak_mib"], "decode_extra_mib": decode_memory["extra_mib"],
        "encode_once_s": encode_once, "decode_once_s": decode_once,  # the first (cold) call, memory sampled
    }


@torch.no_grad()
def timed_calls(model: Tokenizer, images: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """encode, decode, and each stage alone on the outputs of the stages before it (the wiring unrolled)."""
    padded, _ = model.pad_to_grid(images)
    grid = model.grid_for(*images.shape[2:])
    features = model.encoder(padded)  # (1, N, D)
    global_features, patch_features = model.global_tokenizer(features, grid)
    m = global_features.shape[1]
    joint = torch.cat([global_features, patch_features], dim=1)  # (1, M + N, D)
    quantized = model.quantizer(joint)
    nothing_kept = torch.zeros(quantized.codes[:, m:].shape, dtype=torch.bool, device=padded.device)  # (1, N)
    base_decode = lambda: model.decoder(quantized.vectors[:, :m], quantized.vectors[:, m:], nothing_kept, grid)  # noqa: E731
    context = model.entropy_context(padded, grid, quantized.vectors[:, :m], quantized.codes[:, :m],
                                    quantized.vectors[:, m:], quantized.codes[:, m:])
    base = context.base_reconstruction  # (1, C, H', W') for estimators that ask
    bits = model.entropy(context).bits  # (1, N)
    keep = model.filter.select(bits).keep
    tokens = model.encode(images)
    return {
        "encode": lambda: model.encode(images),
        "decode": lambda: model.decode(tokens),
        "encoder": lambda: model.encoder(padded),
        "global_tokenizer": lambda: model.global_tokenizer(features, grid),
        "quantizer": lambda: model.quantizer(joint),
        "base_decode": base_decode if base is not None else lambda: None,
        "entropy": lambda: model.entropy(context),
        "filter": lambda: model.filter.select(bits),
        "decoder": lambda: model.decoder(quantized.vectors[:, :m], quantized.vectors[:, m:], keep, grid),
    }


@torch.no_grad()
def measure(model: Tokenizer, sizes: Sequence[tuple[int, int]], repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """One row per size: peak memory (each size alone), then times in rounds over all sizes.

    Round-robin timing (one warm-up round, then ``repeats`` rounds, every size once per round) keeps the
    ratios between sizes fair when the machine's load drifts during the run.
    """
    rows, cases = [], []
    for height, width in sizes:
        images = torch.rand(1, model.encoder.channels, height, width,
                            generator=torch.Generator().manual_seed(0)).to(device)
        rows.append(memory_row(model, images))
        cases.append(images)
    if not repeats:  # memory only
        return rows
    calls = [timed_calls(model, images) for images in cases]
    samples: list[dict[str, list[float]]] = [{name: [] for name in c} for c in calls]
    for round_ in range(repeats + 1):
        for case, sample in zip(calls, samples):
            for name, fn in case.items():
                elapsed = seconds(fn, device)
                if round_:  # round 0 warms up
                    sample[name].append(elapsed)
    for row, sample in zip(rows, samples):
        for what in ("encode", "decode"):
            row[f"{what}_s"] = statistics.median(sample[what])
            row[f"{what}_best_s"] = min(sample[what])
        row["stage_s"] = {stage: statistics.median(sample[stage]) for stage in STAGES}
    return rows


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue-14 targets, from the rows that exist."""
    by_size = {(r["height"], r["width"]): r for r in rows}
    out: dict[str, Any] = {}
    small, large = by_size.get((256, 256)), by_size.get((1024, 1024))
    if small and large and "encode_s" in small and "encode_s" in large:
        for what in ("encode", "decode"):
            ratio = large[f"{what}_s"] / small[f"{what}_s"]
            out[f"{what}_1024_over_256"] = {"ratio": ratio, "target": TIME_RATIO_TARGET, "met": ratio <= TIME_RATIO_TARGET}
    photo = by_size.get(PHOTO)
    if photo:
        peak = max(photo["encode_peak_mib"], photo["decode_peak_mib"])
        out["photo_peak_mib"] = {"peak": peak, "target": PHOTO_PEAK_TARGET_MIB, "met": peak <= PHOTO_PEAK_TARGET_MIB}
    return out


def fsq_against_reference(model: Tokenizer, device: torch.device) -> list[dict[str, Any]] | str:
    """benchmarks/bench_fsq.py's comparison at the model's FSQ levels, when vector-quantize-pytorch is there."""
    from tatok_plugins.fsq import FSQ

    if not isinstance(model.quantizer, FSQ):
        return f"the model's quantizer is {model.spec.quantizer.name!r}, not FSQ"
    try:
        from benchmarks.bench_fsq import compare
    except ImportError as error:
        return f"skipped: {error} (pip install 'tatok[bench]')"
    return [compare(model.quantizer.levels, tokens, device, 1.0) for tokens in (4096, 65536)]


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    measured = result["rows"]
    rows = [r for r in measured if "encode_s" in r]  # timed rows
    pixels = [r["height"] * r["width"] for r in rows]
    figure = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    times, stages, memory = figure.subplots(1, 3)
    for what in ("encode", "decode"):
        times.plot(pixels, [r[f"{what}_s"] * 1e3 for r in rows], "o-", label=what)
    if rows:
        times.plot(pixels, [rows[0]["encode_s"] * 1e3 * p / pixels[0] for p in pixels], ":", color="gray",
                   label="linear")
    times.set(xlabel="pixels per image", ylabel="ms per image", title="time")
    times.legend(fontsize=8)
    for stage in STAGES:
        stages.plot(pixels, [r["stage_s"][stage] * 1e3 for r in rows], "o-", label=stage.replace("_tokenizer", ""))
    stages.set(xlabel="pixels per image", ylabel="ms", title="per stage")
    if rows:  # log axes need data
        for axes in (times, stages):
            axes.set(xscale="log", yscale="log")
    stages.legend(fontsize=7)
    all_pixels = [r["height"] * r["width"] for r in measured]
    for what in ("encode", "decode"):
        memory.plot(all_pixels, [r[f"{what}_peak_mib"] for r in measured], "o-", label=f"{what} peak")
        memory.plot(all_pixels, [r[f"{what}_extra_mib"] for r in measured], "x--", label=f"{what} growth")
    memory.axhline(PHOTO_PEAK_TARGET_MIB, color="gray", ls=":", label="4 GiB")
    memory.set(xscale="log", xlabel="pixels per image", ylabel="MiB", title="peak memory")
    memory.legend(fontsize=7)
    env = result["environment"]
    figure.suptitle(f"{result['model']} on {env['device']} ({env['threads']} threads)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_PRETRAINED, help="shipped name or saved directory")
    parser.add_argument("--sides", type=int, nargs="*", help=f"square sides (default {FULL_SIDES}; none: the photo only)")
    parser.add_argument("--no-photo", action="store_true", help=f"skip the {PHOTO[1]}×{PHOTO[0]} photo")
    parser.add_argument("--quick", action="store_true", help=f"sides {QUICK_SIDES}, no photo, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (0: peak memory only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_scaling.json"))
    parser.add_argument("--png", type=Path, default=Path("runs/bench_scaling.png"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sides = args.sides if args.sides is not None else (QUICK_SIDES if args.quick else FULL_SIDES)
    repeats = 1 if args.quick else args.repeats
    sizes = [(s, s) for s in sides] + ([] if args.quick or args.no_photo else [PHOTO])
    model = Tokenizer.from_pretrained(args.model).to(device).eval()
    rows = measure(model, sizes, repeats, device)
    for row in rows:
        encode_s, decode_s = row.get("encode_s", row["encode_once_s"]), row.get("decode_s", row["decode_once_s"])
        stages = "  ".join(f"{k.replace('_tokenizer', '')} {v * 1e3:.1f}" for k, v in row.get("stage_s", {}).items())
        print(f"{row['height']}×{row['width']}: encode {encode_s * 1e3:.1f} ms ({row['encode_peak_mib']:.0f} MiB "
              f"peak, +{row['encode_extra_mib']:.0f})  decode {decode_s * 1e3:.1f} ms "
              f"({row['decode_peak_mib']:.0f} MiB, +{row['decode_extra_mib']:.0f})"
              + (f"  | {stages} ms" if stages else "  (one cold call each)"), flush=True)
    result = {
        "model": args.model,
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "repeats": repeats, "batch": 1, "rows": rows, "targets": targets(rows),
        "fsq_vs_vector_quantize_pytorch": fsq_against_reference(model, device),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    plot(result, args.png)
    for name, check in result["targets"].items():
        value = check.get("ratio", check.get("peak"))
        print(f"target {name}: {value:.2f} (target {check['target']}) {'met' if check['met'] else 'NOT met'}")
    fsq = result["fsq_vs_vector_quantize_pytorch"]
    for row in fsq if isinstance(fsq, list) else []:
        print(f"FSQ {row['tokens']} tokens: {row['ratio']:.2f}× vector-quantize-pytorch's time (target ≤ 1.2), "
              f"codes identical {row['codes_identical']}")
    if isinstance(fsq, str):
        print(f"FSQ comparison: {fsq}")
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
