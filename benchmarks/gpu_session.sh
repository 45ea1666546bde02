#!/usr/bin/env bash
# The GPU checks of one ~10-minute device session (CI has no GPU): the test suite on CUDA, the device check
# (CPU agreement, bf16 autocast, paper-size step times), the scaling benchmark, and sorting runs on the
# CUDA device. Everything it reports lands in $OUT (default runs/gpu). Run from the repository root with a
# CUDA build of torch and the extras installed (x-transformers, transformers, matplotlib, tqdm).
#   bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" runs/sorting
export PYTHONUNBUFFERED=1
[ -e memory_plugins/adapters ] || python3 -c "import memory_plugins.adapters" 2>/dev/null \
  || ln -s ../adapters memory_plugins/adapters  # what the package-dir mapping does, without an install
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, x_transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. timings first, alone on the GPU
timeout 120 python3 -m benchmarks.device_check --device cuda --out "$OUT/device_check.json" 2>&1 | tee "$OUT/device_check.log"
timeout 40 python3 -m benchmarks.device_check --device cuda --preset cpu --lengths 1024 --dtypes fp32 \
  --memories none continuous continuous_sticky --steps 10 --out runs/device_check_cpu_preset.json 2>&1 | tail -6 | tee -a "$OUT/device_check.log"
timeout 100 python3 -m benchmarks.continuous_scaling --device cuda --contexts 1e3 1e4 1e5 1e6 --segment 256 --dim 128 \
  --repeats 15 --out "$OUT/scaling_cuda.json" 2>&1 | tee "$OUT/scaling_cuda.log"

# 2. sorting runs (cpu preset, T = 1024) in the background while the test suite runs on the GPU
run() {  # name, extra args
  timeout "${SORT_TIMEOUT:-330}" python3 -m examples.sorting.benchmark --preset cpu --lengths 1024 --device cuda --threads 2 \
    --out "runs/sorting/$1" "${@:2}" >"runs/sorting/$1.$3.log" 2>"runs/sorting/$1.$3.err" &
}
run gpu_plain --memories continuous
run gpu_plain --memories continuous_sticky
run gpu_lm --memories continuous --lm-loss
run gpu_lm --memories continuous_sticky --lm-loss
run gpu_long --memories continuous --epochs 8.4
run gpu_long --memories continuous_sticky --epochs 8.4
MEMORY_PLUGINS_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/pytest_cuda.log"
wait
python3 - "$OUT/sorting_cuda.json" <<'EOF'
import json, sys, pathlib, torch
runs = {}
for d in sorted(pathlib.Path("runs/sorting").glob("gpu_*/*_T1024")):
    res, ckpt = d / "result.json", d / "checkpoint.pt"
    if res.exists():
        r = json.loads(res.read_text())
        runs[f"{d.parent.name}/{d.name}"] = {"finished": True, "test": r["test"], "curve": r["curve"], "steps": r["steps"],
                                             "lm_loss": r["lm_loss"], "train_seconds": r["train_seconds"]}
    elif ckpt.exists():
        s = torch.load(ckpt, weights_only=False)
        runs[f"{d.parent.name}/{d.name}"] = {"finished": False, "curve": s["curve"], "step": s["step"]}
for k, v in runs.items():
    last = v["curve"][-1] if v["curve"] else {}
    print(k, "finished" if v["finished"] else f"stopped at {v['step']}",
          f"test {100 * v['test']['accuracy']:.1f}" if v["finished"] else "",
          f"valid {100 * last.get('valid_accuracy', float('nan')):.1f} at step {last.get('step')}")
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=1))
EOF
tail -n 3 runs/sorting/*.err | tail -40
