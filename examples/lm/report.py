"""Tables and plots of the LM benchmark from its per-run JSON files (``examples.lm.benchmark``).

    write_report(out, preset_name, preset)   # reads out/<memory>/result.json of every finished run

Writes ``results.json`` (all runs + paired differences to xl), ``table.md``, ``perplexity_by_position.png``,
``ltm_attention.png`` (continuous runs) and ``sticky_samples.png`` (sticky runs). Runs of one preset
may come from several processes (``--memories`` subsets into the same ``--out``): the report takes
every finished run it finds.

Notation: D documents, K position buckets, h heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from . import metrics

ORDER = ("none", "xl", "compressive", "continuous", "continuous_sticky", "knn")
VARIANT_LABEL = {"as_trained": "", "ltm_off": " (LTM off at test)"}


def load_runs(out: Path) -> list[dict]:
    runs = []
    for memory in ORDER:
        path = out / memory / "result.json"
        if path.is_file():
            runs.append(json.loads(path.read_text()))
    return runs


def _sums(run: dict, variant: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    per_doc = run["test"][variant]["per_doc"]
    ids = sorted(per_doc)
    sums = torch.tensor([per_doc[i]["nll_sum"] for i in ids], dtype=torch.float64)  # (D, K)
    counts = torch.tensor([per_doc[i]["tokens"] for i in ids], dtype=torch.int64)  # (D, K)
    return ids, sums, counts


def paired_vs(runs: list[dict], reference: str = "xl") -> dict[str, dict]:
    """{"<memory>/<variant>": paired difference of perplexity to ``reference`` (per bucket and "all")}
    for every run tested on exactly the same tokens as the reference run."""
    ref = next((r for r in runs if r["memory"] == reference), None)
    if ref is None:
        return {}
    ref_ids, ref_sums, ref_counts = _sums(ref, "as_trained")
    out = {}
    for r in runs:
        for variant in r["test"]:
            if r["memory"] == reference and variant == "as_trained":
                continue
            ids, sums, counts = _sums(r, variant)
            if ids != ref_ids or not torch.equal(counts, ref_counts):
                continue  # other test tokens (other preset settings): no paired comparison
            out[f"{r['memory']}/{variant}"] = metrics.paired_difference(
                sums, ref_sums, counts, resamples=r["settings"]["bootstrap"], seed=r["seed"])
    return out


def _cell(s: dict) -> str:
    if s.get("ppl") is None:
        return "—"
    ci = s.get("ci95")
    return f"{s['ppl']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{s['ppl']:.1f}"


def _diff_cell(d: dict) -> str:
    if d.get("diff") is None:
        return "—"
    ci = d.get("ci95")
    return f"{d['diff']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{d['diff']:+.2f}"


def table(runs: list[dict], paired: dict[str, dict], preset_name: str, reference: str = "xl") -> str:
    cols = [metrics.ALL, *metrics.BUCKETS]
    first = runs[0]
    data, s = first["data"], first["settings"]
    counts = first["test"]["as_trained"]["summary"]
    host = first.get("host", "reference decoder")
    lines = [
        f"Preset `{preset_name}`: {host} e = {s['dim']}, {s['depth']} layers, {s['heads']} heads; "
        f"segment n = {s['seg_len']}, batch {s['batch']}, {s['steps']} steps; tokenizer {data['tokenizer']} "
        f"(V = {data['vocab_size']}).",
        f"Test: {data['test_documents']} documents, {data['test_tokens']:,} tokens"
        + (f" (the longest {s['eval_docs']}" if s["eval_docs"] else " (all")
        + (f", each cut at {s['eval_max_tokens']:,} tokens)." if s["eval_max_tokens"] else ").")
        + " Tokens per bucket: " + ", ".join(f"{c} {counts[c]['tokens']:,}" for c in metrics.BUCKETS) + ".",
        "",
        "Test perplexity by position of the token in its document [95% bootstrap interval over documents]:",
        "",
        "| memory | kept per layer and lane | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in runs:
        for variant, res in r["test"].items():
            summ = res["summary"]
            lines.append(f"| {r['memory']}{VARIANT_LABEL.get(variant, ' ' + variant)} | {r['budget']} | "
                         + " | ".join(_cell(summ[c]) for c in cols) + " |")
    if paired:
        lines += ["", f"Paired difference to {reference}, perplexity (memory − {reference}) on the same tokens [95% "
                  f"bootstrap interval over documents]; negative = better than {reference}:", "",
                  "| memory | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for key, d in paired.items():
            memory, variant = key.split("/")
            lines.append(f"| {memory}{VARIANT_LABEL.get(variant, ' ' + variant)} | "
                         + " | ".join(_diff_cell(d[c]) for c in cols) + " |")
    lines += ["", "| memory | parameters | s / step | training | test | valid ppl (curve) |", "|---|---|---|---|---|---|"]
    for r in runs:
        sps = r.get("seconds_per_step")
        curve = ", ".join(f"{c['valid_ppl']:.1f}@{c['step']}" for c in r["curve"])
        lines.append(f"| {r['memory']} | {r['parameters']:,} | {sps:.3f} | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['eval_seconds']:.0f} s | {curve} |" if sps else
                     f"| {r['memory']} | {r['parameters']:,} | — | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['eval_seconds']:.0f} s | {curve} |")
    diag = [(r["memory"], r["diagnostics"]) for r in runs if r.get("diagnostics")]
    if diag:
        lines += ["", "Where the ∞-former's reads attend over its LTM (share of the Gaussian mass in 5 bins of [0, 1], "
                  "old → new; and the mass outside [0, 1]):", ""]
        for memory, d in diag:
            for layer, x in d["layers"].items():
                if x["mass"] is None:
                    continue
                k = len(x["mass"]) // 5
                fifths = [sum(x["mass"][i * k : (i + 1) * k]) for i in range(5)]
                lines.append(f"* {memory}, layer {layer}: " + " ".join(f"{100 * v:.0f}%" for v in fifths)
                             + f"; outside {100 * x['outside_fraction']:.0f}%")
    return "\n".join(lines) + "\n"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return None
    return plt


def plot_buckets(runs: list[dict], paired: dict[str, dict], path: Path, reference: str = "xl") -> None:
    """Left: perplexity by position bucket per memory (95% intervals over documents). Right: the paired
    difference to ``reference`` on the same tokens, whose interval is much narrower (documents vary a lot)."""
    plt = _plt()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(12 if paired else 7, 4), squeeze=False)
    xs = list(range(len(metrics.BUCKETS)))
    labels = [f"{b} tokens" for b in metrics.BUCKETS]
    colour = {r["memory"]: f"C{k}" for k, r in enumerate(runs)}

    def draw(ax, k, label, points, variant):  # points: [(x, value, [lo, hi])]
        if not points:
            return
        x = [p[0] + 0.04 * (k - len(runs) / 2) for p in points]
        y = [p[1] for p in points]
        err = [[p[1] - p[2][0] for p in points], [p[2][1] - p[1] for p in points]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linestyle="--" if variant == "ltm_off" else "-",
                    color=colour[label.split(" ")[0]], alpha=0.6 if variant == "ltm_off" else 1.0, label=label)

    ax = axes[0][0]
    for k, r in enumerate(runs):
        for variant, res in r["test"].items():
            summ = res["summary"]
            pts = [(x, summ[b]["ppl"], summ[b]["ci95"]) for x, b in zip(xs, metrics.BUCKETS) if summ[b]["ppl"] is not None]
            draw(ax, k, r["memory"] + VARIANT_LABEL.get(variant, ""), pts, variant)
    ax.set_xticks(xs, labels)
    ax.set_xlabel("position of the token in its document")
    ax.set_ylabel("test perplexity (95% interval)")
    ax.legend(fontsize=7)
    if paired:
        ax = axes[0][1]
        ax.axhline(0.0, color=colour.get(reference, "gray"), lw=1, label=reference)
        for k, (key, d) in enumerate(paired.items()):
            memory, variant = key.split("/")
            pts = [(x, d[b]["diff"], d[b]["ci95"]) for x, b in zip(xs, metrics.BUCKETS) if d[b]["diff"] is not None]
            draw(ax, k, memory + VARIANT_LABEL.get(variant, ""), pts, variant)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("position of the token in its document")
        ax.set_ylabel(f"perplexity − {reference}'s, same tokens (95% interval)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _normal_pdf(t: torch.Tensor, mu: float, s2: float) -> torch.Tensor:
    return torch.exp(-0.5 * (t - mu) ** 2 / s2) / math.sqrt(2 * math.pi * s2)


def plot_attention(runs: list[dict], path: Path) -> None:
    """Fig. 4: the LTM attention histogram of the first, middle and last layers, with the densities of
    three single queries (head 0); dashed lines at τ^k, the limits of the k-th oldest update."""
    plt = _plt()
    diag = [(r["memory"], r["diagnostics"]) for r in runs if r.get("diagnostics")]
    if plt is None or not diag:
        return
    cols = max(len(d["layers"]) for _, d in diag)
    fig, axes = plt.subplots(len(diag), cols, figsize=(4 * cols, 3 * len(diag)), squeeze=False)
    t = torch.linspace(0, 1, 401, dtype=torch.float64)  # (401,)
    for row, (memory, d) in enumerate(diag):
        tau = d["tau"]
        for col, (layer, x) in enumerate(d["layers"].items()):
            ax = axes[row][col]
            if x["mass"] is not None:
                k = len(x["mass"])
                ax.bar([(i + 0.5) / k for i in range(k)], [m * k for m in x["mass"]], width=1 / k, alpha=0.4,
                       color="C0", label="all queries")
            ex = x.get("example")
            if ex:
                twin = ax.twinx()
                for j, q in enumerate(ex["query"]):
                    mu, s2 = ex["mu"][0][j], ex["sigma2"][0][j]
                    twin.plot(t, _normal_pdf(t, mu, s2), color=f"C{j + 1}", lw=1, label=f"query {q}, head 0")
                twin.set_yticks([])
                if row == 0 and col == 0:
                    twin.legend(fontsize=6, loc="upper left")
            for p in range(1, 6):
                ax.axvline(tau**p, color="gray", linestyle="--", lw=0.7)
            ax.set_xlim(0, 1)
            ax.set_title(f"{memory}, layer {layer}", fontsize=9)
            ax.set_xlabel("LTM position (0 = oldest, 1 = newest)", fontsize=8)
        axes[row][0].set_ylabel("attention density")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sticky(runs: list[dict], path: Path) -> None:
    """Where the sticky update sampled the old signal (a flat line = linear spacing)."""
    plt = _plt()
    diag = [(r["memory"], r["diagnostics"]) for r in runs if r.get("diagnostics")]
    diag = [(m, d) for m, d in diag if any("sticky_samples" in x for x in d["layers"].values())]
    if plt is None or not diag:
        return
    fig, axes = plt.subplots(1, len(diag), figsize=(5 * len(diag), 3), squeeze=False)
    for ax, (memory, d) in zip(axes[0], diag):
        for layer, x in d["layers"].items():
            if "sticky_samples" in x:
                k = len(x["sticky_samples"])
                ax.step([i / k for i in range(k + 1)], [v * k for v in x["sticky_samples"]] + [x["sticky_samples"][-1] * k],
                        where="post", label=f"layer {layer}")
        ax.axhline(1.0, color="gray", linestyle=":", label="linear spacing")
        ax.set_xlabel("position in the old signal (0 = oldest)")
        ax.set_ylabel("density of sampled locations")
        ax.set_title(memory, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, preset_name: str, preset: Any, reference: str = "xl") -> str:
    """Rebuild every summary output from the runs found under ``out``; returns the table's markdown.
    Paired differences are to the ``reference`` run (xl from scratch; the memoryless model when fine-tuning)."""
    runs = load_runs(out)
    if not runs:
        raise ValueError(f"--out: no finished run (<memory>/result.json) under {str(out)!r}")
    paired = paired_vs(runs, reference)
    md = table(runs, paired, preset_name, reference)
    (out / "table.md").write_text(md)
    slim = [{k: v for k, v in r.items() if k != "test"} | {"test": {v: x["summary"] for v, x in r["test"].items()}}
            for r in runs]
    (out / "results.json").write_text(json.dumps({"preset": preset_name, "runs": slim, f"paired_vs_{reference}": paired}, indent=1))
    plot_buckets(runs, paired, out / "perplexity_by_position.png", reference)
    plot_attention(runs, out / "ltm_attention.png")
    plot_sticky(runs, out / "sticky_samples.png")
    return md
