"""A training step with the continuous memory against the same host with an XL cache: time, operators, compile.

Notation: b batch, n segment length, e model dim, h heads, N basis functions, m XL memory length.

For each memory (``continuous`` with N basis functions, ``xl`` with mem_len = N, and the bare host),
a 2-layer reference decoder streams ``--segments`` segments of a batch, the memory full, and runs one
forward + backward + optimiser step per segment. Reported, all measured in the same run, repeats
interleaved so that machine noise hits every memory alike:

* median step time and its ratio to ``xl`` (the issue's goal: continuous ≤ 1.1 × xl);
* operators per step (torch.profiler events of one step: every ``aten::`` call, the compute ops among
  them, the autograd nodes of its backward, and on CUDA the kernel launches);
* with ``--compile``: the same step under ``torch.compile``, its time, the graph breaks that
  ``torch._dynamo.explain`` finds in one segment's forward, and the largest difference of its loss
  from eager's.

    python -m benchmarks.continuous_step --threads 1                      # CPU shapes of the issue
    python -m benchmarks.continuous_step --device cuda --batch 8 --segment 1024 --dim 300 --heads 6 --basis 512 \
        --memories none xl continuous continuous-triton      # continuous-triton: read_impl="triton"

At tiny shapes on a CPU the step is bound by host overhead per op, as a GPU step is by launches at the
paper's sizes: ``--batch 1 --segment 32 --dim 48 --basis 64 --foreach`` (AdamW's multi-tensor path,
CUDA's default) gives a CPU proxy for the GPU's eager ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

import memory_plugins as mp
from benchmarks.bench_utils import add_shape_args, count_operators, parse_shape_args, sync, write_result
from memory_plugins.models import ReferenceDecoder

VOCAB = 256


def build(memory: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    base = ReferenceDecoder(vocab_size=VOCAB, dim=args.dim, depth=args.depth, heads=args.heads)
    if memory == "none":
        return base.to(device)
    if memory == "xl":
        return mp.wrap(base, "xl", mem_len=args.basis).to(device)
    if memory not in ("continuous", "continuous-triton"):
        raise ValueError(f"--memories: {memory!r} is not one of none, xl, continuous, continuous-triton")
    impl = "triton" if memory == "continuous-triton" else "sdpa"  # the read's own kernels (CUDA), or SDPA
    return mp.wrap(base, "continuous", n_basis=args.basis, stm_len=0, zero_init_output=False,
                   read_impl=impl).to(device)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """One segment: forward, loss (+ memory aux), backward, optimiser step. ``tokens`` (b, n + 1)."""
    with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(tokens[:, :-1])  # (b, n, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        wrapped = getattr(model, "_orig_mod", model)  # torch.compile's module wraps ours
        if isinstance(wrapped, mp.MemoryModel):
            loss = loss + wrapped.memory_aux_loss()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def add_step_args(p: argparse.ArgumentParser, repeats: int, **shape: int) -> None:
    """The host's shape (b, n, e, h, N; ``shape`` the defaults), depth, device and timed repeats."""
    add_shape_args(p, basis_help="N for continuous; mem_len for xl", **shape)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)


