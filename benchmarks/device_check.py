"""Every memory on an accelerator: same numbers as the CPU, bf16 autocast, and the cost of a training step.

Notation: b batch, n segment length, e model dim, V vocabulary, T sequence length.

CI has no GPU, so the test suite runs on the CPU; this script is what checks the GPU path (the suite
itself also runs there with ``MEMORY_PLUGINS_TEST_DEVICE=cuda pytest tests``). It prints one table per
part and writes a JSON:

1. ``agreement``: one wrapped reference decoder per memory, built on the CPU, copied to ``--device``;
   the same 6-segment stream through both (float32, TF32 off). Reports the largest logit difference
   over all segments, and that ``memory_disabled()`` on the device is bit-identical to the base model.
   XL covering the whole stream is also compared with one full-attention pass on the device.
2. ``autocast``: the same stream under bf16 autocast on the device against its float32 run (largest
   difference relative to the logits' scale), then a backward pass: the loss, the aux loss and every
   gradient (host and memory) must be finite.
3. ``steps``: a training step of the sorting benchmark at a preset's sizes (default ``paper``: segment
   1,024, batch 8, 3 layers × 6 heads, e = 384; earlier segments without gradients, the last with),
   float32 and bf16 autocast, per memory and length: milliseconds per step (median of ``--steps``), peak
   memory, the ratio to the no-memory model timed in the same run, and the projected time of one run
   of the preset (the paper's: 20 epochs of 8,000 sequences in batches of 8 = 20,000 steps).

    python -m benchmarks.device_check --device cuda --out runs/device_check.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from contextlib import nullcontext

import torch

import memory_plugins as mp
from memory_plugins.models import ReferenceDecoder

from examples.sorting.benchmark import ALL_MEMORIES, PRESETS, build, run_segments
from examples.sorting.task import generate

from benchmarks.bench_utils import sync, write_result

# Small memories that a 6-segment stream of 64 tokens fills and overflows (every path is exercised).
CHECKED: dict[str, tuple[str, dict]] = {
    "xl": ("xl", {"mem_len": 96}),
    "compressive": ("compressive", {"mem_len": 64, "cmem_len": 32, "compression_rate": 2}),
    "continuous": ("continuous", {"n_basis": 64, "stm_len": 64}),
    "continuous_sticky": ("continuous", {"n_basis": 64, "stm_len": 64, "sticky": True}),
    "continuous_no_stm": ("continuous", {"n_basis": 64, "stm_len": 0}),
}
VOCAB, SEG, SEGMENTS, BATCH = 64, 64, 6, 4



def _decoder() -> ReferenceDecoder:
    return ReferenceDecoder(vocab_size=VOCAB, dim=96, depth=3, heads=6)


def _wrapped(kind: str, options: dict) -> mp.MemoryModel:
    """A wrapped decoder on the CPU whose memory parameters are random (W_O starts at zero otherwise)."""
    torch.manual_seed(0)
    model = mp.wrap(_decoder(), kind, **options)
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _stream(model: mp.MemoryModel, segments: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    device = next(model.parameters()).device
    model.reset_memory()
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.no_grad(), ctx:
        return torch.cat([model(s.to(device)).float() for s in segments], dim=1)  # (b, k·n, V)


def agreement(device: torch.device) -> list[dict]:
    torch.manual_seed(1)
    segments = [torch.randint(0, VOCAB, (BATCH, SEG)) for _ in range(SEGMENTS)]  # k × (b, n)
    rows = []
    for name, (kind, options) in CHECKED.items():
        cpu = _wrapped(kind, options).eval()
        dev = copy.deepcopy(cpu).to(device)
        ref = _stream(cpu, segments)  # (b, k·n, V)
        out = _stream(dev, segments).cpu()  # (b, k·n, V)
        state_devices = {t.device.type for layer in dev.memory_state()["layers"].values() for t in layer.values()}
        dev.reset_memory()
        probe = segments[0].to(device)  # (b, n)
        with torch.no_grad(), dev.memory_disabled():
            disabled = dev(probe)  # (b, n, V)
        base = copy.deepcopy(dev).unwrap().eval()
        with torch.no_grad():
            same = torch.equal(disabled, base(probe))
        rows.append({"memory": name, "max_abs_diff_vs_cpu": (out - ref).abs().max().item(),
                     "logit_scale": ref.abs().max().item(), "state_on_device": state_devices == {device.type},
                     "disabled_equals_base": same})
    # XL that covers the whole stream equals one full causal pass, on the device too.
    base = _decoder().to(device).eval()
    tokens = torch.cat(segments, dim=1).to(device)  # (b, k·n)
    with torch.no_grad():
        full = base(tokens)  # (b, k·n, V)
    xl = mp.wrap(copy.deepcopy(base), "xl", mem_len=SEG * SEGMENTS).eval()
    streamed = _stream(xl, segments)  # (b, k·n, V)
    rows.append({"memory": "xl_vs_full_attention", "max_abs_diff_vs_cpu": (streamed - full).abs().max().item(),
                 "logit_scale": full.abs().max().item(), "state_on_device": True, "disabled_equals_base": True})
    return rows


def autocast(device: torch.device, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(2)
    segments = [torch.randint(0, VOCAB, (BATCH, SEG)) for _ in range(SEGMENTS)]  # k × (b, n)
    rows = []
    for name, (kind, options) in CHECKED.items():
        model = _wrapped(kind, options).to(device).eval()
        ref = _stream(model, segments)  # (b, k·n, V) float32
        low = _stream(model, segments, dtype)  # (b, k·n, V) under autocast
        rel = ((low - ref).abs().max() / ref.abs().max()).item()
        model.train().reset_memory()
        with torch.autocast(device.type, dtype=dtype):
            for s in segments[:-1]:
                with torch.no_grad():
                    model(s.to(device))
            logits = model(segments[-1].to(device))  # (b, n, V)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), segments[-1].to(device).roll(-1, 1).flatten())
            aux = model.memory_aux_loss()
        (loss + aux).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        rows.append({"memory": name, "max_rel_diff_vs_fp32": rel, "loss": loss.item(), "aux": float(aux.detach()),
                     "finite": bool(torch.isfinite(loss) and torch.isfinite(aux)
                                    and all(torch.isfinite(g).all() for g in grads if g is not None)),
                     "params_with_grad": sum(g is not None for g in grads), "params": len(grads)})
    return rows


def steps(device: torch.device, preset_name: str, lengths: list[int], memories: list[str], n_steps: int,
          dtypes: list[str]) -> list[dict]:
    preset = PRESETS[preset_name]
    rows = []
    for length in lengths:
        data = generate(preset.batch, length, seed=0).to(device)
        for dt in dtypes:
            for memory in memories:
                torch.manual_seed(0)
                model = build(preset, memory, length).to(device)
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)
                ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dt == "bf16" else nullcontext()
                times = []
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                for i in range(n_steps + 2):  # two warm-up steps
                    sync(device)
                    t0 = time.perf_counter()
                    with ctx:
                        run_segments(model, memory, data, preset.segment, train=True)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                rows.append({"length": length, "dtype": dt, "memory": memory, "ms_per_step": 1e3 * statistics.median(times),
                             "ms_all": [1e3 * t for t in times], "peak_gib": peak / 2**30 if peak else None,
                             "projected_run_hours": statistics.median(times) * preset.steps / 3600})
                del model, opt
    for r in rows:
        none = next(x for x in rows if x["memory"] == "none" and x["length"] == r["length"] and x["dtype"] == r["dtype"])
        r["ratio_to_none"] = r["ms_per_step"] / none["ms_per_step"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="sizes of the timed training step")
    p.add_argument("--lengths", type=int, nargs="*", help="sorting lengths for the step timing (default: the preset's)")
    p.add_argument("--memories", nargs="*", default=list(ALL_MEMORIES))
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--out", default="runs/device_check.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}")

    agree = agreement(device)
    print("\n1. float32 on the device vs the CPU (6 segments of 64, b=4, 3 layers)")
    print(f"{'memory':<22} {'max |Δlogit|':>13} {'max |logit|':>12} {'state on device':>16} {'disabled == base':>17}")
    for r in agree:
        print(f"{r['memory']:<22} {r['max_abs_diff_vs_cpu']:>13.2e} {r['logit_scale']:>12.2f} "
              f"{str(r['state_on_device']):>16} {str(r['disabled_equals_base']):>17}")

    auto = autocast(device, torch.bfloat16)
    print("\n2. bf16 autocast on the device vs float32 on the device")
    print(f"{'memory':<22} {'max rel Δ':>10} {'loss':>8} {'aux':>10} {'finite':>7} {'grads':>8}")
    for r in auto:
        print(f"{r['memory']:<22} {r['max_rel_diff_vs_fp32']:>10.2e} {r['loss']:>8.3f} {r['aux']:>10.2e} "
              f"{str(r['finite']):>7} {r['params_with_grad']:>3}/{r['params']:<4}")

    timed = steps(device, args.preset, args.lengths or list(PRESETS[args.preset].lengths), args.memories, args.steps,
                  args.dtypes)
    pr = PRESETS[args.preset]
    print(f"\n3. sorting training step, preset {args.preset!r} (segment {pr.segment}, b={pr.batch}, e={pr.dim}), "
          f"median of {args.steps}; last column: one run of {pr.steps:,} steps")
    print(f"{'T':>6} {'dtype':>5} {'memory':<18} {'ms/step':>9} {'× none':>7} {'peak GiB':>9} {'run':>10}")
    for r in timed:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['length']:>6} {r['dtype']:>5} {r['memory']:<18} {r['ms_per_step']:>9.1f} {r['ratio_to_none']:>7.2f} "
              f"{peak:>9} {r['projected_run_hours']:>9.2f}h")

    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "args": vars(args),
              "agreement": agree, "autocast": auto, "steps": timed}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
