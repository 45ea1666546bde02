"""What the benchmark scripts share: waiting for the device before reading a clock, and writing the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(result: dict[str, Any] | str, path: str | Path) -> dict[str, Any] | str:
    """Write ``result`` (a dict as JSON, or text as it is) to ``path``, creating its folder, and say so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result if isinstance(result, str) else json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result
