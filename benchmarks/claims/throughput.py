"""Claim 4 — throughput on this CPU: encode and decode images/s, and where the time goes.

For the model under test at 32², 128² and 256² (held-out crops), medians of
``torch.utils.benchmark.Timer.blocked_autorange``:

* ``encode`` — :meth:`Tokenizer.encode` (the model's own filter and τ), images/s;
* ``decode`` — :meth:`Tokenizer.decode` of those tokens, images/s;
* each component timed alone on inputs prepared by the components before it, through the model's
  submodules: encoder, global tokenizer, quantizer, entropy estimator, filter, decoder (its share of
  their sum; what encode + decode spend outside them is reported as ``glue``).

Numbers depend on the machine and on what else runs: the load average is recorded with them.

    python -m benchmarks.claims.throughput [--quick|--full] [--model tatok-tiny] [--out runs/claims]
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from typing import Any

import torch
import torch.utils.benchmark as tbench

from benchmarks.claims.common import (
    HELDOUT,
    Context,
    environment,
    model_facts,
    save_figure,
    standalone,
    table,
    write_json,
)
from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.pipeline.tokenizer import Tokenizer

DESCRIPTION = "Claim 4: encode/decode throughput and time per component on this CPU"
COMPONENTS = ("encoder", "global_tokenizer", "quantizer", "entropy", "filter", "decoder")


def median_seconds(fn: Any, min_run_time: float) -> float:
    """Median seconds per call of ``fn`` (blocked_autorange; one warm-up call first)."""
    fn()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if min_run_time <= 0:
        return timer.timeit(1).median
    return timer.blocked_autorange(min_run_time=min_run_time).median


@torch.no_grad()
def measure(model: Tokenizer, images: torch.Tensor, min_run_time: float) -> dict[str, Any]:
    model.eval()
    batch = images.shape[0]
    tokens = model.encode(images)
    encode = median_seconds(lambda: model.encode(images), min_run_time)
    decode = median_seconds(lambda: model.decode(tokens), min_run_time)
    # Each component on the outputs of the ones before it (the Tokenizer's own wiring, unrolled).
    analysis = model.analyse(images)
    padded, grid = analysis.images, analysis.grid  # padded to the patch grid
    features = model.encoder(padded)
    global_features, patch_features = model.global_tokenizer(features, grid)
    m = global_features.shape[1]
    joint = torch.cat([global_features, patch_features], dim=1)
    quantized = model.quantizer(joint)
    context = model.entropy_context(padded, grid, quantized.vectors[:, :m], quantized.codes[:, :m],
                                    quantized.vectors[:, m:], quantized.codes[:, m:])
    bits = model.entropy(context).bits
    selection = model.filter.select(bits)
    calls = {
        "encoder": lambda: model.encoder(padded),
        "global_tokenizer": lambda: model.global_tokenizer(features, grid),
        "quantizer": lambda: model.quantizer(joint),
        "entropy": lambda: model.entropy(context),
        "filter": lambda: model.filter.select(bits),
        "decoder": lambda: model.decoder(quantized.vectors[:, :m], quantized.vectors[:, m:], selection.keep, grid),
    }
    seconds = {name: median_seconds(fn, min_run_time) for name, fn in calls.items()}
    total = sum(seconds.values())
    return {
        "side": images.shape[-1], "batch": batch, "patches": bits.shape[1], "mean_kept": float(selection.lengths.float().mean()),
        "encode_seconds": encode, "decode_seconds": decode,
        "encode_images_per_s": batch / encode, "decode_images_per_s": batch / decode,
        "component_seconds": seconds, "component_share": {k: v / total for k, v in seconds.items()},
        "glue_seconds": encode + decode - total,
    }


def run(ctx: Context) -> dict[str, Any]:
    s, model = ctx.settings, ctx.model
    ctx.console.rule("[bold]throughput")
    photos = ImageSource(HELDOUT).images
    rows = []
    for side, batch in s.throughput:
        rows.append(measure(model, fixed_crops(photos, side, batch, seed=s.seed), s.min_run_time))
    env = environment()
    result = {"part": "throughput", "mode": s.mode, "environment": env, "model": model_facts(model, ctx.model_label),
              "min_run_time": s.min_run_time, "sizes": rows}
    ctx.console.print(table(f"throughput of {ctx.model_label} on {env['cpu']} ({env['threads']} threads, load "
                            f"{env['load_average'][0] if env['load_average'] else '?'})",
                            ["size", "batch", "tokens kept / N", "encode img/s", "decode img/s",
                             *[c.replace("_tokenizer", "") for c in COMPONENTS], "glue ms"],
                            [[f"{r['side']}²", r["batch"], f"{r['mean_kept']:.0f}/{r['patches']}",
                              r["encode_images_per_s"], r["decode_images_per_s"],
                              *[f"{r['component_share'][c]:.0%}" for c in COMPONENTS], r["glue_seconds"] * 1e3]
                             for r in rows]))
    write_json(ctx.out_dir / "throughput.json", result)
    plot(result, ctx.out_dir / "throughput.png")
    return result


def plot(result: dict[str, Any], path: Any) -> Any:
    from matplotlib.figure import Figure

    rows = result["sizes"]
    figure = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)
    labels = [f"{r['side']}²" for r in rows]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["encode_images_per_s"] for r in rows], 0.4, label="encode")
    left.bar([i + 0.2 for i in x], [r["decode_images_per_s"] for r in rows], 0.4, label="decode")
    left.set_xticks(list(x), labels)
    left.set_yscale("log")
    left.set_ylabel("images / s")
    left.set_title(f"{result['model']['label']} on {result['environment']['threads']} CPU threads", fontsize=9)
    left.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for c in COMPONENTS:
        share = [r["component_share"][c] for r in rows]
        right.bar(labels, share, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, share)]
    right.set_ylabel("share of component time")
    right.set_title("where the time goes", fontsize=9)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(figure, path)


if __name__ == "__main__":
    raise SystemExit(standalone(run, DESCRIPTION))
