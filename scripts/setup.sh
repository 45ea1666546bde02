#!/usr/bin/env bash
# Create .venv (once) and install memory_plugins with the extras the tests and examples use.
# torch is pinned first so that pip takes the CPU build this workplace keeps on disk instead of a
# multi-GB CUDA build; on your own machine any torch >= 2.2 works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.2"
.venv/bin/python -m pip install -q -e ".[dev,xtransformers,hf,examples]"
# The timm extra: timm needs torchvision, whose PyPI wheels are built against a CUDA torch. Beside the CPU
# torch above, torchvision >= 0.17 does not import ("operator torchvision::nms does not exist") and asking
# pip for it would swap torch; the Python part of 0.16.2 imports (its C ops stay unloaded; timm's ViTs never
# use them). So torchvision and timm go in without dependencies, and only where timm does not import yet.
if ! .venv/bin/python -c "import timm" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q requests
  .venv/bin/python -c "import torchvision" >/dev/null 2>&1 || .venv/bin/python -m pip install -q --no-deps "torchvision==0.16.2"
  .venv/bin/python -m pip install -q --no-deps "timm>=1.0"
fi
