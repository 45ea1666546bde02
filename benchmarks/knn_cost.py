"""Per-segment cost of the kNN memory as its store grows, beside the continuous memory's constant cost.

Notation: b batch, n segment length, S store slots per sample (store_len), k retrieved (top_k), e model dim.

Exact kNN retrieval scores every query against every stored key: O(n·S) per layer and head, so its
per-segment time grows linearly with S, while the ∞-former's continuous memory costs the same at any
context. For each S, a wrapped reference decoder gets a store pre-filled with S random (normalised key,
value) pairs per layer (a segment's cost depends only on how full the store is, so streaming S tokens
first would only repeat work); the continuous memory streams a few segments to have content. Timing
and peak tensor bytes as in :mod:`benchmarks.continuous_scaling` (interleaved rounds, best and median).
The report says between which store sizes kNN becomes dearer than the continuous memory.

    python -m benchmarks.knn_cost                                  # small CPU sizes
    python -m benchmarks.knn_cost --stores 1024 4096 16384 65536 --segment 512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import torch.nn.functional as F

import memory_plugins as mp

from .bench_utils import write_result
from .continuous_scaling import _base, _measure, _mib, _state_bytes, _stats


def _knn_models(args: argparse.Namespace, device: torch.device) -> tuple[list[mp.MemoryModel], list[dict]]:
    """One kNN model per store size, each with a full store of random pairs."""
    base = _base(args, device)
    h, d = args.heads, args.dim // args.heads
    models, states = [], []
    for size in args.stores:
        model = mp.wrap(copy.deepcopy(base), "knn", store_len=size, top_k=min(args.top_k, size)).eval()
        keys = F.normalize(torch.randn(args.batch, size, h, d, device=device), dim=-1).flatten(2)  # (b, S, h·d)
        states.append({name: {"keys": keys, "values": torch.randn_like(keys),  # (b, S, h·d)
                              "valid": torch.ones(args.batch, size, dtype=torch.bool, device=device)}  # (b, S)
                       for name in model.memory.names})
        models.append(model)
    return models, states


def _continuous_model(args: argparse.Namespace, device: torch.device) -> tuple[mp.MemoryModel, dict]:
    """The continuous memory after a few streamed segments (its cost does not depend on how many)."""
    model = mp.wrap(_base(args, device), "continuous", n_basis=args.n_basis, stm_len=0).eval()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, args.vocab, (args.batch, args.segment), device=device))
    return model, model.memory_state()["layers"]


def crossing(rows: list[dict], constant_ms: float) -> str:
    """Where the kNN time (rows ordered by store size) first exceeds ``constant_ms``, linearly interpolated."""
    prev = None
    for row in rows:
        if row["ms_per_segment"] > constant_ms:
            if prev is None:
                return f"kNN is dearer already at S = {row['store']:,}"
            s0, t0, s1, t1 = prev["store"], prev["ms_per_segment"], row["store"], row["ms_per_segment"]
            at = s0 + (constant_ms - t0) * (s1 - s0) / (t1 - t0)
            return f"kNN becomes dearer than the continuous memory at S ≈ {at:,.0f} (between {s0:,} and {s1:,})"
        prev = row
    return f"kNN stays cheaper up to S = {rows[-1]['store']:,}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stores", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384], help="store_len values")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--segment", type=int, default=128, help="n: tokens per segment")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--n-basis", type=int, default=256, help="the continuous memory's N")
    p.add_argument("--repeats", type=int, default=5, help="timed segments per configuration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/knn_cost.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models, states = _knn_models(args, device)
    cont, cont_state = _continuous_model(args, device)
    measured = _measure([*models, cont], [*states, cont_state], args, device)
    rows = [{"memory": "knn", "store": size, **_stats(ms), "peak_bytes": peak, "state_bytes": _state_bytes(state)}
            for size, (ms, peak), state in zip(args.stores, measured, states)]
    (ms, peak) = measured[-1]
    constant = {"memory": "continuous", "n_basis": args.n_basis, **_stats(ms), "peak_bytes": peak,
                "state_bytes": _state_bytes(cont_state)}
    print(f"{'memory':<11} {'store S':>9} {'best ms':>9} {'median ms':>10} {'peak MiB':>9} {'state MiB':>10}")
    for row in rows:
        print(f"{'knn':<11} {row['store']:>9,} {row['ms_per_segment']:>9.2f} {row['ms_median']:>10.2f} "
              f"{_mib(row['peak_bytes']):>9} {_mib(row['state_bytes']):>10}")
    print(f"{'continuous':<11} {'any':>9} {constant['ms_per_segment']:>9.2f} {constant['ms_median']:>10.2f} "
          f"{_mib(constant['peak_bytes']):>9} {_mib(constant['state_bytes']):>10}   (N = {args.n_basis})")
    verdict = crossing(rows, constant["ms_per_segment"])
    print(verdict)
    result = {"args": {k: v for k, v in vars(args).items()}, "device": str(device), "platform": platform.platform(),
              "torch": torch.__version__, "knn": rows, "continuous": constant, "crossing": verdict}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
