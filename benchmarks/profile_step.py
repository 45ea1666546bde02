"""Where a sorting training step spends its time: torch.profiler's top operators for each memory.

Complements ``device_check.py`` (how long a step takes) with why: one profiled step (after warm-up
steps) per memory at a preset's sizes, the operators sorted by self device time (CUDA) or self CPU
time, and the step's totals. Prints the tables and writes them to ``--out`` as text.

    python -m benchmarks.profile_step --device cuda --length 8000 --memories xl continuous continuous_sticky
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from examples.sorting.benchmark import ALL_MEMORIES, PRESETS, build, run_segments
from examples.sorting.task import generate

from benchmarks.bench_utils import sync, write_result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--length", type=int, default=8000)
    p.add_argument("--memories", nargs="*", default=["xl", "continuous", "continuous_sticky"], choices=ALL_MEMORIES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", default="runs/profile_step.txt")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    data = generate(preset.batch, args.length, seed=0).to(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    report = []
    for memory in args.memories:
        torch.manual_seed(0)
        model = build(preset, memory, args.length).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> None:
            run_segments(model, memory, data, preset.segment, train=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        sync(device)
        with profile(activities=activities) as prof:
            step()
            sync(device)
        avg = prof.key_averages()
        head = (f"== {memory}, T={args.length}, preset {args.preset!r} on {device}: {sum(e.count for e in avg)} "
                f"operator and kernel calls (totals under the table)")
        try:
            table = avg.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows)
        except (KeyError, AttributeError):  # torch before the cuda → device renaming
            table = avg.table(sort_by="self_cuda_time_total", row_limit=args.rows)
        print(head, table, sep="\n", flush=True)
        report += [head, table]
        del model, opt
    write_result("\n".join(report), args.out)


if __name__ == "__main__":
    main()
