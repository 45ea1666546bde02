"""Which changes would let a training step with a memory run under CUDA graphs (issue 10): a probe.

Notation: b batch, n segment length, e model dim, h heads, N basis functions.

On an H200, ``torch.compile(mode="reduce-overhead")`` skipped CUDA graphs for the continuous memory
(its update picks its fit with ``torch.cond``) and failed for XL (the state a step returns is a graph
output, overwritten by the next replay). This script tries the candidate fixes by patching the
library in this process only, so that one device session can tell which are worth building:

* ``plain``: ``torch.compile(model, mode=...)``, the library as it is;
* ``eager_commit``: the controller's commit runs outside the graph (``torch._dynamo.disable``) and
  copies the committed state out of the graphs' memory pool; ``cudagraph_mark_step_begin()`` starts
  every step;
* ``eager_commit_where`` (continuous only): as ``eager_commit``, and the fit is chosen with
  ``torch.where`` between both branches' matrices instead of ``torch.cond`` (the padded branch's
  float64 solve then runs in every step);
* ``eager_commit_one_layout`` (continuous only): as ``eager_commit``, and the fit is always the one
  layout of unpadded data (what this stream has): the upper bound of the gain.

For each: success or the error, the median step time against eager in the same run, the largest
loss difference from eager. Inductor's "skipping cudagraphs" lines appear in the log as it prints
them.

    python -m benchmarks.cuda_graphs_probe --device cuda --batch 8 --segment 1024 --dim 300 --heads 6 --basis 512
    python -m benchmarks.cuda_graphs_probe --batch 2 --segment 32 --dim 48 --basis 32 --repeats 3   # CPU dry run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from typing import Any, Iterator

import torch

from benchmarks.bench_utils import parse_shape_args, sync, write_result
from benchmarks.continuous_step import add_step_args, build, segments, step
from memory_plugins.continuous.backend import ContinuousMemory
from memory_plugins.controller import MemoryController

VARIANTS = {"xl": ("plain", "eager_commit"),
            "continuous": ("plain", "eager_commit", "eager_commit_where", "eager_commit_one_layout")}


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    """The library patched for ``variant`` while the block runs."""
    saved = MemoryController.commit, ContinuousMemory.compiled_fit
    if variant.startswith("eager_commit"):
        plain_commit = MemoryController.commit

        @torch._dynamo.disable
        def commit(self: MemoryController) -> None:  # the staged state leaves the graph pool as a copy
            self.staged = {i: {k: v.clone() for k, v in s.items()} for i, s in self.staged.items()}
            plain_commit(self)

        MemoryController.commit = commit
    if variant in ("eager_commit_where", "eager_commit_one_layout"):
        def compiled_fit(self: ContinuousMemory, valid: torch.Tensor, count: torch.Tensor, has: torch.Tensor,
                         m: int, p: int, dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            linear, b = not self.config.sticky, count.shape[0]
            g_new, first, other = self.cache.layout(m, p, dev, dt, linear)  # (N, P), (N, P), (N, N) or (M, N)
            one = torch.where(has[:, None, None], g_new, first), other.expand(b, -1, -1)  # (b, N, P), (b, ·, N)
            if variant == "eager_commit_one_layout":
                return one[0], one[1].clone()
            fit_new, fit_other = self.cache.batched_fit(count, has, m, p, linear)  # float64, every step
            ok = valid.all()  # () no host sync: both branches computed, one kept
            return (torch.where(ok, one[0], fit_new.to(dt)),  # (b, N, P)
                    torch.where(ok, one[1], fit_other.to(dt)))  # (b, N, N) or (b, M, N)

        ContinuousMemory.compiled_fit = compiled_fit
    try:
        yield
    finally:
        MemoryController.commit, ContinuousMemory.compiled_fit = saved


def run_variant(memory: str, variant: str, args: argparse.Namespace, device: torch.device,
                data: list[torch.Tensor]) -> dict[str, Any]:
    torch._dynamo.reset()
    eager = build(memory, args, device).train()
    fast = copy.deepcopy(eager)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-4)
    opt_f = torch.optim.AdamW(fast.parameters(), lr=1e-4)
    compiled = torch.compile(fast, mode=args.mode)
    row: dict[str, Any] = {"memory": memory, "variant": variant}
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    diffs = []
    try:
        with patched(variant):
            for r in range(len(data) + args.repeats):
                tokens = data[r % len(data)]
                for name, model, opt in (("eager", eager, opt_e), ("compiled", compiled, opt_f)):
                    if name == "compiled" and variant != "plain":
                        torch.compiler.cudagraph_mark_step_begin()
                    sync(device)
                    t0 = time.perf_counter()
                    loss = step(model, opt, tokens, None)
                    sync(device)
                    if r >= len(data):  # the first pass over the data compiles and warms up
                        times[name].append(time.perf_counter() - t0)
                    if name == "eager":
                        loss_e = loss
                diffs.append((loss - loss_e).abs().item())
        row.update(ok=True, eager_ms=1e3 * statistics.median(times["eager"]),
                   compiled_ms=1e3 * statistics.median(times["compiled"]), max_loss_diff=max(diffs))
        row["ratio"] = row["compiled_ms"] / row["eager_ms"]
    except Exception as err:  # noqa: BLE001 (a probe: report the failure and go on)
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, repeats=10, batch=8, segment=1024, dim=300, heads=6, basis=512)
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--memories", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/cuda_graphs_probe.json")
    args, device = parse_shape_args(p, argv)
    data = segments(args, device, 3)
    print(f"{'memory':<12}{'variant':<26}{'eager ms':>10}{'compiled ms':>13}{'ratio':>7}  |Δloss| / error", flush=True)
    result: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "rows": []}
    for memory in args.memories:
        for variant in VARIANTS[memory]:  # each row printed and saved when done: a time limit keeps the finished ones
            r = run_variant(memory, variant, args, device, data)
            if r["ok"]:
                print(f"{r['memory']:<12}{r['variant']:<26}{r['eager_ms']:>10.1f}{r['compiled_ms']:>13.1f}"
                      f"{r['ratio']:>7.2f}  {r['max_loss_diff']:.1e}", flush=True)
            else:
                print(f"{r['memory']:<12}{r['variant']:<26}{'':>30}  {r['error']}", flush=True)
            result["rows"].append(r)
            write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
