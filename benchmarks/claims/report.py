"""Regenerate the "## Claims benchmarks" section of docs/results.md from the suite's JSON files.

Only that section is touched (from its heading to the next level-2 heading): the rest of the file
belongs to the docs. PNGs are copied to ``docs/img/claims-<name>.png`` and linked only when present
(the docs build is strict about missing files).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.claims.common import fmt

HEADING = "## Claims benchmarks"
FIGURES = ("rate_distortion", "ablations", "allocation", "allocation_scatter", "throughput")
COMMANDS = """```bash
python benchmarks/run_claims.py --quick --write-results docs/results.md   # < 20 min on 2 CPU cores
python benchmarks/run_claims.py --full --write-results docs/results.md    # full recipe for every trained variant (hours)
python benchmarks/run_claims.py --only report --write-results docs/results.md   # rewrite this section from runs/claims/*.json
```"""


PARTS_TEXT = """\
1. **Adaptive vs fixed rate** — on one trained model, DTF against fixed-count filters (`topk`, `random`, `raster`) at
   matched mean tokens; and a DTF-trained tokenizer against a fixed-rate one (filter `all` in training) trained by the
   same recipe for the same steps: the token saving at equal PSNR.
2. **Ablations** — information insufficiency (global + patch vs patch-only at equal *total* tokens, globals counted)
   and redundancy (bits per patch token the global tokens explain; PSNR as low-entropy vs random tokens are dropped).
3. **Allocation** — tokens kept per photo and per crop against histogram entropy and gradient energy.
4. **Throughput** — encode/decode images/s on the CPU and the share of time in each component.

Quick mode trains its three variants (DTF, fixed-rate, patch-only) for a short, equal budget: their absolute
quality is far below the shipped model's, only their comparison is meaningful. Full mode uses the whole recipe."""


def load(out_dir: Path, part: str) -> dict[str, Any] | None:
    path = out_dir / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def collect_floors(out_dir: Path) -> list[dict[str, Any]]:
    floors: list[dict[str, Any]] = []
    for part in ("rate_distortion", "ablations"):
        data = load(out_dir, part)
        if data:
            floors += data.get("floors", [])
    return floors


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A markdown table; the first ``left`` columns left-aligned, the rest (numbers) right-aligned."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pending(part: str) -> str:
    return f"_Not measured yet: `python benchmarks/run_claims.py --quick --only {part} --write-results docs/results.md`._"


def render(out_dir: Path, figures: dict[str, str]) -> str:
    """The section's markdown; ``figures`` maps figure names to the links to use."""
    rd, ab, al, tp = (load(out_dir, p) for p in ("rate_distortion", "ablations", "allocation", "throughput"))
    first = next((d for d in (rd, ab, al, tp) if d), None)
    out = [HEADING, "",
           "The paper's claims (issue 7) measured on the built-in **held-out** photos (chelsea, coffee, rocket, flower, "
           "gravel: never seen in training) by `benchmarks/run_claims.py`; every number below is regenerated from "
           "`runs/claims/*.json` by the last command:", "", COMMANDS, "", PARTS_TEXT, ""]
    if first is None:
        out += ["_No results yet: run the quick mode above once the shipped model (tatok-tiny) exists._", ""]
        return "\n".join(out)
    env = first["environment"]
    model = first.get("model") or first.get("models", {}).get("shipped", {})
    out += [f"Last run: **{first['mode']}** mode, model `{model.get('label')}` (spec {model.get('spec_digest')}), "
            f"{env['date']}, {env['cpu']}, torch {env['torch']}, {env['threads']} threads.", ""]

    floors = collect_floors(out_dir)
    if floors:
        out += ["### Floors", "", "Printed by the suite, not asserted by the tests.", "",
                md_table(["", "floor", "measured", "threshold", "how"],
                         [[f"**{f['status']}**", f["name"], None if f["value"] is None else f"{f['value']:+.2f}",
                           f"{f['threshold']:+.2f}", f["detail"]] for f in floors], left=2), ""]

    out += _rate_distortion_section(rd, figures)
    out += _ablations_section(ab, figures)
    out += _allocation_section(al, figures)
    out += _throughput_section(tp, figures)
    return "\n".join(out)


