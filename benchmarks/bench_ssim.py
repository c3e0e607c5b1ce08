"""SSIM implementations compared on values (scikit-image as the reference) and speed.

    python benchmarks/bench_ssim.py --quick --json out/ssim.json

Candidates: TaTok's torch SSIM (:func:`tatok_core.workflows.metrics.ssim`), ``pytorch_msssim.ssim`` and
``torchmetrics``' ``structural_similarity_index_measure`` (both with an 11-tap σ = 1.5 Gaussian, as
scikit-image with ``gaussian_weights=True``), each skipped when not installed. Values: the largest
absolute difference from scikit-image over noisy pairs of every size (an error is recorded as such:
scikit-image's default raises below 11 pixels; TaTok's is compared with scikit-image at the largest odd
``win_size`` that fits). Speed: median seconds of ``torch.utils.benchmark`` per call, one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.benchmark as tbench
from skimage.metrics import structural_similarity

from tatok_core.workflows.metrics import ssim as tatok_ssim

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    side = min(x.shape[2:])
    win = min(11, side if side % 2 else side - 1)
    return torch.tensor([
        structural_similarity(np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1), channel_axis=-1, data_range=1.0,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False, win_size=win)
        for a, b in zip(x.double().numpy(), y.double().numpy())
    ], dtype=torch.float64)


def candidates() -> dict[str, Metric]:
    found: dict[str, Metric] = {"tatok": tatok_ssim, "skimage": skimage_ssim}
    try:
        import pytorch_msssim

        found["pytorch_msssim"] = lambda x, y: pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False).double()
    except ImportError:
        pass
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure as tm

        found["torchmetrics"] = lambda x, y: torch.stack(
            [tm(x[i : i + 1], y[i : i + 1], data_range=1.0) for i in range(x.shape[0])]).double()
    except ImportError:
        pass
    return found


def pair(batch: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, side, side, generator=g)
    noisy = (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return noisy, target


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, smaller batches")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    value_sides = [4, 6, 7, 8, 10, 11, 16, 64] if args.quick else [2, 4, 6, 7, 8, 10, 11, 16, 32, 64, 256]
    speed = (8, 64) if args.quick else (32, 256)
    metrics = candidates()
    result: dict[str, Any] = {"machine": platform.machine(), "torch": torch.__version__, "values": {}, "speed": {}}
    for name, metric in metrics.items():
        if name == "skimage":
            continue
        row: dict[str, Any] = {}
        for side in value_sides:
            x, y = pair(4, side, seed=side)
            try:
                row[str(side)] = float((metric(x, y) - skimage_ssim(x, y)).abs().max())
            except Exception as exc:  # a metric that cannot score this size: recorded, not fatal
                row[str(side)] = f"error: {type(exc).__name__}"
        result["values"][name] = row
    x, y = pair(*speed, seed=0)
    for name, metric in metrics.items():
        timer = tbench.Timer("metric(x, y)", globals={"metric": metric, "x": x, "y": y}, num_threads=1)
        result["speed"][name] = {"batch": speed[0], "side": speed[1], "median_s": timer.blocked_autorange(min_run_time=1).median}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
