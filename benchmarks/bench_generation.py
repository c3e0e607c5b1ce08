"""Adaptive-length vs fixed-rate autoregressive generation, measured side by side in one process.

    python benchmarks/bench_generation.py --quick                        # a few minutes on a CPU
    python benchmarks/bench_generation.py --device cuda --json out/generation.json --out-dir out/
    python benchmarks/bench_generation.py --model runs/tiny/final --quick  # another tokenizer

Crops of the built-in photos are encoded with a tokenizer (``tatok-tiny`` unless ``--model``) twice:
with its own filter (DTF: M global + k kept patch tokens per image) and with every patch kept (fixed
rate: M + N). The ``adaptive`` prior trains on the first, the ``raster`` prior on the second, with the
same width, depth, heads, steps, batch size, learning rate and seed. For each it reports parameters,
bits/image on crops of the held-out photos (never seen in training), mean transformer steps per image
and samples/second — sampling n images with the KV cache, best of R repeats interleaved between the two
priors (CUDA-synchronised), alone and with decoding to pixels — and the speed-up adaptive/raster. It
writes the numbers as JSON and the decoded samples of each prior as a PNG grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tatok_core.workflows import generation
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.io.images import tile_images, write_image
from tatok_core.workflows.encoding import token_meta
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED, Tokenizer
from tatok_core.contract.tokens import Tokens

PRIORS = {"adaptive": None, "raster": "all"}  # generator → filter its tokens are encoded with (None: the model's)
QUICK = {"crops": 512, "heldout": 128, "steps": 200, "samples": 32, "repeats": 3}
FULL = {"crops": 4096, "heldout": 512, "steps": 3000, "samples": 128, "repeats": 5}


def encode_set(model: Tokenizer, images: torch.Tensor, path: Path, filter: str | None, tau: float | None,
               batch_size: int = 64) -> TokenDataset:
    """Encode crops (B, 3, H, W) into a token data set at ``path`` with ``filter`` (None: the model's) at ``tau``."""
    device = next(model.parameters()).device
    with TokenWriter(path, spec_digest=model.spec.digest(), tokenizer=model.name or "model",
                     meta=token_meta(model, tau=tau, filter=filter)) as writer:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device)
            tokens = model.encode(chunk, tau=tau, filter=filter)
            writer.write(tokens, [(f"crop-{start + i:05d}", 0) for i in range(len(chunk))])
    return TokenDataset(path)


