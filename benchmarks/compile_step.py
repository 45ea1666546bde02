"""Eager vs ``torch.compile`` training step of every registered memory on the reference decoder.

Notation: b batch, n segment length, e model dim.

For each memory (small options, below) and the bare host, a reference decoder streams segments of a
batch and runs one forward + backward + SGD step per segment, once eagerly and once compiled, both
from the same weights and data. Reported, all measured in the same run (timed repeats interleaved,
so that machine noise hits both alike):

* compile time: wall time of the compiled model's first ``--warm`` segments (compiles included)
  minus as many eager steps;
* compiles: frames Dynamo compiled over the whole run (each recompile is one more) and graph breaks
  that ``torch._dynamo.explain`` finds in one segment's forward, the memory full;
* median step time eager and compiled, their ratio, and the largest loss difference between the two.

    python -m benchmarks.compile_step                       # CPU default (inductor: C++ codegen, slow to compile)
    python -m benchmarks.compile_step --device cuda --batch 8 --segment 256 --dim 256 --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import memory_plugins as mp
from benchmarks.bench_utils import sync, write_result
from memory_plugins.models import ReferenceDecoder

VOCAB = 128


def memory_options(name: str, n: int) -> dict[str, Any]:
    """Small options per memory, sized to the segment length ``n`` so that every memory fills in 2 segments."""
    known = {
        "xl": dict(mem_len=2 * n),
        "compressive": dict(mem_len=n, cmem_len=n // 2, compression_rate=2),
        "continuous": dict(n_basis=32, basis_widths=(0.05, 0.1), stm_len=0, zero_init_output=False),
        "knn": dict(store_len=2 * n, top_k=min(32, 2 * n)),
    }
    return known.get(name, {})


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    base = ReferenceDecoder(vocab_size=VOCAB, dim=args.dim, depth=args.depth, heads=args.heads)
    model = base if name == "none" else mp.wrap(base, name, **memory_options(name, args.segment))
    return model.to(device).train()


def step(model: torch.nn.Module, wrapped: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """One segment: forward, loss (+ memory aux), backward, SGD step. ``tokens`` (b, n + 1)."""
    logits = model(tokens[:, :-1])  # (b, n, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    if isinstance(wrapped, mp.MemoryModel):
        loss = loss + wrapped.memory_aux_loss()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(fn: Any, device: torch.device) -> tuple[float, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    eager = build(name, args, device)
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(twin, backend=args.backend)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (eager, twin)]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (args.batch, args.segment + 1), generator=gen).to(device)
            for _ in range(args.warm + args.repeats)]
    eager_warm = compiled_warm = 0.0
    diffs = []
    for tokens in data[: args.warm]:
        te, le = timed(lambda: step(eager, eager, opts[0], tokens), device)
        tc, lc = timed(lambda: step(compiled, twin, opts[1], tokens), device)
        eager_warm, compiled_warm = eager_warm + te, compiled_warm + tc
        diffs.append(abs(le - lc))
    frames_warm = counters["frames"]["ok"]
    times_e, times_c = [], []
    for tokens in data[args.warm:]:
        te, le = timed(lambda: step(eager, eager, opts[0], tokens), device)
        tc, lc = timed(lambda: step(compiled, twin, opts[1], tokens), device)
        times_e.append(te)
        times_c.append(tc)
        diffs.append(abs(le - lc))
    frames = counters["frames"]["ok"]
    probe = copy.deepcopy(twin)  # the memory full: one segment's forward, as it runs from now on
    explain = torch._dynamo.explain(probe)(data[-1][:, :-1])
    e_ms, c_ms = 1e3 * statistics.median(times_e), 1e3 * statistics.median(times_c)
    return {
        "memory": name, "options": memory_options(name, args.segment), "eager_step_ms": e_ms,
        "compiled_step_ms": c_ms, "compiled_over_eager": c_ms / e_ms, "compile_s": compiled_warm - eager_warm,
        "compiled_frames": frames, "recompiles_after_warmup": frames - frames_warm,
        "graph_breaks": int(explain.graph_break_count), "max_loss_diff": max(diffs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, …)")
    parser.add_argument("--memories", default=",".join(["none", *mp.list_memories()]))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--warm", type=int, default=3, help="segments before timing (compiles happen here)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compile_step_<device>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(name, args, device) for name in args.memories.split(",")]
    print(f"{'memory':<12} {'eager ms':>9} {'compiled ms':>12} {'ratio':>6} {'compile s':>10} {'frames':>7} "
          f"{'recompiles':>10} {'breaks':>7} {'max |Δloss|':>11}")
    for r in rows:
        print(f"{r['memory']:<12} {r['eager_step_ms']:>9.1f} {r['compiled_step_ms']:>12.1f} {r['compiled_over_eager']:>6.2f} "
              f"{r['compile_s']:>10.1f} {r['compiled_frames']:>7} {r['recompiles_after_warmup']:>10} "
              f"{r['graph_breaks']:>7} {r['max_loss_diff']:>11.1e}")
    result = {"device": str(device), "torch": torch.__version__, "threads": args.threads,
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    write_result(result, args.out or f"benchmarks/results/compile_step_{device.type}.json")
    return result


if __name__ == "__main__":
    main()
