#!/usr/bin/env bash
# The GPU half of issue 10 in one device session (~8 minutes on an H100/H200): the continuous memory's
# read and training step against attention / XL at the paper's sorting sizes, fp32 and bf16, compiled
# and eager, kernel launches per step, per-segment time up to 10^6 tokens, and the continuous and
# compile tests on CUDA. Every result lands in $OUT (default benchmarks/results/gpu_issue10).
#   bash benchmarks/gpu_issue10.sh                      # on the GPU machine, from the repository root
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_issue10.sh   # a dry run of the same steps at toy sizes (CPU)
set -u
OUT=${OUT:-benchmarks/results/gpu_issue10}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ "${SMALL:-0}" = 1 ]; then  # toy sizes: checks that every step runs, not a measurement
  SORT="--batch 2 --segment 64 --dim 48 --heads 6 --basis 32"; READ="--shapes small --repeats 2 --warmup 1"
  STEPS="--repeats 2"; MODULE="--batch 2 --segment 64 --dim 48 --basis 64 --repeats 2"; SCALE="--contexts 1e3 1e4 --segment 64 --dim 32 --n-basis 32 --repeats 2"; TESTS="tests/test_continuous_read.py"
else
  SORT="--batch 8 --segment 1024 --dim 300 --heads 6 --basis 512"; READ="--repeats 25"
  STEPS="--repeats 20"; MODULE="--repeats 15"; SCALE="--contexts 1e3 1e4 1e5 1e6 --segment 256 --dim 128 --repeats 15"
  TESTS="tests/test_continuous_read.py tests/test_continuous.py tests/test_continuous_fit.py tests/test_compile.py"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/device.txt"

# 1. the read (fused SDPA read vs dense vs attention over N keys), fp32 then bf16 autocast
timeout 150 $PY -m benchmarks.continuous_read --device "$DEVICE" $READ --out "$OUT/read_fp32.json" 2>&1 | tee "$OUT/read.log"
timeout 120 $PY -m benchmarks.continuous_read --device "$DEVICE" --autocast bf16 $READ --out "$OUT/read_bf16.json" 2>&1 | tee -a "$OUT/read.log"
# 2. a training step at the paper's sorting sizes: none / xl (mem_len = N) / continuous, eager and compiled,
#    kernel launches per step; fp32 then bf16 (the issue: continuous ÷ xl ≤ 1.1, bf16 faster than fp32)
for dt in fp32 bf16; do
  timeout 200 $PY -m benchmarks.continuous_step --device "$DEVICE" $SORT $STEPS --dtype $dt --compile \
    --out "$OUT/step_$dt.json" 2>&1 | grep -v "^USDT" | tee -a "$OUT/step.log"
done
# 3. the module alone at the sorting sizes (time, peak memory; the issue compares it with the authors' release)
timeout 90 $PY -m benchmarks.continuous_module --device "$DEVICE" $MODULE --out "$OUT/module_fp32.json" 2>&1 | tee "$OUT/module.log"
timeout 60 $PY -m benchmarks.continuous_module --device "$DEVICE" $MODULE --autocast bf16 --out "$OUT/module_bf16.json" 2>&1 | tee -a "$OUT/module.log"
# 4. per-segment time and peak memory as the context grows (goal: 10^6 ÷ 10^3 ≤ 1.05)
timeout 120 $PY -m benchmarks.continuous_scaling --device "$DEVICE" $SCALE --out "$OUT/scaling.json" 2>&1 | tee "$OUT/scaling.log"
# 5. the continuous memory's tests and the compile tests on the device
MEMORY_PLUGINS_TEST_DEVICE=$DEVICE timeout 200 $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -30 | tee "$OUT/pytest.log"