def _rate_distortion_section(rd: dict[str, Any] | None, figures: dict[str, str]) -> list[str]:
    """Claim 1: DTF against fixed-count filters and a fixed-rate model at equal training cost."""
    out = ["### 1. Adaptive vs fixed rate (rate–distortion)", ""]
    if rd:
        models = rd["models"]
        out += [f"DTF (τ calibrated per budget) against fixed-count filters that keep k = round(DTF's mean) tokens of every "
                f"image, on `{models['shipped']['label']}`; PSNR in dB; bpp = bits per pixel of DTF's tokens, counting "
                f"the codes, the global tokens and which tokens were kept (`tatok_core.contract.bitrate.token_bits`). Then, at equal training cost "
                f"({models['fixed-rate']['steps']} steps each), the recipe trained with DTF against the same recipe "
                f"trained with filter `all` (a classic fixed-rate tokenizer).", ""]
        for key, data in rd["sets"].items():
            pts, summary = data["points"], data["summary"]
            by = {(p["model"], p["filter"], p["budget"]): p for p in pts}
            rows = []
            for d in (p for p in pts if p["model"] == "shipped" and p["filter"] == "dtf"):
                b = d["budget"]
                rnd = by.get(("shipped", "random", b))
                rows.append([f"{b:.0%}", d["mean_tokens"], d.get("bpp"), d["psnr"],
                             *[by.get(("shipped", n, b), {}).get("psnr") for n in ("topk", "random", "raster")],
                             None if rnd is None else d["psnr"] - rnd["psnr"], d["ssim"], None if rnd is None else rnd["ssim"]])
            a = by.get(("shipped", "all", 1.0))
            if a:
                rows.append(["all", a["mean_tokens"], a.get("bpp"), a["psnr"], None, None, None, None, a["ssim"], None])
            out += [f"**{data['description']}** (N = {summary['mean_patches']:.0f} patch tokens per image)", "",
                    md_table(["budget", "tokens", "bpp", "DTF", "topk", "random", "raster", "DTF − random", "SSIM DTF",
                              "SSIM random"], rows), ""]
            notes = []
            if summary.get("saving_vs_random"):
                lo, hi = rd.get("floor_range", (0.1, 0.75))
                notes.append(f"DTF matches random's PSNR with **{summary['saving_vs_random']:.2f}× fewer** tokens "
                             f"(median over budgets keeping {lo:.0%}–{hi:.0%} of the tokens).")
            eq = summary.get("equal_cost")
            if eq:
                if eq.get("saving_psnr"):
                    notes.append(f"Equal training cost: DTF reaches the fixed-rate PSNR ({eq['fixed_psnr']:.2f} dB with all "
                                 f"{eq['fixed_tokens']:.0f} tokens) with {eq['dtf_tokens_at_fixed_psnr']:.0f} tokens: "
                                 f"**{eq['saving_psnr']:.2f}× fewer**.")
                else:
                    notes.append(f"Equal training cost: DTF does **not** reach the fixed-rate PSNR ({eq['fixed_psnr']:.2f} dB "
                                 f"with all {eq['fixed_tokens']:.0f} tokens); its best is {eq['dtf_best_psnr']:.2f} dB.")
                if eq.get("saving_ssim"):
                    notes.append(f"By SSIM ({eq['fixed_ssim']:.3f}): {eq['saving_ssim']:.2f}× fewer tokens.")
            out += [" ".join(notes), ""] if notes else []
        out += _figure(figures, "rate_distortion", "rate–distortion")
    else:
        out += [_pending("rate_distortion"), ""]
    return out


def _ablations_section(ab: dict[str, Any] | None, figures: dict[str, str]) -> list[str]:
    """Claim 2: information insufficiency (patch-only) and redundancy (what the globals explain, dropping tokens)."""
    out = ["### 2. Ablations: insufficiency and redundancy", ""]
    if ab:
        ins = ab["insufficiency"]
        m = ins["models"]
        out += [f"**Information insufficiency.** Global + patch (M = {m['global+patch']['num_global']} global tokens) vs "
                f"patch-only, both trained {m['patch-only']['steps']} steps from the same recipe, at equal **total** "
                f"tokens (globals count as tokens), each keeping patch tokens by its own DTF. PSNR in dB.", ""]
        for data in ins["sets"].values():
            rows = []
            for g in data["gaps"]:
                gp = next(p for p in data["points"] if p["model"] == "global+patch" and p["budget"] == g["budget"])
                pp = next(p for p in data["points"] if p["model"] == "patch-only" and p["budget"] == g["budget"])
                rows.append([f"{g['budget']:.0%}", g["total_tokens"], gp["psnr"], pp["psnr"], g["psnr_gap"], gp["ssim"], pp["ssim"]])
            out += [f"*{data['description']}*", "",
                    md_table(["total / N", "total tokens", "global + patch", "patch-only", "gap", "SSIM g+p", "SSIM patch"], rows), ""]
        ce = ab["conditional_entropy"]
        if "sets" in ce:
            out += [f"**Redundancy: what the globals explain.** Two priors trained {ce['steps']} steps on the frozen model's "
                    f"codes of {ce['train_crops']} training crops, one seeing the global tokens and one only positions; "
                    f"cross-entropy on held-out images in bits per patch token (a code holds {ce['code_bits']:.0f} bits).", "",
                    md_table(["held-out images", "H(patch | globals, position)", "H(patch | position)", "explained by globals",
                              "share", "model's own prior"],
                             [[k, v["with_globals"], v["without_globals"], v["explained_bits"],
                               None if v["explained_share"] is None else f"{v['explained_share']:.1%}", v["shipped_prior"]]
                              for k, v in ce["sets"].items()]), ""]
        elif ce.get("skipped"):
            out += [f"Conditional entropy: skipped ({ce['skipped']}).", ""]
        for data in ab["dropping"]["sets"].values():
            fractions = sorted({p["fraction"] for p in data["points"]}, reverse=True)
            rows = []
            for f in fractions:
                at = {p["order"]: p for p in data["points"] if p["fraction"] == f}
                rows.append([f"{f:.0%}", *[at.get(o, {}).get("psnr") for o in ("dtf", "topk", "random", "bottomk")],
                             *[None if o not in at else f"{1 - at[o]['bits_kept']:.0%}" for o in ("topk", "random")]])
            out += [f"**Redundancy: dropping tokens** ({data['description']}). PSNR when the lowest-entropy tokens are dropped "
                    "first (DTF, top-k), at random, or the highest-entropy first, and the share of the bits dropped.", "",
                    md_table(["kept", "DTF", "low-entropy dropped", "random dropped", "high-entropy dropped",
                              "bits dropped (low first)", "bits dropped (random)"], rows), ""]
        out += _figure(figures, "ablations", "ablations")
    else:
        out += [_pending("ablations"), ""]
    return out


