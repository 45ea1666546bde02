"""Transformer-XL cache: a per-layer FIFO of the vectors that layer's K/V projections see.

Notation: b batch, n segment length, m memory length (≤ mem_len), e model dim.
State: ``mem`` (b, m, e), oldest first; ``valid`` (b, m) bool. Each sample's valid vectors are
right-aligned (see :mod:`memory_plugins.fifo`): padding never enters, and a reset only marks slots
invalid.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import fifo
from ..fifo import fifo_push, fifo_reset  # noqa: F401  (names of 0.1)
from ..interface import HostAttention, MemoryRead, MemoryState
from ..registry import register_memory
from .config import XLConfig


@register_memory("xl", XLConfig)
class XLMemory(nn.Module):
    """Transformer-XL memory backend (no parameters)."""

    uses_queries: ClassVar[bool] = False

    def __init__(self, config: XLConfig, host: HostAttention, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.config = config
        self.dims = host.dims if isinstance(host, HostAttention) else host
        object.__setattr__(self, "host", host)  # not a submodule: the host layer belongs to the model

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        e = self.dims.embed_dim
        return {
            "mem": torch.zeros(batch_size, 0, e, device=device, dtype=dtype),  # (b, 0, e)
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),  # (b, 0)
        }

    def step(self, state: MemoryState, x: Tensor, q: Tensor | None,
             valid: Tensor | None) -> tuple[MemoryRead, MemoryState]:
        read = MemoryRead(kv_source=state["mem"], kv_mask=state["valid"]) if state["mem"].shape[1] else MemoryRead()
        x = x.detach() if self.config.detach else x
        mem, mem_valid, _, _ = fifo.push(state["mem"], state["valid"], x.to(state["mem"].dtype), self.config.mem_len, valid)
        return read, {"mem": mem, "valid": mem_valid}

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        mem, valid = fifo.reset(state["mem"], state["valid"], mask)
        return {"mem": mem, "valid": valid}

    def check_state(self, state: MemoryState) -> str | None:
        """Why a restored state cannot be this memory's (None if it can)."""
        m = state["mem"].shape[1]
        if state["valid"].shape[1] != m or m > self.config.mem_len:
            return f"mem holds {m} slots and valid {state['valid'].shape[1]}; both must be ≤ mem_len={self.config.mem_len}"
        return None

    def extra_repr(self) -> str:
        return f"mem_len={self.config.mem_len}"
