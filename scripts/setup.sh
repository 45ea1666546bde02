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
