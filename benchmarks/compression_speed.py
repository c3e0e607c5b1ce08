"""How fast compressed files are written and read: the shipped coder on the held-out whole photos.

    python benchmarks/compression_speed.py --out runs/compression_speed
    git show 81ae4f9:plugins/context_prior.py > /tmp/window_walk.py    # the walk before RasterStates
    python benchmarks/compression_speed.py --walk-from /tmp/window_walk.py --out runs/compression_speed

Each photo's tokens (kept by the model's own rule) are written and read ``--repeats`` times, on one CPU
thread as the coder always runs; the median seconds per photo are reported, and their mean over the
photos. ``--walk-from FILE`` times, side by side in the same process and photo by photo, the
``ContextPrior.walk`` of FILE (another version of ``tatok_plugins/context_prior.py``) on the same prior's
weights: each walk's files must decode, by that walk, to the very tokens written, and the ratio of the
means is reported. Nothing is trained or tuned here.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

if __package__ in (None, ""):  # ``python benchmarks/compression_speed.py``: import ``benchmarks`` like ``-m`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.claims.common import environment, table, write_json  # noqa: E402
from benchmarks.coded_rate import file_bytes  # noqa: E402
from benchmarks.operating_point import DEFAULT_DATA, load_photos  # noqa: E402
from tatok_core.contract.tokens import Tokens  # noqa: E402
from tatok_core.pipeline.tokenizer import DEFAULT_PRETRAINED  # noqa: E402
from tatok_core.workflows.compression import ImageCoder  # noqa: E402

Walk = Callable[..., Tokens]


def walk_from(path: Path) -> Walk:
    """The ``ContextPrior.walk`` function defined in the Python file ``path``."""
    spec = importlib.util.spec_from_file_location(f"walk_from_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ContextPrior.walk


def add_coder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--prior``, ``--data``, ``--side``, ``--limit``: a tokenizer, the prior its tokens are
    coded with, and whole photos — the same on every benchmark of coded tokens."""
    parser.add_argument("--model", default=DEFAULT_PRETRAINED, help="a shipped name or a saved tokenizer folder")
    parser.add_argument("--prior", type=Path, help="the saved prior to code with (default: the model's context-prior/)")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"photos (default {DEFAULT_DATA})")
    parser.add_argument("--side", type=int, default=256, help="longest side in pixels (default 256)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT photos")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_coder_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="round trips per photo and walk (median)")
    parser.add_argument("--walk-from", type=Path, help="time this file's ContextPrior.walk side by side")
    parser.add_argument("--out", type=Path, default=Path("runs/compression_speed"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    coder = ImageCoder.from_pretrained(args.model, prior=args.prior)
    walks: dict[str, Walk] = {"current": type(coder.prior).walk}
    if args.walk_from is not None:
        walks[str(args.walk_from)] = walk_from(args.walk_from)
    photos = load_photos(args.data, args.side, args.limit)
    rows = []
    for photo in photos:
        tokens = coder.tokens_of(photo.image)
        row: dict = {"photo": photo.name, "kept": int(tokens.codes.numel()), "num_patches": tokens.num_patches}
        for label, walk in walks.items():
            coder.prior.walk = types.MethodType(walk, coder.prior)  # this instance only
            trips = [file_bytes(coder, tokens, f"{photo.name} ({label})") for _ in range(args.repeats)]
            row[label] = {"bytes": len(trips[0][0]), "write_s": statistics.median(t[1] for t in trips),
                          "read_s": statistics.median(t[2] for t in trips)}
        rows.append(row)
    del coder.prior.walk
    parts = ("bytes", "write_s", "read_s")
    summary = {label: {part: statistics.fmean(row[label][part] for row in rows) for part in parts}
               for label in walks}
    if args.walk_from is not None:
        summary["ratio"] = {part: summary[str(args.walk_from)][part] / summary["current"][part]
                            for part in ("write_s", "read_s")}
    result = {"command": " ".join(sys.argv), "environment": environment(), "model": args.model, "side": args.side,
              "repeats": args.repeats, "photos": rows, "summary": summary}
    path = write_json(args.out / "compression_speed.json", result)
    Console().print(table(f"{len(rows)} photos, longest side {args.side}: mean of the per-photo medians (s)",
                          ["walk", "bytes", "write", "read"],
                          [[label, f"{summary[label]['bytes']:.1f}", f"{summary[label]['write_s']:.3f}",
                            f"{summary[label]['read_s']:.3f}"] for label in walks]))
    if "ratio" in summary:
        print(f"the other walk takes {summary['ratio']['write_s']:.2f}× as long to write, "
              f"{summary['ratio']['read_s']:.2f}× to read")
    print(f"→ {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
