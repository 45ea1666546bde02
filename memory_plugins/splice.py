"""What every adapter does to splice a memory read into a host's attention, written once.

Notation: b batch, n new tokens of this call, c cached tokens of the current segment, m memory
slots, h query heads, k kv heads, d head dim, e model dim.

An adapter is a small per-architecture table (where the attention modules are, how they project,
how they rotate) plus these steps, which are the same for every host:

1. ``valid``: which of the n positions are real tokens, from the host's padding mask (never padding
   into a memory).
2. ``read = hook(x, q, valid, write=not cached)``: one memory step; under a kv cache the segment is
   only read (the cache already holds it, the memory holds the segments before it).
3. the memory's K/V sources, projected with the host's own weights, repeated to the query heads
   (:func:`repeat_kv`), rotated to positions just before the segment (:func:`memory_positions`),
   masked per sample (:func:`memory_key_mask`);
4. the read's per-head result mixed into the attention output before the output projection
   (:func:`mix_heads`), and its output added after it (:func:`add_output`);
5. the read handed from a pre-hook to a post-hook through the controller (``hook.take_read()``),
   dropped when a forward fails; every handle removed by one :class:`Handles` object.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn


def repeat_kv(t: Tensor, num_heads: int, layout: str = "interleave") -> Tensor:
    """Keys or values per kv head (b, k, m, d) → per query head (b, h, m, d).

    ``"interleave"``: kv head i serves query heads i·r … i·r + r − 1 (Llama-style GQA);
    ``"tile"``: kv head i serves query heads i, i + k, i + 2k, … (x-transformers).
    """
    r = num_heads // t.shape[1]
    if r == 1:
        return t
    if layout == "interleave":
        return t.repeat_interleave(r, dim=1)  # (b, h, m, d)
    if layout == "tile":
        return t.repeat(1, r, 1, 1)  # (b, h, m, d)
    raise ValueError(f"repeat_kv: layout must be 'interleave' or 'tile', got {layout!r}")


def first_valid(valid: Tensor | None, b: int, device: torch.device) -> Tensor:
    """Index of each sample's first real token (0 without padding): (b,)."""
    if valid is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    return torch.where(valid.any(dim=1), valid.to(torch.int8).argmax(dim=1), 0).long()  # (b,)


def memory_positions(m: int, start: Tensor) -> Tensor:
    """Positions of m memory slots just before a segment whose first real token sits at ``start``
    (b,): (b, m), the newest slot at ``start − 1``. Memories keep each sample's valid vectors
    right-aligned, so every valid slot gets the distance it would have in an unpadded stream."""
    return start[:, None] + torch.arange(-m, 0, device=start.device)  # (b, m)


def memory_key_mask(kv_mask: Tensor | None, own: Tensor | None, b: int, m: int, length: int,
                    device: torch.device) -> Tensor:
    """Key mask over [memory (m) ; the host's own L keys]: (b, m + L) bool, True = may attend."""
    keep = kv_mask if kv_mask is not None else torch.ones(b, m, dtype=torch.bool, device=device)  # (b, m)
    own = own.to(torch.bool) if own is not None else torch.ones(b, length, dtype=torch.bool, device=device)
    return torch.cat([keep, own.expand(b, length)], dim=-1)  # (b, m + L)


def add_output(out: Tensor, read: Any, valid: Tensor | None = None) -> Tensor:
    """``out`` (b, n, e) plus the read's output (Eq. 12: Z = Z_T + Z_LTM), zero at padded positions."""
    if read is None or read.output is None:
        return out
    extra = read.output.to(out.dtype)  # (b, n, e)
    if valid is not None:
        extra = torch.where(valid[..., None].to(torch.bool), extra, 0.0)  # selected: a NaN there stays out
    return out + extra


def mix_heads(attn: Tensor, read: Any, valid: Tensor | None = None) -> Tensor:
    """Per-head attention output ``attn`` (b, h, n, d), before the output projection, mixed with the read's
    ``head_output`` (b, h, n, d) by its gate g (``head_gate`` (b or 1, h, n or 1, 1); None: g = 1):
    ``attn + g·(head_output − attn)``, i.e. ``(1 − g)·attn + g·head_output``, exactly ``attn`` where g = 0
    and at padded positions (``valid`` (b, n) False). Unchanged when the read has no ``head_output``."""
    if read is None or read.head_output is None:
        return attn
    extra = read.head_output.to(attn.dtype)  # (b, h, n, d)
    gate = read.head_gate.to(attn.dtype) if read.head_gate is not None else attn.new_ones(())  # (b|1, h, n|1, 1)
    if valid is not None:
        gate = gate * valid[:, None, :, None].to(attn.dtype)  # (b, h, n, 1)
    return attn + gate * (extra - attn)  # (b, h, n, d)


def call_failed(output: Any) -> bool:
    """In a forward hook registered with ``always_call=True``: whether the forward raised (torch then
    calls the hook with no output, while handling the exception)."""
    return output is None and sys.exc_info()[0] is not None


class InnerCallBegin:
    """Forward pre-hook on a module that runs every memory layer (an HF backbone, a ViT's ``blocks``):
    called on its own, its call is one transaction of the memory (:meth:`MemoryController.enter_inner`).
    An object, not a closure, so that ``copy.deepcopy`` of a wrapped model hooks the copy's controller."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def __call__(self, module: nn.Module, *args: Any) -> None:
        self.controller.enter_inner(self)


class InnerCallEnd:
    """The forward hook (``always_call=True``) paired with an :class:`InnerCallBegin`: commits the
    transaction its call began, or keeps nothing if the call raised."""

    def __init__(self, begin: InnerCallBegin) -> None:
        self.begin = begin

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> None:
        self.begin.controller.exit_inner(self.begin, call_failed(rest[-1]))


class Handles:
    """Removes everything an adapter installed: hook handles and cleanup callbacks. An object rather
    than a closure, so that ``copy.deepcopy`` of a wrapped model removes the copy's own hooks."""

    def __init__(self, handles: list[Any] | None = None, cleanups: list[Callable[[], None]] | None = None) -> None:
        self.handles = list(handles or [])
        self.cleanups = list(cleanups or [])

    def __call__(self) -> None:
        for h in self.handles:
            h.remove()
        for fn in self.cleanups:
            fn()
