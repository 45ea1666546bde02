"""Streaming-vision benchmark: a timm ViT reads T frames one forward at a time; the label was in frame 0.

    python -m examples.vision.benchmark --preset quick     # 4 runs, a few minutes on 2 CPU cores
    python -m examples.vision.benchmark --preset cpu       # longer sequences, more steps and seeds

Notation: b batch, T frames, n tokens per frame (16 patches + class token), K cue classes.

Task (``task.py``): a cue square in one of K quadrants in frame 0, distractor bars, a fixed query frame
at the end; the label is the cue's quadrant. Each run trains a small timm ``VisionTransformer`` from
scratch (one channel, 4×4 patches) with one memory, streaming the frames of a sequence as segments
(memory reset per sequence, loss on the query frame's logits plus the memory's aux loss), and reports
test accuracy with a 95% Wilson interval over the test sequences (pooled over seeds), beside the
oracle that sees only the last segment (= chance, 1/K: the label is independent of the query frame).
Memory sizes are chosen so that XL's window (two frames) cannot reach the cue and the compressive /
continuous memories can. Outputs in ``--out`` (default ``runs/vision/<preset>``): one JSON per run,
``results.json``, ``table.md`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memory_plugins as mp

from .task import K, make_sequences, wilson


@dataclass
class Preset:
    frames: int = 5  # T: cue, T-2 distractors, query
    side: int = 16  # image side in pixels
    patch: int = 4  # patch side: (side / patch)² patches per frame
    dim: int = 64
    depth: int = 2
    heads: int = 4
    batch: int = 32
    steps: int = 300
    lr: float = 1e-3
    n_test: int = 1000
    seeds: tuple[int, ...] = (0,)
    memories: tuple[str, ...] = ("none", "xl", "compressive", "continuous")


PRESETS = {
    "quick": Preset(),
    "cpu": Preset(frames=8, steps=1000, seeds=(0, 1, 2)),
}


def tokens_per_frame(p: Preset) -> int:
    return (p.side // p.patch) ** 2 + 1  # n: patches + class token


def memory_options(name: str, p: Preset) -> dict[str, Any]:
    """Per-memory options: XL sees the last two frames; compressive and continuous reach the whole sequence."""
    n = tokens_per_frame(p)
    return {
        "xl": {"mem_len": 2 * n},
        "compressive": {"mem_len": n, "cmem_len": n * max(1, (p.frames + 2) // 4), "compression_rate": 4},
        "continuous": {"n_basis": 64, "basis_widths": (0.02, 0.05), "stm_len": 0},
    }.get(name, {})


def build(name: str, p: Preset, seed: int) -> nn.Module:
    """A fresh ViT (seeded), wrapped with memory ``name`` unless it is ``"none"``."""
    with warnings.catch_warnings():  # torchvision's optional image extension may be missing; unused here
        warnings.simplefilter("ignore", UserWarning)
        from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=p.side, patch_size=p.patch, in_chans=1, num_classes=K, embed_dim=p.dim,
                            depth=p.depth, num_heads=p.heads, mlp_ratio=2.0)
    return vit if name == "none" else mp.wrap(vit, name, **memory_options(name, p))


def stream(model: nn.Module, frames: Tensor) -> Tensor:
    """Logits (b, K) of the last frame after streaming ``frames`` (T, b, 1, S, S) one frame per forward."""
    if not isinstance(model, mp.MemoryModel):
        return model(frames[-1])  # without memory only the last frame can matter
    model.reset_memory()
    for frame in frames[:-1]:
        model(frame)
    return model(frames[-1])  # (b, K)


def aux_loss(model: nn.Module) -> Tensor | float:
    return model.memory_aux_loss() if isinstance(model, mp.MemoryModel) else 0.0


def evaluate(model: nn.Module, p: Preset, seed: int) -> int:
    """Correct answers on ``n_test`` sequences drawn from ``seed`` (no gradients, memory reset per chunk)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, p.n_test, 250):
            x, y = make_sequences(min(250, p.n_test - start), p.frames, p.side, seed=seed + start)
            correct += int((stream(model, x).argmax(-1) == y).sum())
    model.train()
    return correct


