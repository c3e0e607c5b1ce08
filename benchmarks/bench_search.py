"""The set search, images one at a time against a batch searched together: same sets, time side by side.

    python benchmarks/bench_search.py                                   # 8 photos, 192² crops, this CPU
    python benchmarks/bench_search.py --device cuda --batches 16,64,256 --json runs/search.json

Every image is a centre crop (``--side``) of a built-in photo, encoded by the default with top-k at
``--fraction`` of its tokens, the encoder's tokens (no refinement: only the search is timed), the spec's
sweeps. First each image alone, then the whole batch at each ``search_batch`` (masks per decode call);
every batched run must keep exactly the sets the images get alone. Times are the median of ``--repeats``
runs of the whole encode.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.data import ImageSource


def median_seconds(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def centre_crops(data: str, side: int, count: int) -> torch.Tensor:
    """(B, 3, side, side) centre crops of the first ``count`` photos at least ``side`` on both sides."""
    crops = []
    for image in ImageSource(data).images:
        height, width = image.shape[-2:]
        if min(height, width) >= side:
            top, left = (height - side) // 2, (width - side) // 2
            crops.append(image[:, top:top + side, left:left + side])
        if len(crops) == count:
            break
    return torch.stack(crops)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tatok-small8-covered")
    parser.add_argument("--data", default="builtin:photos:extended")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--side", type=int, default=192)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--batches", default="16,64", help="search_batch values to time (masks per decode call)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = Tokenizer.from_pretrained(args.model).to(device).eval()
    images = centre_crops(args.data, args.side, args.images).to(device)  # (B, 3, side, side)
    k = round(args.fraction * model.max_tokens(args.side, args.side))

    def encode(tokenizer: Tokenizer, batch: torch.Tensor) -> torch.Tensor:  # (B, N) the kept sets
        return tokenizer.encode(batch, filter="topk", k=k, refine_steps=0).to_grid(fill=0)[1]

    alone = torch.cat([encode(model, images[i:i + 1]) for i in range(len(images))])  # (B, N)
    alone_s = median_seconds(lambda: [encode(model, images[i:i + 1]) for i in range(len(images))], args.repeats, device)
    rows = []
    for masks in (int(value) for value in args.batches.split(",")):
        batched = model.with_pipeline_options(search_batch=masks)
        together = encode(batched, images)
        seconds = median_seconds(lambda: encode(batched, images), args.repeats, device)
        rows.append({"search_batch": masks, "seconds": seconds, "speedup": alone_s / seconds,
                     "same_sets": bool(torch.equal(together, alone))})
        print(f"search_batch {masks:4d}: {seconds:7.2f} s ({alone_s / seconds:4.2f}× one at a time), "
              f"same sets: {rows[-1]['same_sets']}")
    record = {"model": args.model, "device": str(device), "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "images": len(images), "side": args.side, "kept": k,
              "sweeps": model.search_sweeps, "one_at_a_time_s": alone_s, "rows": rows}
    print(f"{len(images)} images of {args.side}² one at a time: {alone_s:.2f} s "
          f"({model.search_sweeps} sweeps, k = {k})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
    return 0 if all(row["same_sets"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
