"""Sorting benchmark (∞-former paper §4.1): every memory on one backbone, beside two oracles.

    python -m examples.sorting.benchmark --preset quick            # a few minutes on 2 CPU cores
    python -m examples.sorting.benchmark --preset cpu              # the whole grid, about an hour
    python -m examples.sorting.benchmark --preset paper --device cuda
    torchrun --nproc_per_node 2 -m examples.sorting.benchmark --preset quick --threads 1   # 2 processes (DDP)

Each (memory, length) run trains the reference decoder (rotary positions) segment by segment and
reports teacher-forced token accuracy over the 20 target ranks and exact match of the whole ranking,
with 95% intervals over the test set. Earlier segments only build the memory (no gradients, as the
authors trained); the last segment — end-aligned so that it is full and holds the separator and the
targets — is trained. Runs are resumable: finished runs are read back from their JSON, unfinished ones
continue from their last checkpoint. Outputs go to ``--out`` (default ``runs/sorting/<preset>``):
one JSON per run, ``table.md``, ``results.json``, ``accuracy.png`` and ``curves.png`` (learning curves).

Under ``torchrun --nproc_per_node K`` (docs/scale.md): K processes in DDP (gloo on the CPU, NCCL on
CUDA), rank r drawing its batches from its shard of the training set (every K-th sequence from r), so a
step sees K × ``batch`` sequences; rank 0 alone evaluates (validation and test, the whole sets), logs and
writes outputs and checkpoints. One process without torchrun runs exactly as before.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import memory_plugins as mp
from memory_plugins import distributed
from memory_plugins.distributed import Launch
from memory_plugins.models import DecoderConfig, ReferenceDecoder

from .task import NUM_SYMBOLS, VOCAB, SortingBatch, generate, oracle_scores, score

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is an optional extra
    tqdm = None


@dataclass
class Preset:
    lengths: tuple[int, ...]
    segment: int  # n: tokens per forward
    memories: tuple[str, ...]
    dim: int = 96
    depth: int = 3
    heads: int = 6
    batch: int = 16
    epochs: float = 1.0
    n_train: int = 2000
    n_valid: int = 200
    n_test: int = 400
    lr: float = 1e-3
    lr_by_length: dict[int, float] = field(default_factory=dict)
    warmup: int = 50
    evals: int = 5  # validation points on the learning curve
    n_basis: int | None = None  # ∞-former basis functions (default: one per segment token)
    lm_loss: bool = False  # train the sequence positions on next-token prediction too (ranking only by default)

    @property
    def steps(self) -> int:
        """Training steps of one run: ``epochs`` passes over ``n_train`` sequences in batches."""
        return max(int(self.epochs * self.n_train / self.batch), 1)


ALL_MEMORIES = ("none", "xl", "compressive", "continuous", "continuous_sticky", "knn")
PRESETS: dict[str, Preset] = {
    # Paper App. C.1: 3 layers, 6 heads, segment 1,024, XL memory 2,048, compressive 1,024 + 1,024,
    # ∞-former STM 1,024 + 1,024 basis functions, 8,000/800/800 sequences, batch 8, 20 epochs.
    "paper": Preset(
        lengths=(4000, 8000, 16000), segment=1024, memories=ALL_MEMORIES, dim=384, batch=8, epochs=20,
        n_train=8000, n_valid=800, n_test=800, lr=2.5e-4, lr_by_length={16000: 2e-4}, warmup=500, evals=20,
    ),
    # Same ratios, scaled to 2 CPU cores: lengths 4, 8, 16 × the segment.
    # 700 steps of batch 16 per run, lr 3e-3 (measured at T = 256: XL 43.0% at 3e-3 vs 42.4% at 1e-3
    # after 800 steps); two processes of one thread each finish the grid in about an hour.
    "cpu": Preset(lengths=(256, 512, 1024), segment=64, memories=ALL_MEMORIES, n_train=4000, epochs=2.8, lr=3e-3),
    # One GPU lease (estimated, not yet measured: no GPU was lent when it was written): lengths 4, 8, 16 ×
    # a segment of 256, width 192, 600 steps of batch 32 per run, five memories.
    "gpu": Preset(lengths=(1024, 2048, 4096), segment=256, memories=ALL_MEMORIES, dim=192, batch=32, n_train=6400,
                  epochs=3.0, n_valid=256, n_test=512, lr=1e-3, warmup=60, evals=4),
    "quick": Preset(lengths=(256,), segment=64, memories=("none", "xl", "continuous"), n_train=3200, epochs=2.0,
                    n_valid=100, n_test=200, lr=3e-3, evals=2),
}


def memory_options(name: str, preset: Preset, length: int) -> tuple[str | None, dict[str, Any]]:
    """Memory of each ablation at the paper's equal budgets (2 × segment vectors per layer)."""
    n = preset.segment
    if name == "none":
        return None, {}
    if name == "xl":
        return "xl", {"mem_len": 2 * n}
    if name == "compressive":
        # paper: rate 2 at 4k, up to 6 at 8k and 12 at 16k: enough for the compressed memory to
        # reach the start of the sequence, capped at 12.
        rate = min(max(math.ceil((length - 2 * n) / n), 1), 12)
        return "compressive", {"mem_len": n, "cmem_len": n, "compression_rate": rate}
    if name in ("continuous", "continuous_sticky"):
        return "continuous", {
            "stm_len": n, "n_basis": preset.n_basis or n, "tau": 0.75, "sticky": name == "continuous_sticky",
            "basis_widths": (0.01, 0.05), "kl_weight": 1e-5, "sigma_0": 0.05,
        }
    if name == "knn":
        # the same 2 × segment tokens per layer, kept as (key, value) per head; k = 32 as in the paper
        return "knn", {"store_len": 2 * n, "top_k": min(32, 2 * n)}
    raise ValueError(f"unknown memory {name!r}; choose from {list(ALL_MEMORIES)}")


