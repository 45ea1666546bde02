"""kNN retrieval memory (Memorizing Transformers, Wu et al., ICLR 2022) as a backend.

Notation: b batch, n segment length, S store slots held (≤ store_len), k retrieved per query (top_k),
h heads, d head dim, e model dim.

State: ``keys`` (b, S, h·d) L2-normalised content keys, ``values`` (b, S, h·d) content values (both
from the host's own K/V projections, no positions, stored detached), ``valid`` (b, S) bool; one
right-aligned FIFO per sample (:mod:`memory_plugins.fifo`): padding never enters, a reset only marks
slots invalid (their vectors are zeroed).

Read, per layer, head and query, from the store as it was *before* this segment (no future leak):

    score_j = cos(q, k_j)                  over the sample's valid slots j (q, k L2-normalised, as the paper)
    top     = the k best j (torch.topk, exact)
    A_mem   = Σ_{j ∈ top} softmax_j(√d · score_j) v_j            (b, h, n, d)
    out     = (1 − g_h)·A_local + g_h·A_mem                      before W_O (MemoryRead.head_output / head_gate)

√d·cos is the usual q·k/√d for q and k of norm √d (unit RMS per component). A query with no valid
slot (empty store) gets g = 0. The gate g_h = clamp(w_h, 0, 1) with a straight-through gradient and
w_h = 0 at init: exactly the host at init (a sigmoid is never exactly 0, and a smooth [0, 1]-valued
gate that is 0 at init has zero gradient there), yet it trains from the first step and cannot die
below 0 (the gradient of opening it still reaches w_h).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import fifo
from ..interface import HostAttention, MemoryRead, MemoryState
from ..registry import register_memory
from .config import KNNConfig


def open_gate(w: Tensor) -> Tensor:
    """g = clamp(w, 0, 1) in the forward pass, identity gradient (straight-through): (h,)."""
    return w + (w.clamp(0.0, 1.0) - w).detach()


def retrieve(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k attention of ``q`` (b, h, n, d) over a store ``keys`` / ``values`` (b, h, S, d) of normalised
    keys with ``valid`` (b, S). Returns ``A_mem`` (b, h, n, d) and ``hit`` (b, h, n, 1): whether the query
    found any valid slot (where not, ``A_mem`` is 0)."""
    d, slots = q.shape[-1], keys.shape[2]
    score = F.normalize(q.to(keys.dtype), dim=-1) @ keys.transpose(-1, -2)  # (b, h, n, S) cosine
    score = score.masked_fill(~valid[:, None, None, :], float("-inf"))  # (b, h, n, S)
    top, idx = score.topk(min(top_k, slots), dim=-1)  # (b, h, n, k) best first
    found = torch.isfinite(top)  # (b, h, n, k)
    logits = torch.where(found, top * math.sqrt(d), torch.finfo(top.dtype).min)  # (b, h, n, k)
    weights = torch.softmax(logits, dim=-1) * found  # (b, h, n, k) all 0 without a valid slot
    dense = torch.zeros_like(score).scatter(-1, idx, weights)  # (b, h, n, S)
    return dense @ values, found[..., :1]  # (b, h, n, d), (b, h, n, 1)


@register_memory("knn", KNNConfig)
class KNNMemory(nn.Module):
    """kNN retrieval memory backend; its only parameter is the per-head gate ``gate`` (h,)."""

    uses_queries: ClassVar[bool] = True

    def __init__(self, config: KNNConfig, host: HostAttention, shared: nn.ModuleDict) -> None:
        super().__init__()
        if not isinstance(host, HostAttention):
            raise TypeError(f"memory 'knn' needs the host's K/V projections (a HostAttention), got {type(host).__name__}")
        self.config = config
        self.dims = host.dims
        object.__setattr__(self, "host", host)  # not a submodule: the host layer belongs to the model
        self.gate = nn.Parameter(torch.zeros(host.num_heads))  # (h,) w_h: g = clamp(w, 0, 1), closed at init

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        hd = self.dims.num_heads * self.dims.head_dim
        return {
            "keys": torch.zeros(batch_size, 0, hd, device=device, dtype=dtype),  # (b, 0, h·d)
            "values": torch.zeros(batch_size, 0, hd, device=device, dtype=dtype),  # (b, 0, h·d)
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),  # (b, 0)
        }

    def step(self, state: MemoryState, x: Tensor, q: Tensor | None,
             valid: Tensor | None) -> tuple[MemoryRead, MemoryState]:
        keys, values, held = state["keys"], state["values"], state["valid"]  # (b, S, h·d) ×2, (b, S)
        h = self.dims.num_heads
        # empty store: nothing to read; the gate joins memory_aux_loss() at 0 (DDP's default
        # find_unused_parameters=False needs every parameter in each backward), no value or gradient changes
        read = MemoryRead(aux_loss=self.gate.sum() * 0.0)
        if keys.shape[1]:
            if q is None:
                raise ValueError("memory 'knn' needs the layer's queries q (b, h, n, d); the host passed None")
            stored_k = rearrange(keys, "b s (h d) -> b h s d", h=h)  # (b, h, S, d)
            stored_v = rearrange(values, "b s (h d) -> b h s d", h=h)  # (b, h, S, d)
            mem_out, found = retrieve(q, stored_k, stored_v, held, self.config.top_k)  # (b, h, n, d), (b, h, n, 1)
            gate = open_gate(self.gate).to(mem_out.dtype)[None, :, None, None] * found  # (b, h, n, 1)
            read = MemoryRead(head_output=mem_out.to(q.dtype), head_gate=gate.to(q.dtype))
        with torch.no_grad():  # stored without gradients (the paper's non-differentiable memory)
            k, v = self.host.project_kv(x.detach())  # (b, h, n, d) each
        new = torch.cat([rearrange(F.normalize(k, dim=-1), "b h n d -> b n (h d)"),
                         rearrange(v, "b h n d -> b n (h d)")], dim=-1).to(keys.dtype)  # (b, n, 2·h·d)
        both, kept, _, _ = fifo.push(torch.cat([keys, values], dim=-1), held, new, self.config.store_len, valid)
        hd = keys.shape[-1]
        return read, {"keys": both[..., :hd].contiguous(), "values": both[..., hd:].contiguous(), "valid": kept}

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        keys, valid = fifo.reset(state["keys"], state["valid"], mask)
        values, _ = fifo.reset(state["values"], state["valid"], mask)
        return {"keys": keys, "values": values, "valid": valid}

    def check_state(self, state: MemoryState) -> str | None:
        """Why a restored state cannot be this memory's (None if it can)."""
        s = state["keys"].shape[1]
        if state["values"].shape[1] != s or state["valid"].shape[1] != s or s > self.config.store_len:
            return (f"keys hold {s} slots, values {state['values'].shape[1]} and valid {state['valid'].shape[1]}; "
                    f"all must be equal and ≤ store_len={self.config.store_len}")
        return None

    def extra_repr(self) -> str:
        return f"store_len={self.config.store_len}, top_k={self.config.top_k}, heads={self.dims.num_heads}"
