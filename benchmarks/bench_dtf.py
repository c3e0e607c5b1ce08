"""Benchmark DTF selection: the torch reference vs the Triton kernel.

    python benchmarks/bench_dtf.py                       # CUDA: B ∈ {64, 1024, 8192} × N ∈ {256, 1024, 4096}
    python benchmarks/bench_dtf.py --quick               # smaller grid (CPU default)
    python benchmarks/bench_dtf.py --json out/dtf.json   # also write the numbers
    python benchmarks/bench_dtf.py --mode theta --tokens 16384 65536   # an absolute rule, beyond the old cap

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` (CUDA-synchronised). Both
backends return the complete :class:`~tatok_core.contract.selection.Selection`, so both include input validation
and the host sync that sizes the packed index; the ``triton+cap`` column passes ``max_total = B·N``
(no sizing sync). Achieved bandwidth counts the compulsory traffic only: bits read (4 B/token) plus
mask (1 B/token), packed index (8 B/kept token), lengths and cu_seqlens written — a lower bound on what
any implementation must move, compared with the device's peak (``--peak-gbps``; defaults by device name,
e.g. H200 4800 GB/s). On a machine without CUDA only the reference runs: the Triton kernel would run in
Triton's interpreter there, which measures Python, not the kernel.
"""

from __future__ import annotations

import argparse
import functools
import math
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

from tatok_core.ops.dtf.reference import MODES, select_by_rule

# Peak DRAM bandwidth in GB/s by (lower-case) substring of torch.cuda.get_device_name(); first match wins.
PEAK_GBPS = [
    ("h200", 4800.0),
    ("gh200", 4000.0),
    ("h100 pcie", 2000.0),
    ("h100", 3350.0),
    ("h800", 3350.0),
    ("b200", 8000.0),
    ("a100-sxm4-80gb", 2039.0),
    ("a100 80gb pcie", 1935.0),
    ("a100", 1555.0),
    ("l40s", 864.0),
    ("l4", 300.0),
    ("a10", 600.0),
    ("v100", 900.0),
    ("rtx 4090", 1008.0),
    ("rtx 3090", 936.0),
    ("t4", 320.0),
]

FULL_BATCHES = (64, 1024, 8192)
FULL_TOKENS = (256, 1024, 4096)
QUICK_BATCHES = (64, 1024)
QUICK_TOKENS = (256, 1024)
REFERENCE_BYTES_PER_TOKEN = 64  # rough peak working set of the torch reference (sort, int64 sums, casts)


def default_peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps
    return None


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 * 2**30


def traffic_bytes(batch: int, tokens: int, kept: int) -> int:
    """Compulsory bytes: read bits (float32), write mask (bool), index (int64), lengths, cu_seqlens."""
    return batch * tokens * 4 + batch * tokens * 1 + kept * 8 + batch * 8 + (batch + 1) * 4


def make_bits(batch: int, tokens: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Entropy-like bits: a smooth per-image level times heavy-tailed per-token noise, some ties."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    level = torch.rand(batch, 1, generator=g) * 4
    noise = torch.empty(batch, tokens).exponential_(generator=g)
    bits = (level * noise * 8).round() / 8  # quantised: realistic ties
    return bits.to(device)


def median_seconds(fn: Any, min_run_time: float) -> float:
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def rule_threshold(args: argparse.Namespace, bits: torch.Tensor) -> float:
    """The threshold of ``args.mode``: τ = ``--tau``; θ / ε = ``--threshold`` or, by default, the mean token
    bits (θ) or a quarter of the mean image total (ε), so that each rule keeps a middling share."""
    if args.mode == "tau":
        return args.tau
    if args.threshold is not None:
        return args.threshold
    return float(bits.mean()) if args.mode == "theta" else float(bits.sum(1).mean()) / 4


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    triton_fn = None
    triton_note = ""
    if device.type == "cuda":
        try:
            from tatok_core.ops.dtf.triton_kernel import dtf_select_triton, triton_available

            if triton_available():
                triton_fn = dtf_select_triton
            else:
                triton_note = "triton not importable: reference only"
        except ImportError as exc:  # pragma: no cover
            triton_note = f"tatok_core.ops.dtf.triton_kernel not importable ({exc}): reference only"
    else:
        triton_note = f"device {device.type}: reference only (the Triton kernel needs CUDA; on CPU it is interpreted)"

    quick = args.quick or (device.type != "cuda" and not args.full)
    batches = args.batch or (QUICK_BATCHES if quick else FULL_BATCHES)
    tokens_list = args.tokens or (QUICK_TOKENS if quick else FULL_TOKENS)
    peak = args.peak_gbps if args.peak_gbps is not None else default_peak_gbps(device)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "tau": args.tau,
        "mode": args.mode,
        "peak_gbps": peak,
        "note": triton_note,
        "rows": [],
    }
    budget = free_memory_bytes(device) // 2
    encoder = load_encoder(args.encoder, device) if args.encoder else None
    result["encoder"] = args.encoder
    for batch in batches:
        for tokens in tokens_list:
            row: dict[str, Any] = {"batch": batch, "tokens": tokens}
            need = batch * tokens * REFERENCE_BYTES_PER_TOKEN
            if need > budget:
                row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB allowed"
                result["rows"].append(row)
                continue
            bits = make_bits(batch, tokens, device)
            value = rule_threshold(args, bits)
            row["threshold"] = value
            ref = select_by_rule(bits, args.mode, value, args.min_keep)
            kept = int(ref.cu_seqlens[-1])
            row["kept_fraction"] = kept / (batch * tokens)
            row["bytes"] = traffic_bytes(batch, tokens, kept)
            row["ref_s"] = median_seconds(functools.partial(select_by_rule, bits, args.mode, value, args.min_keep),
                                          args.min_run_time)
            row["ref_gbps"] = row["bytes"] / row["ref_s"] / 1e9
            if triton_fn is not None:
                got = triton_fn(bits, value, args.min_keep, mode=args.mode)
                row["exact"] = bool(got.equal(ref))
                row["triton_s"] = median_seconds(functools.partial(triton_fn, bits, value, args.min_keep, mode=args.mode),
                                                 args.min_run_time)
                cap = batch * tokens
                row["triton_cap_s"] = median_seconds(
                    functools.partial(triton_fn, bits, value, args.min_keep, mode=args.mode, max_total=cap),
                    args.min_run_time,
                )
                row["speedup"] = row["ref_s"] / row["triton_s"]
                row["triton_gbps"] = row["bytes"] / row["triton_s"] / 1e9
                row["triton_cap_gbps"] = row["bytes"] / row["triton_cap_s"] / 1e9
                if peak:
                    row["triton_cap_pct_peak"] = 100 * row["triton_cap_gbps"] / peak
            if encoder is not None:
                time_encoder(encoder, row, device, args)
            result["rows"].append(row)
            del bits, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def load_encoder(name: str, device: torch.device) -> torch.nn.Module:
    """The encoder the filter sits behind: a saved/shipped tokenizer's, or ``default`` (spec defaults)."""
    from tatok_core.contract.spec import PipelineSpec
    from tatok_core.pipeline.tokenizer import Tokenizer

    model = Tokenizer(PipelineSpec()) if name == "default" else Tokenizer.from_pretrained(name)
    return model.encoder.to(device).eval()