def best_seconds(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds, the functions interleaved within a round
    so that both see the same machine state (load, clocks, caches); one untimed warm-up round first."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Encode, train both priors, evaluate and time them; write the sample grids; return the numbers."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = {**(QUICK if args.quick else FULL), **{k: v for k, v in vars(args).items() if k in QUICK and v is not None}}
    model = Tokenizer.from_pretrained(args.model).to(device).eval()
    train_crops = fixed_crops(ImageSource("builtin:photos").images, args.crop, sizes["crops"], seed=args.seed)
    heldout_crops = fixed_crops(ImageSource("builtin:photos:heldout").images, args.crop, sizes["heldout"], seed=args.seed)
    options = {"width": args.width, "depth": args.depth, "heads": args.heads}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": model.name, "spec_digest": model.spec.digest(), "crop": args.crop, **sizes,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "options": options, "priors": {},
    }
    priors: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        for name, filter in PRIORS.items():
            tau = None if filter else args.tau
            train_set = encode_set(model, train_crops, Path(tmp) / f"{name}-train", filter, tau)
            heldout_set = encode_set(model, heldout_crops, Path(tmp) / f"{name}-heldout", filter, tau)
            torch.manual_seed(args.seed)
            prior = generation.build_generator(name, generation.dataset_facts(train_set), **options).to(device)
            trained = generation.train_prior(prior, train_set, steps=sizes["steps"], batch_size=args.batch_size,
                                             lr=args.lr, seed=args.seed, progress=not args.no_progress)
            kept = [image.codes.numel() for image in train_set]
            priors[name] = prior
            result["priors"][name] = {
                "filter": filter or model.spec.filter.name,
                "tau": train_set.metadata.get("tau"),
                "parameters": sum(p.numel() for p in prior.parameters()),
                "train_seconds": trained.seconds,
                "train_bits_per_image": generation.nll_bits_per_image(prior, train_set),
                "heldout_bits_per_image": generation.nll_bits_per_image(prior, heldout_set),
                "data_tokens_per_image": sum(kept) / len(kept),
            }
    n, num_global = sizes["samples"], model.num_global

    def sampler(name: str) -> Callable[[], Tokens]:
        return lambda: generation.sample(priors[name], n, temperature=args.temperature, top_k=args.top_k, seed=args.seed)

    samples = {name: sampler(name)() for name in PRIORS}
    alone = best_seconds({name: sampler(name) for name in PRIORS}, sizes["repeats"], device)
    decoded = best_seconds({name: lambda name=name: model.decode(sampler(name)()) for name in PRIORS},
                           sizes["repeats"], device)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, tokens in samples.items():
        row = result["priors"][name]
        mean_kept = float(tokens.lengths.double().mean())
        row.update({
            "sample_tokens_per_image": mean_kept,
            "longest_sample_tokens": int(tokens.lengths.max()),  # a batch decodes in lock-step until its longest ends
            "steps_per_image": num_global + (mean_kept + 1 if name == "adaptive" else tokens.num_patches),
            "sample_seconds": alone[name], "samples_per_second": n / alone[name],
            "sample_decode_seconds": decoded[name], "samples_decoded_per_second": n / decoded[name],
        })
        grid_path = out_dir / f"samples_{name}.png"
        write_image(grid_path, tile_images(model.decode(tokens)))
        row["grid_png"] = str(grid_path)
    adaptive, raster = result["priors"]["adaptive"], result["priors"]["raster"]
    result["speedup"] = adaptive["samples_per_second"] / raster["samples_per_second"]
    result["speedup_with_decode"] = adaptive["samples_decoded_per_second"] / raster["samples_decoded_per_second"]
    return result


def print_summary(result: dict[str, Any]) -> None:
    tau = result["priors"]["adaptive"]["tau"]
    print(f"{result['device']} ({result['device_type']}), torch {result['torch']}, tokenizer {result['model']} (τ {tau}), "
          f"{result['crop']}px crops, {result['steps']} steps, {result['samples']} samples, options {result['options']}")
    for name, row in result["priors"].items():
        print(f"  {name:8s} params {row['parameters']:>9,}  bits/image train {row['train_bits_per_image']:7.1f} "
              f"held-out {row['heldout_bits_per_image']:7.1f}  tokens/image data {row['data_tokens_per_image']:5.1f} "
              f"samples {row['sample_tokens_per_image']:5.1f} (max {row['longest_sample_tokens']})  steps/image {row['steps_per_image']:5.1f}  "
              f"{row['samples_per_second']:8.1f} samples/s  ({row['samples_decoded_per_second']:.1f}/s decoded)")
    print(f"  speed-up adaptive/raster: {result['speedup']:.2f}x sampling, {result['speedup_with_decode']:.2f}x with decoding")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_PRETRAINED, help="tokenizer: a shipped name or a saved directory")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help=f"small run: {QUICK} (default: {FULL})")
    for key in QUICK:
        p.add_argument(f"--{key}", type=int, help=f"override {key}")
    p.add_argument("--tau", type=float, help="DTF threshold of the adaptive tokens (default: the model's)")
    p.add_argument("--crop", type=int, default=32, help="crop side in pixels (default 32)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out-dir", type=Path, default=Path("runs/bench_generation"), help="where the sample grids go")
    p.add_argument("--json", type=Path, help="write the results as JSON to this path")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    print_summary(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