def build(preset: Preset, memory: str, length: int) -> torch.nn.Module:
    model = ReferenceDecoder(DecoderConfig(vocab_size=VOCAB, dim=preset.dim, depth=preset.depth, heads=preset.heads))
    kind, options = memory_options(memory, preset, length)
    if kind is None:  # "none": the base model itself, unwrapped
        return model
    return mp.wrap(model, kind, **options)


def run_segments(
    model: mp.MemoryModel, memory: str, data: SortingBatch, n: int, *, train: bool, lm_loss: bool = False
) -> mp.SegmentOutput:
    inputs, targets = data.inputs_and_targets(lm_loss=train and lm_loss)  # (B, T + S) each
    runner = mp.SegmentRunner(model, n)
    if train:
        return runner(inputs, targets, align="end", grad_segments=1, backward=True)
    with torch.no_grad():
        return runner(inputs, targets, align="end")


def evaluate(model: mp.MemoryModel, memory: str, data: SortingBatch, preset: Preset, device: torch.device) -> dict:
    model.eval()
    preds, losses = [], []
    for s in range(0, data.tokens.shape[0], preset.batch):
        part = SortingBatch(data.tokens[s : s + preset.batch], data.counts[s : s + preset.batch]).to(device)
        out = run_segments(model, memory, part, preset.segment, train=False)
        preds.append(out.predictions[:, -NUM_SYMBOLS:].cpu())  # (b, S)
        losses.append(out.token_loss[:, -NUM_SYMBOLS:].mean().item())
    model.train()
    result = score(torch.cat(preds), data.tokens[:, -NUM_SYMBOLS:])
    return {**asdict(result), "loss": sum(losses) / len(losses)}


