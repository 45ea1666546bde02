"""Per-segment time and peak memory of the continuous memory as the context grows, beside an XL cache.

Notation: b batch, n segment length, e model dim, N basis functions, T tokens seen so far.

The continuous memory really streams T tokens through a wrapped reference decoder and is timed at the
checkpoints (its cost should not depend on T: the goal is time(largest T) / time(smallest T) ≤ 1.05).
The XL cache is given ``mem_len = T`` (it keeps every token seen, the cost of attending over the whole
context) and is pre-filled with T random vectors instead of streaming T tokens first: a segment's
cost depends only on the cache length, so streaming would repeat the same work. XL is skipped above
``--xl-cap`` tokens (its per-segment time and memory grow linearly; the table says where it stopped).

Timing: the memory state is saved at each checkpoint; afterwards every checkpoint is timed from its
saved state in interleaved rounds (one segment per context per round, in a random order), so that
load changes on a shared machine hit all contexts alike. The table gives the best and the median of
``--repeats`` rounds; the ratio uses the best (timeit's convention), the JSON has every time.

Peak memory: the peak bytes of tensors a segment allocates on top of the weights and the state it
starts from (activations, workspace, the new state), counted op by op with a dispatch mode
(:class:`TensorPeak`), on any device; "state MiB" is the memory state itself.

    python -m benchmarks.continuous_scaling                       # 1e3, 1e4, 1e5 tokens
    python -m benchmarks.continuous_scaling --contexts 1e3 1e4 1e5 1e6 --out runs/continuous_scaling.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import memory_plugins as mp
from memory_plugins.models import ReferenceDecoder

from benchmarks.bench_utils import sync, write_result


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the mode and still alive (device agnostic).

    Every op's outputs are recorded by storage; a storage that already existed before the op (an
    input, a view of a parameter, an in-place result) is not counted. The figure is what a segment
    adds on top of the weights and the state it starts from: activations, workspace, the new state.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors referring to it]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live:
                self.live[ptr][1] += 1
            elif ptr in inputs or storage.nbytes() == 0:
                continue
            else:
                self.live[ptr] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out


def _segment_peak_bytes(model: mp.MemoryModel, state: dict, args: argparse.Namespace, device: torch.device) -> int:
    """Peak tensor bytes one segment allocates, starting from ``state`` (see :class:`TensorPeak`)."""
    model.set_memory_state(state)
    seg = torch.randint(0, args.vocab, (args.batch, args.segment), device=device)  # (b, n)
    with torch.no_grad(), TensorPeak() as tracker:
        out = model(seg)
    del out
    return tracker.peak


def _state_bytes(state: dict) -> int:
    """Bytes of the tensors of a ``memory_state()`` (format 2: per-layer dicts under "layers")."""
    layers = state["layers"] if "layers" in state else state  # a 0.1 flat state: layer → dict
    return sum(t.numel() * t.element_size() for s in layers.values() if s is not None for t in s.values())


def _measure(models: list[mp.MemoryModel], states: list[dict], args: argparse.Namespace,
             device: torch.device) -> list[tuple[list[float], int]]:
    """ms of every timed segment and peak tensor bytes, for each (model, saved state).

    Timing runs in ``args.repeats`` rounds; each round times one segment of every context, in a
    fresh random order, so that load changes on a shared machine hit every context alike. Each
    timed segment starts from the saved state.
    """
    times: list[list[float]] = [[] for _ in models]
    order = list(range(len(models)))
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(args.repeats):
            rng.shuffle(order)
            for i in order:
                models[i].set_memory_state(states[i])
                seg = torch.randint(0, args.vocab, (args.batch, args.segment), device=device)  # (b, n)
                sync(device)
                start = time.perf_counter()
                models[i](seg)
                sync(device)
                times[i].append((time.perf_counter() - start) * 1e3)
    peaks = [_segment_peak_bytes(m, s, args, device) for m, s in zip(models, states)]
    return list(zip(times, peaks))


def _base(args: argparse.Namespace, device: torch.device) -> ReferenceDecoder:
    torch.manual_seed(0)
    return ReferenceDecoder(vocab_size=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads).to(device).eval()


def run_continuous(args: argparse.Namespace, contexts: list[int], device: torch.device) -> list[dict]:
    """Stream tokens through one wrapped model, saving its memory state at each checkpoint."""
    model = mp.wrap(_base(args, device), "continuous", n_basis=args.n_basis, sticky=args.sticky, stm_len=args.stm_len)
    saved, seen = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for target in contexts:
            while seen < target:
                model(torch.randint(0, args.vocab, (args.batch, args.segment), device=device))
                seen += args.segment
            saved.append((seen, model.memory_state()))
    print(f"(streamed {seen:,} tokens in {time.perf_counter() - start:.1f} s)", flush=True)
    measured = _measure([model] * len(saved), [s for _, s in saved], args, device)
    rows = []
    for target, (seen_k, state), (ms, peak) in zip(contexts, saved, measured):
        rows.append({"memory": "continuous", "context": target, "tokens_seen": seen_k, **_stats(ms),
                     "peak_bytes": peak, "state_bytes": _state_bytes(state)})
        _print_row(rows[-1])
    return rows


def run_xl(args: argparse.Namespace, contexts: list[int], device: torch.device) -> list[dict]:
    """One XL model per context with ``mem_len = T`` and a cache pre-filled with T random vectors."""
    base = _base(args, device)
    kept = [t for t in contexts if t <= args.xl_cap]
    models, states = [], []
    with torch.no_grad():
        for target in kept:
            model = mp.wrap(copy.deepcopy(base), "xl", mem_len=target).eval()
            states.append({
                name: {"mem": torch.randn(args.batch, target, args.dim, device=device),  # (b, T, e)
                       "valid": torch.ones(args.batch, target, dtype=torch.bool, device=device)}  # (b, T)
                for name in model.memory.names
            })
            models.append(model)
    measured = _measure(models, states, args, device)
    rows = []
    for target in contexts:
        if target > args.xl_cap:
            rows.append({"memory": "xl", "context": target, "skipped": f"above --xl-cap={args.xl_cap}"})
        else:
            (ms, peak), state = measured[kept.index(target)], states[kept.index(target)]
            rows.append({"memory": "xl", "context": target, "tokens_seen": target, **_stats(ms),
                         "peak_bytes": peak, "state_bytes": _state_bytes(state)})
        _print_row(rows[-1])
    return rows


def _stats(ms: list[float]) -> dict:
    """Best (timeit's convention: the least disturbed by other processes) and median ms/segment."""
    return {"ms_per_segment": min(ms), "ms_median": statistics.median(ms), "ms_all": ms}


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _print_row(row: dict) -> None:
    if "skipped" in row:
        print(f"{row['memory']:<11} {row['context']:>10,}   skipped ({row['skipped']})", flush=True)
        return
    print(f"{row['memory']:<11} {row['context']:>10,} {row['ms_per_segment']:>10.2f} {row['ms_median']:>10.2f} "
          f"{_mib(row['peak_bytes']):>10} {_mib(row['state_bytes']):>10}", flush=True)


def _ratio(rows: list[dict], key: str = "ms_per_segment") -> float | None:
    timed = [r for r in rows if key in r]
    if len(timed) < 2:
        return None
    return timed[-1][key] / timed[0][key]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=float, nargs="+", default=[1e3, 1e4, 1e5], help="tokens seen at each checkpoint")
    p.add_argument("--segment", type=int, default=512, help="n: tokens per segment")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--n-basis", type=int, default=512)
    p.add_argument("--sticky", action="store_true")
    p.add_argument("--stm-len", type=int, default=0)
    p.add_argument("--repeats", type=int, default=7, help="timed segments per checkpoint (median reported)")
    p.add_argument("--xl-cap", type=int, default=100_000, help="largest XL cache measured")
    p.add_argument("--no-xl", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/continuous_scaling.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    contexts = sorted(int(c) for c in args.contexts)

    print(f"device={device} threads={torch.get_num_threads()} b={args.batch} n={args.segment} e={args.dim} "
          f"depth={args.depth} heads={args.heads} N={args.n_basis} sticky={args.sticky} stm_len={args.stm_len}")
    print(f"{'memory':<11} {'context':>10} {'best ms':>10} {'median ms':>10} {'peak MiB':>10} {'state MiB':>10}")
    rows = run_continuous(args, contexts, device)
    if not args.no_xl:
        rows += run_xl(args, contexts, device)
    cont = [r for r in rows if r["memory"] == "continuous"]
    xl = [r for r in rows if r["memory"] == "xl"]
    summary = {"continuous_ratio": _ratio(cont), "continuous_ratio_median": _ratio(cont, "ms_median"),
               "xl_ratio": _ratio(xl), "xl_ratio_median": _ratio(xl, "ms_median"), "goal": 1.05}
    print(f"time per segment, largest / smallest context: continuous {summary['continuous_ratio']:.3f} best, "
          f"{summary['continuous_ratio_median']:.3f} median (goal ≤ 1.05)")
    if summary["xl_ratio"]:
        top = max(r["context"] for r in xl if "ms_per_segment" in r)
        print(f"                                              xl {summary['xl_ratio']:.2f} best, "
              f"{summary['xl_ratio_median']:.2f} median (up to {top:,} tokens)")
    result = {"args": vars(args), "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
              "python": sys.version.split()[0], "cpu_count": os.cpu_count(), "rows": rows, "summary": summary}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
