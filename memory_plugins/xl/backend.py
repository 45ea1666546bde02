"""Transformer-XL cache: a per-layer FIFO of the vectors that layer's K/V projections see.

Notation: b batch, n segment length, m memory length (≤ mem_len), e model dim.
State: ``mem`` (b, m, e), oldest first; ``valid`` (b, m) bool, False for slots emptied by a reset.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..interface import AttentionDims, HostAttention, MemoryRead, MemoryState
from .config import XLConfig


def fifo_push(
    mem: Tensor, valid: Tensor, x: Tensor, capacity: int, x_valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Append ``x`` (b, n, e) to the FIFO and keep the newest ``capacity`` vectors.

    ``x_valid`` (b, n) marks which new vectors hold data (default: all). Returns ``(mem, valid,
    evicted, evicted_valid)``; the evicted vectors (oldest first) are what fell out, so that a
    second-level memory can take them exactly once.
    """
    if x_valid is None:
        x_valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (b, n)
    mem = torch.cat([mem, x], dim=1)  # (b, m + n, e)
    valid = torch.cat([valid, x_valid], dim=1)  # (b, m + n)
    cut = max(mem.shape[1] - capacity, 0)
    return mem[:, cut:], valid[:, cut:], mem[:, :cut], valid[:, :cut]


def fifo_reset(mem: Tensor, valid: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Empty the rows where ``mask`` (b,) is True: zero their vectors, mark their slots invalid."""
    keep = ~mask.to(torch.bool)  # (b,)
    return mem * keep[:, None, None].to(mem.dtype), valid & keep[:, None]


class XLMemory(nn.Module):
    """Transformer-XL memory backend (no parameters)."""

    def __init__(self, config: XLConfig, dims: AttentionDims, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.config = config
        self.dims = dims

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        e = self.dims.embed_dim
        return {
            "mem": torch.zeros(batch_size, 0, e, device=device, dtype=dtype),  # (b, 0, e)
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),  # (b, 0)
        }

    def read(self, state: MemoryState, x: Tensor, q: Tensor | None) -> MemoryRead:
        if state["mem"].shape[1] == 0:
            return MemoryRead()
        return MemoryRead(kv_source=state["mem"], kv_mask=state["valid"])

    def write(
        self, state: MemoryState, x: Tensor, host: HostAttention | None, read: MemoryRead | None
    ) -> tuple[MemoryState, Tensor | None]:
        x = x.detach() if self.config.detach else x
        mem, valid, _, _ = fifo_push(state["mem"], state["valid"], x.to(state["mem"].dtype), self.config.mem_len)
        return {"mem": mem, "valid": valid}, None

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        mem, valid = fifo_reset(state["mem"], state["valid"], mask)
        return {"mem": mem, "valid": valid}

    def extra_repr(self) -> str:
        return f"mem_len={self.config.mem_len}"