def train_one(preset_name: str, preset: Preset, memory: str, length: int, seed: int, out: Path, device: torch.device,
              launch: Launch | None = None) -> dict:
    """Train and test one (memory, length); resumable through ``out/<run>/``. With ``launch`` of several
    processes (torchrun), every rank calls it: DDP, each rank drawing from its shard of the training set."""
    launch = launch or Launch(device=device)
    run = out / f"{memory}_T{length}"
    result_file = run / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if launch.is_main:
        run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train_set = generate(preset.n_train, length, seed=10_000 + length)
    valid_set = generate(preset.n_valid, length, seed=20_000 + length)
    test_set = generate(preset.n_test, length, seed=30_000 + length)
    model = build(preset, memory, length).to(device)
    trainer = distributed.memory_view(model, distributed.data_parallel(model, launch))  # model itself for one process
    lr = preset.lr_by_length.get(length, preset.lr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = preset.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / preset.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    start, curve, elapsed = 0, [], 0.0
    ckpt = run / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed"]
        torch.set_rng_state(state["rng"])
    eval_at = {round(steps * (k + 1) / preset.evals) for k in range(preset.evals)}
    bar = tqdm(total=steps, initial=start, desc=f"{memory} T={length}", leave=False) if tqdm and launch.is_main else None
    mine = torch.tensor(distributed.shard(range(preset.n_train), launch))  # this rank's training sequences
    seen: set[int] = set()  # what this rank trained on (reported with several processes)
    t0 = time.perf_counter() - elapsed
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = mine[torch.randint(0, len(mine), (preset.batch,), generator=g)]  # (B,) one process: all of them
        if launch.distributed:
            seen.update(idx.tolist())
        batch = SortingBatch(train_set.tokens[idx], train_set.counts[idx]).to(device)
        opt.zero_grad(set_to_none=True)
        out_train = run_segments(trainer, memory, batch, preset.segment, train=True, lm_loss=preset.lm_loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{out_train.loss.item():.3f}")
        if step + 1 in eval_at and launch.is_main:  # the other ranks wait at the barrier below
            v = evaluate(model, memory, valid_set, preset, device)
            curve.append({"step": step + 1, "train_loss": out_train.loss.item(), **{f"valid_{k}": x for k, x in v.items()}})
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1,
                        "curve": curve, "elapsed": time.perf_counter() - t0, "rng": torch.get_rng_state()}, ckpt)
        if step + 1 in eval_at:
            distributed.barrier(launch)
    if bar:
        bar.close()
    seen_by_rank = distributed.gather(sorted(seen), launch)
    if not launch.is_main:  # rank 0 tests and writes; the others read its result
        distributed.barrier(launch)
        return json.loads(result_file.read_text())
    test = evaluate(model, memory, test_set, preset, device)
    kind, options = memory_options(memory, preset, length)
    result = {
        "preset": preset_name, "memory": memory, "length": length, "seed": seed, "steps": steps, "lr": lr, "lm_loss": preset.lm_loss,
        "memory_kind": kind, "memory_options": options, "test": test, "curve": curve,
        "train_seconds": time.perf_counter() - t0, "data_seeds": [10_000 + length, 20_000 + length, 30_000 + length],
    }
    if launch.distributed:  # K processes: who trained on what (disjoint shards of the training set)
        result["distributed"] = {"world_size": launch.world_size, "backend": str(torch.distributed.get_backend()),
                                 "train_indices_by_rank": seen_by_rank}
    result_file.write_text(json.dumps(result, indent=1))
    torch.save(model.state_dict(), run / "model.pt")  # final weights, for examples/sorting/diagnose.py
    ckpt.unlink(missing_ok=True)
    distributed.barrier(launch)
    return result


