"""Windowed attention against the masked full attention it replaced: time and peak memory per forward.

    python benchmarks/bench_windows.py                         # CUDA when available, else CPU (smaller grids)
    python benchmarks/bench_windows.py --device cuda --json runs/windows.json

A decoder-sized transformer (width 128, 4 heads, 4 blocks, window 8, 8 globals) on a square patch grid,
batch 1, eval mode: ``masked`` is full attention over M + N tokens under :meth:`Windows.dense_mask`
(the pre-issue-14 computation, O((M + N)²)), ``windowed`` the per-window computation. Each row also
records the largest output difference between the two. Times are medians of ``blocked_autorange``
(CUDA-synchronised); memory is ``max_memory_allocated`` on CUDA and not measured on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatok_plugins.layers import Transformer, Windows

CUDA_GRIDS = (32, 64, 128)
CPU_GRIDS = (16, 32, 64)


def run(transformer: Transformer, x: torch.Tensor, windows: Windows, masked: bool) -> torch.Tensor:
    if masked:
        return transformer(x, windows.dense_mask())
    return transformer(x, windows=windows)


@torch.no_grad()
def measure(side: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    transformer = Transformer(128, depth=4, heads=4).to(device).eval()
    windows = Windows((side, side), 8, prefix=8, device=device)
    x = torch.randn(1, 8 + side * side, 128, device=device)
    row: dict[str, Any] = {"grid": side, "tokens": side * side, "dtype": str(dtype).removeprefix("torch.")}
    outputs = {}
    for name in ("masked", "windowed"):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            fn = lambda: run(transformer, x, windows, name == "masked")  # noqa: E731
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            outputs[name] = fn().float()
            if device.type == "cuda":
                torch.cuda.synchronize()
                row[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            row[f"{name}_ms"] = timer.blocked_autorange(min_run_time=0.5).median * 1e3
    row["speedup"] = row["masked_ms"] / row["windowed_ms"]
    row["max_abs_diff"] = float((outputs["masked"] - outputs["windowed"]).abs().max())
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grids", type=int, nargs="*", help="square grid sides in patches")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_windows.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    grids = args.grids or (CUDA_GRIDS if device.type == "cuda" else CPU_GRIDS)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    rows = []
    for dtype in dtypes:
        for side in grids:
            row = measure(side, device, dtype)
            rows.append(row)
            memory = (f"  peak {row['masked_peak_mib']:.0f} → {row['windowed_peak_mib']:.0f} MiB"
                      if "masked_peak_mib" in row else "")
            print(f"{row['dtype']:>8} grid {side}² ({row['tokens']} tokens): masked {row['masked_ms']:.2f} ms, "
                  f"windowed {row['windowed_ms']:.2f} ms ({row['speedup']:.1f}×){memory}, "
                  f"max |diff| {row['max_abs_diff']:.2e}", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
