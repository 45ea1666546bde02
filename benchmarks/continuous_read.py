"""Forward + backward time of the continuous memory's read, SDPA vs dense, against plain attention over N keys.

Notation: b batch, n queries, e model dim, h heads, d head dim, N basis functions (= keys).

Three variants (four on CUDA), each from the host's queries q (b, h, n, d) and the LTM coefficients B (b, N, e) to the
layer's output (b, n, e), with every input and weight receiving gradients:

* ``sdpa``: the LTM read of :func:`memory_plugins.continuous.read.gaussian_read` (V = W_V B, μ/σ², the
  Gaussian read as one SDPA over N + 1 keys) and W_O, its constant keys built once, as the backend
  caches them (``BasisCache.read_constants``);
* ``dense``: the same read through the materialised E_p[ψ] (b, h, n, N) (``impl="dense"``) and W_O;
* ``attention``: plain SDPA over N keys with the same projections (K = W_K B, V = W_V B, W_O): the
  cost of attending over N discrete memory vectors, the yardstick (goal: sdpa / attention ≤ 1.2);
* ``triton``, where its kernels run (CUDA): the read through ``impl="triton"`` (:mod:`memory_plugins.
  continuous.kernel`) and W_O.

Timing: the variants run in interleaved rounds (one forward + backward of each per round, in a fresh
random order) after warm-up rounds, so that load changes on a shared machine hit all alike; the
table gives medians and the ratios of medians, the JSON every time. The SDPA kernels each variant ran
(forward and backward ops) and its operator counts (compute ops: one kernel launch each on a GPU;
:func:`benchmarks.bench_utils.count_operators`) are read from one profiled call each. ``--profile``
prints the top operators.

    python -m benchmarks.continuous_read --threads 1 2                # CPU, both shapes, 1 then 2 threads
    python -m benchmarks.continuous_read --device cuda --autocast bf16 --shapes sorting
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_utils import count_operators, interleaved, sync, write_result

from memory_plugins.continuous.basis import rbf_basis
from memory_plugins.continuous.kernel import kernel_available
from memory_plugins.continuous.read import feature_layout, gaussian_read, sdpa_constants

SHAPES = {  # b, n, e, h, N, widths
    "small": dict(b=4, n=256, e=192, h=6, N=256, widths=(0.01, 0.05)),
    "sorting": dict(b=8, n=1024, e=300, h=6, N=512, widths=(0.01, 0.05)),  # the paper's sorting sizes, d = 50
}
VARIANTS = ("sdpa", "dense", "attention")  # and "triton" (read_impl="triton") where its kernels run


def make_inputs(shape: dict, device: torch.device, seed: int = 0) -> dict:
    """Queries, coefficients and weights at ``shape``, all leaves requiring grad."""
    b, n, e, h, n_basis, widths = (shape[k] for k in ("b", "n", "e", "h", "N", "widths"))
    d = e // h
    g = torch.Generator().manual_seed(seed)

    def leaf(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device).requires_grad_()

    c64, w64 = rbf_basis(n_basis, widths)  # (N,), (N,)
    c = n_basis // len(widths)
    centres, width_set = c64[:c].float().to(device), w64[::c].float().to(device)  # (C,), (W,)
    return {
        "q": leaf(b, h, n, d),  # (b, h, n, d)
        "coef": leaf(b, n_basis, e, scale=0.1),  # (b, N, e)
        "w_k": leaf(h * d, e, scale=e**-0.5),  # (h·d, e)
        "w_v": leaf(h * d, e, scale=e**-0.5),  # (h·d, e)
        "w_o": leaf(e, h * d, scale=(h * d) ** -0.5),  # (e, h·d)
        "w_mu": leaf(n_basis, scale=n_basis**-0.5),  # (N,)
        "w_sigma": leaf(n_basis, scale=n_basis**-0.5),  # (N,)
        "centres": centres,  # (C,)
        "widths": width_set,  # (W,)
        "constants": sdpa_constants(centres, width_set, d, min(widths)),  # ReadConstants
        "min_width": min(widths),
        "grad_out": torch.randn(b, n, e, generator=g).to(device),  # (b, n, e)
    }


def forward(variant: str, x: dict) -> torch.Tensor:
    """The layer output (b, n, e) of one variant."""
    q, coef = x["q"], x["coef"]
    b, h, n, d = q.shape
    if variant == "attention":
        k = F.linear(coef, x["w_k"]).view(b, -1, h, d).transpose(1, 2)  # (b, h, N, d)
        v = F.linear(coef, x["w_v"]).view(b, -1, h, d).transpose(1, 2)  # (b, h, N, d)
        z = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, d)
    else:
        z, _, _ = gaussian_read(q, coef, x["w_k"], x["w_v"], x["w_mu"], x["w_sigma"], x["centres"], x["widths"],
                                1e-6, impl=variant, min_width=x["min_width"],
                                constants=x["constants"] if variant == "sdpa" else None)  # (b, h, n, d)
    return F.linear(z.transpose(1, 2).reshape(b, n, h * d), x["w_o"])  # (b, n, e)


def step(variant: str, x: dict, autocast: torch.dtype | None) -> None:
    """One forward + backward."""
    device = x["q"].device
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = forward(variant, x)  # (b, n, e)
    out.backward(x["grad_out"].to(out.dtype))
    for t in x.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def sdpa_ops(variant: str, x: dict, autocast: torch.dtype | None) -> list[str]:
    """The attention ops one forward + backward of ``variant`` ran (which kernel SDPA dispatched to)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x["q"].device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(variant, x, autocast)
        sync(x["q"].device)
    names = {e.key for e in prof.key_averages()}
    return sorted(k for k in names if "attention" in k and k.startswith("aten::_"))