def time_encoder(encoder: torch.nn.Module, row: dict[str, Any], device: torch.device, args: argparse.Namespace) -> None:
    """Median encoder forward on B square images of N patches, next to the filter time (same row)."""
    batch, tokens = row["batch"], row["tokens"]
    side = math.isqrt(tokens)
    if side * side != tokens or batch * tokens > args.encoder_max_tokens:
        row["encoder_skipped"] = "N not square" if side * side != tokens else "over --encoder-max-tokens"
        return
    images = torch.rand(batch, encoder.channels, side * encoder.patch_size, side * encoder.patch_size, device=device)
    with torch.no_grad():
        row["encoder_s"] = median_seconds(lambda: encoder(images), args.min_run_time)
    filter_s = row.get("triton_s", row["ref_s"])
    row["filter_share"] = filter_s / (filter_s + row["encoder_s"])


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover
        return None


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    peak = result["peak_gbps"]
    title = f"DTF select on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
    title += f"τ={result['tau']})" if result["mode"] == "tau" else f"rule {result['mode']})"
    table = Table(show_edge=False, pad_edge=False)
    has_triton = any("triton_s" in r for r in result["rows"])
    cols = ["B", "N", "kept", "ref ms", "ref GB/s"]
    if has_triton:
        cols += ["triton ms", "ref/triton", "triton GB/s", "+cap ms", "+cap GB/s"]
        if peak:
            cols += ["% peak"]
        cols += ["exact"]
    has_encoder = any("encoder_s" in r for r in result["rows"])
    if has_encoder:
        cols += ["encoder ms", "filter share"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["rows"]:
        if "skipped" in r:
            table.add_row(str(r["batch"]), str(r["tokens"]), f"skipped: {r['skipped']}", *[""] * (len(cols) - 3))
            continue
        cells = [str(r["batch"]), str(r["tokens"]), f"{r['kept_fraction']:.0%}", f"{r['ref_s'] * 1e3:.3f}",
                 f"{r['ref_gbps']:.3g}"]  # fmt: skip
        if has_triton:
            cells += [f"{r['triton_s'] * 1e3:.3f}", f"{r['speedup']:.1f}x", f"{r['triton_gbps']:.4g}",
                      f"{r['triton_cap_s'] * 1e3:.3f}", f"{r['triton_cap_gbps']:.4g}"]  # fmt: skip
            if peak:
                cells += [f"{r['triton_cap_pct_peak']:.1f}%"]
            cells += ["yes" if r["exact"] else "NO"]
        if has_encoder:
            cells += [f"{r['encoder_s'] * 1e3:.2f}", f"{r['filter_share']:.1%}"] if "encoder_s" in r else ["-", "-"]
        table.add_row(*cells)
    console = Console(width=max(120, Console().width))
    console.print(title)
    console.print(table)
    if result["note"]:
        console.print(f"note: {result['note']}")
    if peak:
        console.print(f"peak bandwidth used for %: {peak:.0f} GB/s (--peak-gbps to change)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_dtf", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes B")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per image N (any N)")
    p.add_argument("--mode", choices=MODES, default="tau", help="the rule (default tau)")
    p.add_argument("--tau", type=float, default=0.7, help="DTF threshold τ (default 0.7)")
    p.add_argument("--threshold", type=float, help="θ or ε in bits (default: derived from the bits)")
    p.add_argument("--min-keep", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"small grid: B {QUICK_BATCHES} × N {QUICK_TOKENS}")
    p.add_argument("--full", action="store_true", help="the full grid even on CPU (slow)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per blocked_autorange")
    p.add_argument("--peak-gbps", type=float, help="device peak bandwidth in GB/s (default: by device name)")
    p.add_argument("--json", type=Path, help="write the results as JSON to this path")
    p.add_argument("--encoder", help="also time this tokenizer's encoder (a name such as tatok-tiny, a saved "
                   "directory, or 'default') on images of N patches, next to the filter")
    p.add_argument("--encoder-max-tokens", type=int, default=2**22,
                   help="skip the encoder timing when B·N exceeds this (default 2^22)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
