"""What padding costs the continuous memory: the fit matrices of each count of valid vectors.

Notation: b batch, n segment length, e model dim, h heads, N basis functions, k valid vectors.

A sample with k of its n pending vectors valid (a document's last segment) is fitted with the G (and,
with linear spacing, T) of its own layout, solved once and kept in the model's ``BasisCache`` (bounded
by ``fit_cache_mib``). This streams segments through a 1-layer reference decoder (eval, no grad):
after two full segments, each round is one segment where sample 0 has a new count k (the update
solves its layout), then a full segment (the steady state); then every count once more (solved
again only if the bound evicted it). It reports the median time of each kind of segment, the solve
time per new count (padded − steady), and the cache's size and matrices per count.

    python -m benchmarks.continuous_fit_cache --threads 1
    python -m benchmarks.continuous_fit_cache --threads 1 --fit-cache-mib 16     # a bound that evicts
    python -m benchmarks.continuous_fit_cache --threads 1 --compile aot_eager    # the compiled update

Runs on the library of any commit (``--fit-cache-mib`` needs one with the option): for a before/after,
``git worktree add /tmp/base <commit>`` and run it from inside that checkout
(``cd /tmp/base && PYTHONPATH=/tmp/base python -m benchmarks.continuous_fit_cache``): ``python -m`` puts
the current directory first on the path, so run from here it would import this tree's library.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import memory_plugins as mp
from benchmarks.bench_utils import add_shape_args, parse_shape_args, sync, write_result
from memory_plugins.models.reference import ReferenceDecoder


def cache_size(model: mp.MemoryModel) -> tuple[int, float]:
    """(matrices, MiB) held by the model's basis caches."""
    caches = [m for m in model.memory.shared.values() if hasattr(m, "matrices")]
    tensors = [t for c in caches for t in c.matrices.values()]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, batch=2, segment=1024, dim=32, heads=4, basis=512)
    p.add_argument("--counts", type=int, default=11, help="distinct padded counts k in the stream")
    p.add_argument("--fit-cache-mib", type=float, help="the cache's bound (default: the library's)")
    p.add_argument("--compile", help="torch.compile backend for the model (aot_eager, inductor); default eager")
    p.add_argument("--out", default="benchmarks/results/continuous_fit_cache.json")
    args, device = parse_shape_args(p, argv)
    torch.manual_seed(0)
    options = {} if args.fit_cache_mib is None else {"fit_cache_mib": args.fit_cache_mib}
    base = ReferenceDecoder(vocab_size=64, dim=args.dim, depth=1, heads=args.heads)
    model = mp.wrap(base, "continuous", n_basis=args.basis, **options).to(device).eval()
    run = torch.compile(model, backend=args.compile) if args.compile else model
    n, gen = args.segment, torch.Generator().manual_seed(0)
    counts = [n - 1 - (i * (n - 1)) // args.counts for i in range(args.counts)]  # distinct k in [1, n − 1]

    def segment(k: int) -> float:
        """Milliseconds of one forward where sample 0 has k valid tokens (left padding)."""
        tokens = torch.randint(0, 64, (args.batch, n), generator=gen).to(device)  # (b, n)
        mask = torch.ones(args.batch, n, dtype=torch.bool)  # (b, n)
        mask[0, : n - k] = False
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            run(tokens, mask=mask.to(device))
        sync(device)
        return 1e3 * (time.perf_counter() - t0)

    # the segment after a padded one takes in k vectors: the count's layout is solved in the *next* update
    for _ in range(2):
        segment(n)
    held0 = cache_size(model)
    first, steady, again = [], [], []
    for k in counts:
        segment(k)  # writes k pending vectors
        first.append(segment(n))  # its update solves the k layout
        steady.append(segment(n))  # a full segment: the steady layout
    held = cache_size(model)
    for k in counts:
        segment(k)
        again.append(segment(n))  # the k layout once more: cached, or solved again if evicted
    row = {"steady_ms": statistics.median(steady), "new_count_ms": statistics.median(first),
           "recurring_count_ms": statistics.median(again), "matrices": held[0], "cache_mib": held[1],
           "mib_per_count": (held[1] - held0[1]) / len(counts), "matrices_per_count": (held[0] - held0[0]) / len(counts),
           "final_cache_mib": cache_size(model)[1]}
    row["solve_ms_per_count"] = row["new_count_ms"] - row["steady_ms"]
    print(f"continuous N {args.basis}, n {n}, b {args.batch}, e {args.dim}, {len(counts)} padded counts, "
          f"{device}, threads {torch.get_num_threads()}, fit_cache_mib {args.fit_cache_mib or 'default'}, "
          f"compile {args.compile or 'no'}")
    print(f"{'steady ms':>10}{'new k ms':>10}{'solve ms':>10}{'again ms':>10}{'MiB/k':>8}{'mats/k':>8}{'cache MiB':>11}")
    print(f"{row['steady_ms']:>10.1f}{row['new_count_ms']:>10.1f}{row['solve_ms_per_count']:>10.1f}"
          f"{row['recurring_count_ms']:>10.1f}{row['mib_per_count']:>8.2f}{row['matrices_per_count']:>8.1f}"
          f"{row['final_cache_mib']:>11.1f}")
    return write_result({"args": vars(args), "torch": torch.__version__, "row": row}, args.out)


if __name__ == "__main__":
    main()