def run(name: str, p: Preset, seed: int, out: Path) -> dict[str, Any]:
    """Train one (memory, seed) and test it; read back from its JSON if it was run before."""
    path = out / f"{name}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    model = build(name, p, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.steps, pct_start=0.1)
    start, losses = time.time(), []
    for step in range(p.steps):
        x, y = make_sequences(p.batch, p.frames, p.side, seed=1_000_000 * (seed + 1) + step)
        loss = F.cross_entropy(stream(model, x), y) + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"  {name} seed {seed} step {step + 1}/{p.steps} loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    seconds = time.time() - start
    correct = evaluate(model, p, seed=7_000_000)
    result = {"memory": name, "seed": seed, "correct": correct, "n_test": p.n_test, "train_seconds": seconds,
              "options": memory_options(name, p), "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}
    path.write_text(json.dumps(result, indent=2))
    return result


def summarise(p: Preset, results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Accuracy and 95% Wilson interval per memory, pooled over seeds; the last-segment oracle = chance."""
    rows = {}
    for name in p.memories:
        mine = [r for r in results if r["memory"] == name]
        correct, n = sum(r["correct"] for r in mine), sum(r["n_test"] for r in mine)
        lo, hi = wilson(correct, n)
        rows[name] = {"accuracy": correct / n, "low": lo, "high": hi, "n": n,
                      "train_seconds": sum(r["train_seconds"] for r in mine) / len(mine)}
    return rows


def table(p: Preset, rows: dict[str, dict[str, float]]) -> str:
    n = tokens_per_frame(p)
    lines = [f"T = {p.frames} frames of {p.side}×{p.side} px ({n} tokens each), {p.steps} steps × {p.batch} "
             f"sequences, seeds {list(p.seeds)}, {p.n_test} test sequences per seed", "",
             "| memory | options | test accuracy % [95% interval] | train s / run |", "| --- | --- | --- | --- |"]
    for name, r in rows.items():
        opts = ", ".join(f"{k}={v}" for k, v in memory_options(name, p).items()) or "(last frame only)"
        lines.append(f"| {name} | {opts} | {100 * r['accuracy']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}] "
                     f"| {r['train_seconds']:.0f} |")
    lines.append(f"| oracle: last segment only | exact (label independent of it) | {100 / K:.1f} (= chance) | – |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    acc = [100 * rows[k]["accuracy"] for k in names]
    err = [[100 * (rows[k]["accuracy"] - rows[k]["low"]) for k in names],
           [100 * (rows[k]["high"] - rows[k]["accuracy"]) for k in names]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, acc, yerr=err, capsize=4, color="#4c72b0")
    ax.axhline(100 / K, color="gray", ls="--", label="chance = last-segment oracle")
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy % (95% interval)")
    ax.set_title("cue in frame 0, answer at the last frame")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="quick")
    ap.add_argument("--memories", nargs="*", default=None, help="subset of none / xl / compressive / continuous")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    if args.memories:
        unknown = sorted(set(args.memories) - {"none", *mp.list_memories()})
        if unknown:
            raise SystemExit(f"--memories: unknown {unknown}; allowed: none, {', '.join(mp.list_memories())}")
        p = Preset(**{**asdict(p), "memories": tuple(args.memories)})
    out = args.out or Path("runs/vision") / args.preset
    out.mkdir(parents=True, exist_ok=True)
    results = [run(name, p, seed, out) for name in p.memories for seed in p.seeds]
    rows = summarise(p, results)
    md = table(p, rows)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"preset": asdict(p), "rows": rows, "runs": results}, indent=2))
    plot(rows, out / "accuracy.png")
    print(md)
    print(f"wrote {out}/table.md, results.json, accuracy.png")


if __name__ == "__main__":
    main()