def _allocation_section(al: dict[str, Any] | None, figures: dict[str, str]) -> list[str]:
    """Claim 3: the tokens kept follow the content of the image."""
    out = ["### 3. Allocation: tokens follow content", ""]
    if al:
        rows = [[label, next(iter(c.values()))["n"], *[_corr(c[k]) for k in ("hist_entropy", "patch_entropy",
                                                                              "gradient_energy", "mean_bits")]]
                for label, c in al["correlations"].items()]
        photos = sorted(al["sets"]["photos"]["images"], key=lambda r: r["fraction"])
        out += [f"DTF at τ = {al['tau']}: correlation (Pearson r / Spearman ρ) of the tokens kept with the luminance "
                "histogram entropy, the mean per-patch histogram entropy, the gradient energy and the model's own bits.", "",
                md_table(["images", "n", "histogram entropy", "patch entropy", "gradient energy", "model bits/token"], rows), "",
                md_table(["photo", "kept / N", "kept"],
                         [[r["name"] + (" (held-out)" if r["heldout"] else ""), f"{r['kept']}/{r['patches']}",
                           f"{r['fraction']:.0%}"] for r in photos]), ""]
        out += _figure(figures, "allocation", "photos sorted by tokens kept")
        out += _figure(figures, "allocation_scatter", "tokens kept vs content")
    else:
        out += [_pending("allocation"), ""]
    return out


def _throughput_section(tp: dict[str, Any] | None, figures: dict[str, str]) -> list[str]:
    """Claim 4: images per second and each component's share of the time."""
    out = ["### 4. Throughput", ""]
    if tp:
        env = tp["environment"]
        out += [f"`{tp['model']['label']}` on {env['cpu']} ({env['threads']} threads, load average "
                f"{env['load_average'][0] if env['load_average'] else '?'}): medians of "
                "`torch.utils.benchmark` blocked_autorange; component shares of their summed time.", "",
                md_table(["size", "batch", "kept / N", "encode img/s", "decode img/s", "encoder", "global", "quantizer",
                          "entropy", "filter", "decoder"],
                         [[f"{r['side']}²", r["batch"], f"{r['mean_kept']:.0f}/{r['patches']}", r["encode_images_per_s"],
                           r["decode_images_per_s"], *[f"{r['component_share'][c]:.0%}" for c in
                                                       ("encoder", "global_tokenizer", "quantizer", "entropy", "filter",
                                                        "decoder")]] for r in tp["sizes"]]), ""]
        out += _figure(figures, "throughput", "throughput")
    else:
        out += [_pending("throughput"), ""]
    return out


def _corr(c: dict[str, Any]) -> str:
    return "—" if c["pearson"] is None else f"{c['pearson']:+.2f} / {c['spearman']:+.2f}"


def _figure(figures: dict[str, str], name: str, alt: str) -> list[str]:
    return [f"![{alt}]({figures[name]})", ""] if name in figures else []


def replace_section(text: str, section: str) -> str:
    """``text`` with the claims section replaced (or appended when absent)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if start is None:
        body = text.rstrip("\n")
        return (body + "\n\n" if body else "") + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before, after = lines[:start], lines[end:]
    joined = "\n".join(before).rstrip("\n")
    result = (joined + "\n\n" if joined else "") + section.rstrip("\n") + "\n"
    if after:
        result += "\n" + "\n".join(after).rstrip("\n") + "\n"
    return result


def write_results(results_md: Path, out_dir: Path) -> Path:
    """Copy the PNGs next to ``results_md`` (img/claims-*.png) and rewrite its claims section."""
    results_md = Path(results_md)
    img_dir = results_md.parent / "img"
    figures = {}
    for name in FIGURES:
        source = out_dir / f"{name}.png"
        if source.is_file():
            img_dir.mkdir(parents=True, exist_ok=True)
            target = img_dir / f"claims-{name.replace('_', '-')}.png"
            shutil.copyfile(source, target)
            figures[name] = f"img/{target.name}"
    text = results_md.read_text() if results_md.is_file() else "# Results\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(replace_section(text, render(out_dir, figures)))
    return results_md