def segments(args: argparse.Namespace, device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` random token segments (b, n + 1), the same in every run."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (args.batch, args.segment + 1), generator=gen).to(device) for _ in range(count)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, repeats=15, batch=4, segment=256, dim=192, heads=6, basis=256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--memories", nargs="*", default=["none", "xl", "continuous"])
    p.add_argument("--foreach", action="store_true", help="AdamW's multi-tensor path (CUDA's default) on any device")
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile's mode (reduce-overhead: CUDA graphs where inductor can capture)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also profile one step per memory: its top ROWS operators and, on CUDA, the GPU's busy time")
    p.add_argument("--out", default="benchmarks/results/continuous_step.json")
    args, device = parse_shape_args(p, argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    data = segments(args, device, 4)
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for memory in args.memories:
        model = build(memory, args, device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=args.foreach or None)
        try:
            for tokens in data + data:  # fill the memory, warm up the allocator
                step(model, opt, tokens, dtype)
        except Exception as err:  # noqa: BLE001 (one memory failing, e.g. a kernel on a new GPU, leaves the others' table)
            failed[memory] = f"{type(err).__name__}: {err}"
            print(f"{memory}: FAILED, left out of the table: {failed[memory][:500]}", flush=True)
            continue
        runs[memory] = {"model": model, "opt": opt, "times": []}
    for r in range(args.repeats):  # interleaved: every memory sees the same machine noise
        for memory, run in runs.items():
            tokens = data[r % len(data)]
            sync(device)
            t0 = time.perf_counter()
            step(run["model"], run["opt"], tokens, dtype)
            sync(device)
            run["times"].append(time.perf_counter() - t0)
    rows = []
    for memory, run in runs.items():
        row: dict[str, Any] = {"memory": memory, "step_ms": 1e3 * statistics.median(run["times"])}
        row.update(count_operators(lambda: step(run["model"], run["opt"], data[0], dtype), device))  # one step
        if args.compile:
            row.update(compiled(run, data, device, dtype, args.repeats, args.compile_mode))
        if args.profile:
            row.update(profiled(run["model"], run["opt"], data[0], device, dtype, args.profile))
        rows.append(row)
    xl = next((r for r in rows if r["memory"] == "xl"), None)
    for row in rows:
        row["ratio_to_xl"] = row["step_ms"] / xl["step_ms"] if xl else None
    cuda = device.type == "cuda"
    print(f"{'memory':<18}{'step ms':>10}{'÷ xl':>8}{'aten ops':>10}{'compute':>9}{'nodes':>7}" + (f"{'launches':>10}" if cuda else "")
          + ("  compiled ms  breaks  |Δloss|" if args.compile else ""))
    for row in rows:
        ratio = "-" if row["ratio_to_xl"] is None else f"{row['ratio_to_xl']:.2f}"  # no xl in --memories: no ratio
        line = (f"{row['memory']:<18}{row['step_ms']:>10.1f}{ratio:>8}{row['aten_ops']:>10}"
                f"{row['compute_ops']:>9}{row['autograd_nodes']:>7}")
        line += f"{row['kernel_launches']:>10}" if cuda else ""
        if args.compile:
            line += f"  {row['compiled_step_ms']:>11.1f}  {row['graph_breaks']:>6}  {row['max_loss_diff']:.1e}"
        print(line)
    for row in rows:
        if "profile" in row:
            busy = f", GPU busy {row['gpu_busy_ms']:.1f} ms of the step" if "gpu_busy_ms" in row else ""
            print(f"-- {row['memory']}: one profiled step{busy}\n{row['profile']}")
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
              "failed": failed}
    write_result(result, args.out)
    return result


def profiled(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, device: torch.device,
             dtype: torch.dtype | None, rows: int) -> dict[str, Any]:
    """One profiled step: the top ``rows`` operators by self time (the GPU's on CUDA) and, on CUDA, the
    time the GPU spent in kernels. Next to the step time, that shows whether the step waits for the
    GPU or for the host that launches its kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step(model, opt, tokens, dtype)
        sync(device)
    out: dict[str, Any] = {"profile": prof.key_averages().table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["gpu_busy_ms"] = sum(e.self_device_time_total for e in kernels) / 1e3
    return out


def compiled(run: dict[str, Any], data: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None,
             repeats: int, mode: str = "default") -> dict[str, Any]:
    """Time the compiled step; count graph breaks of one forward; compare its loss with eager's."""
    import copy

    model = run["model"]
    eager = copy.deepcopy(model)
    fast = torch.compile(copy.deepcopy(model), mode=mode)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-4)
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-4)
    diffs = []
    for tokens in data:  # compile (and recompile as shapes settle), compare with eager step by step
        diffs.append((step(fast, opt, tokens, dtype) - step(eager, opt_eager, tokens, dtype)).abs().item())
    times = []
    for r in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step(fast, opt, data[r % len(data)], dtype)
        sync(device)
        times.append(time.perf_counter() - t0)
    explain = torch._dynamo.explain(copy.deepcopy(model))(data[0][:, :-1])
    return {"compiled_step_ms": 1e3 * statistics.median(times), "graph_breaks": int(explain.graph_break_count),
            "graphs": int(explain.graph_count), "max_loss_diff": max(diffs),
            "break_reasons": sorted({str(b.reason).split("\n")[0][:160] for b in explain.break_reasons})}


if __name__ == "__main__":
    main()
