"""Run the claims suite (issue 7): the paper's claims measured on real held-out photos.

    python benchmarks/run_claims.py                      # quick mode: < 20 min on 2 CPU cores
    python benchmarks/run_claims.py --full               # full recipe for every trained variant (hours)
    python benchmarks/run_claims.py --model runs/tiny/final --out runs/claims
    python benchmarks/run_claims.py --only throughput,allocation
    python benchmarks/run_claims.py --quick --write-results docs/results.md   # run, then rewrite that section
    python benchmarks/run_claims.py --only report --write-results docs/results.md  # rewrite it from the JSON only

Parts (``benchmarks/claims/``): ``rate_distortion`` (claim 1), ``ablations`` (claim 2), ``allocation``
(claim 3), ``throughput`` (claim 4). Each prints rich tables and writes ``<part>.json`` and PNGs into
``--out``; the driver adds ``summary.json`` (mode, seconds per part, floors) and prints the floors as
PASS/FAIL lines (never asserted). The trained variants (DTF, fixed-rate, patch-only) are trained once
per mode into ``OUT/models/`` and reused by later runs.

Quick mode trains the three variants with the recipe's steps overridden (1000 by default, ``--steps``):
equal training cost for every comparison between tokenizers. Full mode uses the recipe as is and takes
the model under test as its DTF variant when it was trained from the same spec.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims import PARTS  # noqa: E402
from benchmarks.claims.common import (  # noqa: E402
    add_common_arguments,
    context_from_args,
    make_console,
    print_floors,
    write_json,
)


def _module(part: str):
    import importlib

    return importlib.import_module(f"benchmarks.claims.{part}")


def parse_parts(text: str | None) -> list[str]:
    if not text:
        return list(PARTS)
    parts = [p.strip().replace("-", "_") for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in (*PARTS, "report")]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}, report")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_common_arguments(parser)
    parser.add_argument("--only", default=None, help=f"comma-separated parts: {', '.join(PARTS)}, report (default: all parts)")
    parser.add_argument("--write-results", metavar="MD", default=None,
                        help="rewrite the '## Claims benchmarks' section of this markdown file from the JSON")
    args = parser.parse_args(argv)
    parts = [p for p in parse_parts(args.only) if p != "report"]
    out_dir = Path(args.out)
    from benchmarks.claims.report import collect_floors, write_results

    console = make_console()
    if parts:
        ctx = context_from_args(args, console)
        summary_path = out_dir / "summary.json"
        import json

        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if summary.get("mode") not in (None, ctx.settings.mode) or summary.get("model") not in (None, ctx.model_label):
            summary = {}  # another mode or model: start the summary afresh
        seconds = summary.get("seconds", {})
        start = time.perf_counter()
        for part in parts:
            began = time.perf_counter()
            _module(part).run(ctx)
            seconds[part] = time.perf_counter() - began
            console.print(f"[dim]{part}: {seconds[part] / 60:.1f} min")
            write_json(summary_path, {"mode": ctx.settings.mode, "model": ctx.model_label, "seconds": seconds,
                                      "floors": collect_floors(out_dir)})
        console.rule("[bold]floors")
        print_floors(console, collect_floors(out_dir))
        console.print(f"total {(time.perf_counter() - start) / 60:.1f} min; results in {out_dir}/")
    elif not args.write_results:
        print_floors(console, collect_floors(out_dir))
    if args.write_results:
        path = write_results(Path(args.write_results), out_dir)
        console.print(f"wrote the claims section of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
