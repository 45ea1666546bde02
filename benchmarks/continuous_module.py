"""The continuous memory module alone at the paper's sorting sizes: forward and forward + backward, time and peak memory.

Notation: b batch, n segment length, e model dim, h heads, d head dim, N basis functions.

One :class:`ContinuousMemory` layer (N 512, widths (0.01, 0.05), τ 0.75; no host model) takes a segment
of n vectors x (b, n, e) and the host's queries q (b, h, n, d), starting from the steady state of a
stream: every sample has an LTM and n vectors pending. A step is the update (gate, refit), the read
(μ, σ², the Gaussian read, W_O), the KL term and the new state. Measured in interleaved rounds:

Each ``--read-impls`` entry (the fused SDPA read and the dense reference by default) is a module with
the same weights and data; all are timed in the same interleaved rounds.

* forward: one step under ``torch.no_grad()`` (what evaluation pays);
* forward + backward: one step in training mode and the backward of a fixed random functional of the
  read plus the KL (what training pays; the gradients reach every parameter of the module);
* peak memory of the tensors each allocates on top of its inputs, weights and state (TensorPeak,
  counted op by op on any device), and on CUDA ``torch.cuda.max_memory_allocated`` above the start.

These are the figures issue 10 compares with the authors' release (there, at b 8, n 1,024, e 300,
6 heads, N 512 on an H200: 151 MiB forward and 432 MiB forward + backward for this module).

    python -m benchmarks.continuous_module --threads 1                   # CPU, the paper's sorting sizes
    python -m benchmarks.continuous_module --device cuda --autocast bf16
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from benchmarks.bench_utils import add_shape_args, interleaved, parse_shape_args, sync, write_result
from benchmarks.continuous_scaling import TensorPeak
from memory_plugins.continuous import ContinuousConfig, ContinuousMemory
from memory_plugins.interface import AttentionDims

MIB = 2**20


def build(args: argparse.Namespace, device: torch.device,
          read_impl: str) -> tuple[ContinuousMemory, dict, torch.Tensor, torch.Tensor]:
    """The module, a steady-state memory state and one segment (x (b, n, e), q (b, h, n, d)); the same
    weights and data for every ``read_impl``."""
    torch.manual_seed(0)
    d = args.dim // args.heads
    config = ContinuousConfig(n_basis=args.basis, stm_len=0, zero_init_output=False, sticky=args.sticky,
                              read_impl=read_impl)
    mem = ContinuousMemory(config, AttentionDims(args.dim, args.heads, d), nn.ModuleDict()).to(device)
    g = torch.Generator().manual_seed(0)
    segs = [torch.randn(args.batch, args.segment, args.dim, generator=g).to(device) for _ in range(3)]  # (b, n, e)
    q = torch.randn(args.batch, args.heads, args.segment, d, generator=g).to(device)  # (b, h, n, d)
    state = mem.init_state(args.batch, device, torch.float32)
    with torch.no_grad():
        for x in segs[:2]:  # fill: a first fit, then a pending segment
            _, state = mem.step(state, x, q, None)
    return mem, state, segs[2], q


def forward(mem: ContinuousMemory, state: dict, x: torch.Tensor, q: torch.Tensor, autocast: torch.dtype | None) -> None:
    mem.eval()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        mem.step(state, x, q, None)


def forward_backward(mem: ContinuousMemory, state: dict, x: torch.Tensor, q: torch.Tensor,
                     autocast: torch.dtype | None, grad_out: torch.Tensor) -> None:
    mem.train()
    q = q.detach().requires_grad_()  # the host's queries receive a gradient too
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        read, _ = mem.step(state, x, q, None)
        loss = (read.output.float() * grad_out).sum() + (read.aux_loss if read.aux_loss is not None else 0.0)
    loss.backward()
    mem.zero_grad(set_to_none=True)


def peak(fn, device: torch.device) -> dict[str, float | None]:  # type: ignore[no-untyped-def]
    """Peak MiB of one call: TensorPeak, and on CUDA the allocator's peak above the start."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    with TensorPeak() as tracker:
        fn()
    sync(device)
    cuda = (torch.cuda.max_memory_allocated(device) - start) / MIB if device.type == "cuda" else None
    return {"tensor_peak_mib": tracker.peak / MIB, "cuda_peak_mib": cuda}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, batch=8, segment=1024, dim=300, heads=6, basis=512)
    p.add_argument("--sticky", action="store_true")
    p.add_argument("--read-impls", nargs="+", choices=["sdpa", "dense", "triton"], default=["sdpa", "dense"],
                   help="ContinuousConfig.read_impl of each module measured (interleaved)")
    p.add_argument("--autocast", choices=["bf16"], default=None)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/continuous_module.json")
    args, device = parse_shape_args(p, argv)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    variants, states = {}, {}
    for impl in args.read_impls:
        mem, state, x, q = build(args, device, impl)
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)  # (b, n, e)
        variants[f"{impl} forward"] = lambda m=mem, s=state, x=x, q=q: forward(m, s, x, q, autocast)
        variants[f"{impl} forward_backward"] = lambda m=mem, s=state, x=x, q=q, g=grad_out: forward_backward(
            m, s, x, q, autocast, g)
        states[impl] = state
    times = interleaved(variants, device, args.warmup, args.repeats)
    rows = {name: {"ms_median": statistics.median(t), "ms_all": t, **peak(variants[name], device)}
            for name, t in times.items()}
    print(f"continuous module, b {args.batch}, n {args.segment}, e {args.dim}, h {args.heads}, N {args.basis}, "
          f"sticky {args.sticky}, {device}, autocast {args.autocast}, threads {torch.get_num_threads()}")
    print(f"{'':<24}{'ms':>10}{'tensor peak MiB':>17}{'CUDA peak MiB':>15}")
    for name, row in rows.items():
        cuda = f"{row['cuda_peak_mib']:.1f}" if row["cuda_peak_mib"] is not None else "-"
        print(f"{name:<24}{row['ms_median']:>10.1f}{row['tensor_peak_mib']:>17.1f}{cuda:>15}")
    state = states[args.read_impls[0]]
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
              "state_mib": sum(t.numel() * t.element_size() for t in state.values()) / MIB}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
