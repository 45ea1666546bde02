"""What the benchmark scripts share: their shape options, waiting for the device before reading a clock,
and writing the result."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch


def add_shape_args(p: argparse.ArgumentParser, batch: int, segment: int, dim: int, heads: int, basis: int,
                   basis_help: str = "N, basis functions") -> None:
    """--device, --batch (b), --segment (n), --dim (e), --heads (h), --basis (N) and --threads."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--segment", type=int, default=segment)
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--basis", type=int, default=basis, help=basis_help)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def parse_shape_args(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """Parse ``argv`` for a parser with :func:`add_shape_args`, apply ``--threads``, return (args, device)."""
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each call over ``repeats`` rounds after ``warmup`` untimed ones; every round runs
    each call once, in a fresh random order (seeded), so that load changes on a shared machine hit all
    alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls), random.Random(0)
    for r in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


NO_COMPUTE = frozenset(f"aten::{name}" for name in (  # views, metadata and allocation: no kernel of their own
    "view", "as_strided", "reshape", "_reshape_alias", "_unsafe_view", "transpose", "t", "numpy_T", "mT", "permute",
    "unsqueeze", "squeeze", "expand", "slice", "select", "narrow", "unfold", "flatten", "split", "unbind", "chunk",
    "detach", "alias", "resolve_conj", "resolve_neg", "lift_fresh", "result_type", "is_nonzero", "item",
    "_local_scalar_dense", "to", "contiguous", "matmul", "linear", "einsum", "pad", "empty", "empty_strided",
    "empty_like", "new_empty", "new_zeros", "zeros"))


KERNEL_OPS = frozenset(("memory_plugins::gauss_read", "memory_plugins::gauss_read_backward"))  # Triton kernels


def _inside(event: Any, names: frozenset[str]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def count_operators(call: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """aten operator calls of one ``call()``: all of them, and the compute ops among them (leaf ops that
    are not views, metadata or allocation: what runs a kernel, one launch each on a GPU); the calls of
    the read's Triton-kernel operators (``kernel_ops``: 1 launch forward, 2 backward; the aten ops
    inside them are not counted, as they are the interpreter's own where ``TRITON_INTERPRET=1`` runs
    them on a CPU); the autograd nodes its backward ran (each costs host time, whatever the device);
    on CUDA also the kernel launches the profiler saw. On a CPU some compute ops are the CPU's own (a
    Python scalar copied into a tensor, the zero fill before a sum), so counts compare like with like,
    not CPU with GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        sync(device)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    compute = [e for e in aten if e.name not in NO_COMPUTE and not _inside(e, KERNEL_OPS)
               and not any(c.name.startswith("aten::") and c.name not in NO_COMPUTE for c in e.cpu_children)]
    kernel_ops = sum(1 for e in events if e.name in KERNEL_OPS and not _inside(e, KERNEL_OPS))
    nodes = sum(1 for e in events if e.name.startswith("autograd::engine::evaluate_function"))
    out = {"aten_ops": len(aten), "compute_ops": len(compute), "kernel_ops": kernel_ops, "autograd_nodes": nodes}
    if device.type == "cuda":
        out["kernel_launches"] = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                      "cudaLaunchKernelExC"))
    return out


def write_result(result: dict[str, Any] | str, path: str | Path) -> dict[str, Any] | str:
    """Write ``result`` (a dict as JSON, or text as it is) to ``path``, creating its folder, and say so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result if isinstance(result, str) else json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result