def run_shape(name: str, args: argparse.Namespace, device: torch.device, autocast: torch.dtype | None) -> dict:
    shape = SHAPES[name]
    x = make_inputs(shape, device)
    variants = VARIANTS + (("triton",) if kernel_available(device, torch.float32) else ())
    if "triton" in variants:
        try:
            step("triton", x, autocast)  # compiles the kernels; a failure leaves the other columns
        except Exception as err:  # noqa: BLE001 (report it and go on)
            print(f"{name}: the triton read FAILED, left out: {type(err).__name__}: {str(err)[:500]}", flush=True)
            variants = VARIANTS
    times = interleaved({v: (lambda v=v: step(v, x, autocast)) for v in variants}, device, args.warmup, args.repeats)
    med = {v: statistics.median(t) for v, t in times.items()}
    d, widths = shape["e"] // shape["h"], shape["widths"]
    dim, chunks = feature_layout(d, len(widths), shape["N"] // len(widths), min(widths))
    row = {
        "shape": name, **{k: v for k, v in shape.items() if k != "widths"}, "widths": list(widths), "d": d,
        "sdpa_dim_D": dim, "chunks_K": chunks,
        "ms_median": med, "ms_min": {v: min(t) for v, t in times.items()}, "ms_all": times,
        "ratio_sdpa_over_attention": med["sdpa"] / med["attention"],
        "ratio_dense_over_attention": med["dense"] / med["attention"],
        "sdpa_ops": {v: sdpa_ops(v, x, autocast) for v in variants},
        "operators": {v: count_operators(lambda v=v: step(v, x, autocast), device) for v in variants},
    }
    if "triton" in med:
        row["ratio_triton_over_attention"] = med["triton"] / med["attention"]
    print(f"{name:<8} {torch.get_num_threads():>3} {row['b']:>3} {row['n']:>5} {row['e']:>4} {row['h']:>2} {row['d']:>3} {row['N']:>5} "
          f"{med['sdpa']:>9.1f} {med['dense']:>9.1f} {med['attention']:>9.1f} "
          f"{row['ratio_sdpa_over_attention']:>7.2f} {row['ratio_dense_over_attention']:>7.2f} "
          + " ".join(f"{row['operators'][v]['compute_ops']:>5}" for v in VARIANTS)
          + (f"   triton {med['triton']:.1f} ms, ÷ attention {row['ratio_triton_over_attention']:.2f}, "
             f"{row['operators']['triton']['compute_ops']} ops" if "triton" in med else ""), flush=True)
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        for variant in variants:
            with profile(activities=activities) as prof:
                for _ in range(3):
                    step(variant, x, autocast)
                sync(device)
            table = prof.key_averages().table(sort_by=sort, row_limit=args.profile)
            row.setdefault("profile", {})[variant] = table
            print(f"-- {name} {variant} (3 calls)\n{table}")
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch CPU thread counts, each measured in turn (default: torch's choice)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="run under autocast")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print each variant's top operators")
    p.add_argument("--out", default="benchmarks/results/continuous_read.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    print(f"device={device} autocast={args.autocast} torch={torch.__version__} repeats={args.repeats} "
          f"(forward + backward ms, median of interleaved rounds)")
    print(f"{'shape':<8} {'thr':>3} {'b':>3} {'n':>5} {'e':>4} {'h':>2} {'d':>3} {'N':>5} {'sdpa':>9} {'dense':>9} "
          f"{'attention':>9} {'sdpa/at':>7} {'dense/at':>7} {'compute ops (sdpa, dense, attention)'}")
    rows = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        rows += [{"threads": threads, **run_shape(name, args, device, autocast)} for name in args.shapes]
    result = {"args": vars(args), "device": str(device), "torch": torch.__version__,
              "platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
              "goal_sdpa_over_attention": 1.2, "rows": rows}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