def table(preset: Preset, results: list[dict], oracles: dict[int, dict]) -> str:
    lengths = preset.lengths
    head = "| | " + " | ".join(f"T = {t}" for t in lengths) + " |\n|---|" + "---|" * len(lengths) + "\n"
    rows = []
    names = list(next(iter(oracles.values())))
    for i, _ in enumerate(names):
        cells = []
        for t in lengths:
            name, s = list(oracles[t].items())[i]
            cells.append(f"{100 * s['accuracy']:.1f} ± {100 * s['accuracy_ci95']:.1f} (EM {100 * s['exact_match']:.0f})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    for memory in preset.memories:
        cells = []
        for t in lengths:
            r = next((r for r in results if r["memory"] == memory and r["length"] == t), None)
            cells.append("—" if r is None else f"{100 * r['test']['accuracy']:.1f} ± {100 * r['test']['accuracy_ci95']:.1f} "
                         f"(EM {100 * r['test']['exact_match']:.0f})")
        rows.append(f"| {memory} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(preset: Preset, results: list[dict], oracles: dict[int, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for memory in preset.memories:
        pts = sorted((r["length"], r["test"]["accuracy"]) for r in results if r["memory"] == memory)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=memory)
    for i, name in enumerate(next(iter(oracles.values()))):
        ys = [list(oracles[t].values())[i]["accuracy"] for t in preset.lengths]
        ax.plot(preset.lengths, ys, linestyle="--" if i else "-", color="gray" if i else "black", alpha=1 - 0.3 * (i > 1),
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("token accuracy (teacher-forced)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    # learning curves: validation accuracy against training step, one panel per length
    fig, axes = plt.subplots(1, len(preset.lengths), figsize=(4 * len(preset.lengths), 3.2), squeeze=False)
    for ax, t in zip(axes[0], preset.lengths):
        for memory in preset.memories:
            r = next((r for r in results if r["memory"] == memory and r["length"] == t), None)
            if r and r["curve"]:
                ax.plot([c["step"] for c in r["curve"]], [c["valid_accuracy"] for c in r["curve"]], marker=".", label=memory)
        ax.set_title(f"T = {t}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("validation token accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_name("curves.png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--memories", nargs="*", help=f"subset of {list(ALL_MEMORIES)}")
    parser.add_argument("--lengths", nargs="*", type=int)
    parser.add_argument("--epochs", type=float, help="override the preset's epochs (longer or shorter training)")
    parser.add_argument("--lm-loss", action="store_true", help="also train next-token prediction on the sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="torch threads (run two processes of 1 on 2 cores)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.memories:
        preset.memories = tuple(args.memories)
    if args.lengths:
        preset.lengths = tuple(args.lengths)
    if args.epochs:
        preset.epochs = args.epochs
    if args.lm_loss:
        preset.lm_loss = True
    out = args.out or Path("runs/sorting") / args.preset
    launch = distributed.launch(args.device)  # torchrun: the process group; plain python: one process
    try:
        run_all(args, preset, out, launch)
    finally:
        distributed.close(launch)


def run_all(args: argparse.Namespace, preset: Preset, out: Path, launch: Launch) -> None:
    """Every (length, memory) run, then table, JSON and plots; under torchrun every rank runs it, rank 0
    alone prints and writes."""
    if launch.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = launch.device
    if args.threads:
        torch.set_num_threads(args.threads)
    # What each model sees of the sequence when it predicts the ranking: the last (end-aligned)
    # segment holds SEP and 19 ranks, so n − 20 sequence tokens, plus its short-term memory:
    # n for the ∞-former's STM (the "segment + short-term memory" window), 2n for XL.
    n, s = preset.segment, NUM_SYMBOLS
    windows = (2 * n - s, 3 * n - s)
    results = []
    for t in preset.lengths:
        for memory in preset.memories:
            r = train_one(args.preset, preset, memory, t, args.seed, out, device, launch)
            results.append(r)
            if launch.is_main:
                print(f"{memory:>18} T={t:<6} acc {100 * r['test']['accuracy']:.1f} ± {100 * r['test']['accuracy_ci95']:.1f}  "
                      f"EM {100 * r['test']['exact_match']:.1f}  ({r['train_seconds']:.0f} s)", flush=True)
    if not launch.is_main:
        return
    oracles = {t: {k: asdict(v) for k, v in oracle_scores(generate(preset.n_test, t, seed=30_000 + t), windows).items()} for t in preset.lengths}
    md = table(preset, results, oracles)
    print(f"\nSorting, preset {args.preset!r}: token accuracy % (± 95% interval), exact match % in brackets\n")
    print(md)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"preset": asdict(preset), "oracles": oracles, "runs": results}, indent=1))
    plot(preset, results, oracles, out / "accuracy.png")


if __name__ == "__main__":
    main()
