"""A training step under CUDA graphs (``torch.compile(mode="reduce-overhead")``) against eager and the
default compile, for XL and the continuous memory (issue 10).

Notation: b batch, n segment length, e model dim, h heads, N basis functions.

The library keeps a compiled step CUDA-graph friendly with two operators that inductor runs between
captured parts (``memory_plugins/graph_ops.py``): the committed state is copied out of the graphs'
memory pool, and the continuous update chooses its fit in one operator instead of a ``torch.cond``.
Variants, each a fresh copy of one eager model, trained side by side on the same segments:

* ``eager``; ``default`` (inductor); ``reduce-overhead`` (inductor + CUDA graphs): the library as it is;
* ``reduce-overhead, one layout`` (continuous only, with ``--one-layout``): the fit operator replaced
  by the one layout's matrices inside the graph (right for unpadded data only, as here): what the
  operator's host sync and graph split cost. One more compile, so not by default.

For each: the median step time (rounds interleaved), its ratio to eager, the largest loss difference
from eager, and how often inductor skipped CUDA graphs (its ``cudagraph_skips`` counter; the reasons
appear in the log as inductor prints them). A variant that fails is reported and the others go on.

    python -m benchmarks.cuda_graphs_probe --device cuda --batch 8 --segment 1024 --dim 300 --heads 6 --basis 512
    python -m benchmarks.cuda_graphs_probe --batch 2 --segment 32 --dim 48 --basis 32 --repeats 3 --one-layout  # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch._dynamo.utils import counters

from benchmarks.bench_utils import parse_shape_args, sync, write_result
from benchmarks.continuous_step import add_step_args, build, segments, step
from memory_plugins.continuous.backend import ContinuousMemory

MODES = {"eager": None, "default": "default", "reduce-overhead": "reduce-overhead",
         "reduce-overhead, one layout": "reduce-overhead"}


@contextlib.contextmanager
def one_layout(active: bool) -> Iterator[None]:
    """The continuous update's compiled fit as the one layout's matrices, in the graph, while active."""
    saved = ContinuousMemory.compiled_fit
    if active:
        def compiled_fit(self: ContinuousMemory, valid: torch.Tensor, has: torch.Tensor, m: int, p: int,
                         dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            g_new, first, other = self.cache.layout(m, p, dev, dt, not self.config.sticky)  # (N, P), (N, P), (N, ·)
            b = has.shape[0]
            return torch.where(has[:, None, None], g_new, first), other.expand(b, -1, -1)  # (b, N, P), (b, ·, N)

        ContinuousMemory.compiled_fit = compiled_fit
    try:
        yield
    finally:
        ContinuousMemory.compiled_fit = saved


def run_memory(memory: str, args: argparse.Namespace, device: torch.device,
               data: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Every variant of ``memory``: compiled and warmed up over the data, then timed in interleaved rounds."""
    torch._dynamo.reset()
    base = build(memory, args, device).train()
    variants = [v for v in MODES if "one layout" not in v or (memory == "continuous" and args.one_layout)]
    models, calls, losses, rows = {}, {}, {}, {}
    for name in variants:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if MODES[name] is not None:
            model = torch.compile(model, mode=MODES[name])
        models[name] = (model, opt)
        rows[name] = {"memory": memory, "variant": name, "times": [], "diffs": []}

    def call(name: str, tokens: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with one_layout("one layout" in name):  # no cudagraph_mark_step_begin(): the plain training loop
                losses[name] = step(*models[name], tokens, None)
        return run

    order, rng = list(variants), random.Random(0)
    for r in range(len(data) + args.repeats):  # the first pass over the data compiles and warms up
        tokens = data[r % len(data)]
        rng.shuffle(order)
        for name in ["eager"] + [v for v in order if v != "eager"]:  # eager first: the others compare with it
            if rows[name].get("error"):
                continue
            counters["inductor"].clear()
            try:
                sync(device)
                t0 = time.perf_counter()
                call(name, tokens)()
                sync(device)
            except Exception as err:  # noqa: BLE001 (a probe: report the failure and go on)
                rows[name]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                continue
            rows[name]["cudagraph_skips"] = rows[name].get("cudagraph_skips", 0) + counters["inductor"]["cudagraph_skips"]
            if r >= len(data):
                rows[name]["times"].append(time.perf_counter() - t0)
            rows[name]["diffs"].append((losses[name] - losses["eager"]).abs().item())
    eager_ms = 1e3 * statistics.median(rows["eager"]["times"])
    out = []
    for name, row in rows.items():
        times, diffs = row.pop("times"), row.pop("diffs")
        if "error" not in row and times:
            row.update(ok=True, step_ms=1e3 * statistics.median(times), max_loss_diff=max(diffs))
            row["ratio_to_eager"] = row["step_ms"] / eager_ms
        else:
            row["ok"] = False
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, repeats=10, batch=8, segment=1024, dim=300, heads=6, basis=512)
    p.add_argument("--memories", nargs="*", default=["xl", "continuous"],
                   help="none, xl, continuous, continuous-triton (read_impl='triton')")
    p.add_argument("--one-layout", action="store_true", help="also the continuous fit as the one layout, in the graph")
    p.add_argument("--out", default="benchmarks/results/cuda_graphs_probe.json")
    args, device = parse_shape_args(p, argv)
    data = segments(args, device, 3)
    print(f"{'memory':<18}{'variant':<30}{'step ms':>9}{'÷ eager':>9}{'skips':>7}  |Δloss| / error", flush=True)
    result: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "rows": []}
    for memory in args.memories:  # each memory's rows printed and saved when done: a time limit keeps the finished ones
        for r in run_memory(memory, args, device, data):
            if r["ok"]:
                print(f"{r['memory']:<18}{r['variant']:<30}{r['step_ms']:>9.1f}{r['ratio_to_eager']:>9.2f}"
                      f"{r.get('cudagraph_skips', 0):>7}  {r['max_loss_diff']:.1e}", flush=True)
            else:
                print(f"{r['memory']:<18}{r['variant']:<30}{'':>25}  {r.get('error', 'no timed step')}", flush=True)
            result["rows"].append(r)
        xl = {r["variant"]: r for r in result["rows"] if r["memory"] == "xl" and r["ok"]}
        for r in result["rows"]:
            if r["memory"].startswith("continuous") and r["ok"] and r["variant"].split(",")[0] in xl:
                r["ratio_to_xl"] = r["step_ms"] / xl[r["variant"].split(",")[0]]["step_ms"]
        write_result(result, args.out)
    for r in result["rows"]:
        if "ratio_to_xl" in r:
            print(f"{r['memory']} ÷ xl, {r['variant']}: {r['ratio_to_xl']:.2f}")
    return result


if __name__ == "__main__":
    main()
