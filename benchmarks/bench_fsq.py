"""TaTok's FSQ against vector-quantize-pytorch's on the same input: codes identical, time ratio.

    pip install 'tatok[bench]'          # vector-quantize-pytorch: an optional dependency of this benchmark only
    python benchmarks/bench_fsq.py                      # levels 8×6 (tatok-tiny's), 4096 / 65536 tokens
    python benchmarks/bench_fsq.py --quick --json runs/fsq.json

Both in eval mode without projections (width = number of levels), under ``torch.no_grad``; times are
medians of ``torch.utils.benchmark.Timer.blocked_autorange``. The issue-14 target is a ratio (TaTok /
reference) of at most 1.2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatok_core.contract.interfaces import Facts
from tatok_plugins.fsq import FSQ

RATIO_TARGET = 1.2


def median_seconds(fn: Any, min_run_time: float) -> float:
    fn()
    return tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


@torch.no_grad()
def compare(levels: tuple[int, ...], tokens: int, device: torch.device, min_run_time: float) -> dict[str, Any]:
    from vector_quantize_pytorch import FSQ as ReferenceFSQ

    ours = FSQ(Facts({"dim": len(levels)}, {"dim": "benchmark"}), levels=levels).to(device).eval()
    reference = ReferenceFSQ(list(levels)).to(device).eval()
    x = torch.randn(1, tokens, len(levels), generator=torch.Generator().manual_seed(0)).mul(2).to(device)
    mine, (their_vectors, their_codes) = ours(x), reference(x)
    ours_s = median_seconds(lambda: ours(x), min_run_time)
    reference_s = median_seconds(lambda: reference(x), min_run_time)
    return {
        "levels": list(levels), "tokens": tokens,
        "codes_identical": bool(torch.equal(mine.codes, their_codes.long())),
        "vectors_max_abs_diff": float((mine.vectors - their_vectors).abs().max()),
        "tatok_s": ours_s, "reference_s": reference_s, "ratio": ours_s / reference_s,
        "met": ours_s / reference_s <= RATIO_TARGET,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[8, 8, 8, 8, 8, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--quick", action="store_true", help="4096 tokens, short timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("runs/bench_fsq.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        print("bench_fsq needs vector-quantize-pytorch: pip install 'tatok[bench]'", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    tokens = [4096] if args.quick else args.tokens
    rows = [compare(tuple(args.levels), n, device, 0.2 if args.quick else 1.0) for n in tokens]
    for row in rows:
        print(f"levels {row['levels']} × {row['tokens']} tokens: tatok {row['tatok_s'] * 1e3:.3f} ms, "
              f"vector-quantize-pytorch {row['reference_s'] * 1e3:.3f} ms, ratio {row['ratio']:.2f} "
              f"(target ≤ {RATIO_TARGET}: {'met' if row['met'] else 'NOT met'}), codes identical {row['codes_identical']}")
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0 if all(r["codes_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
