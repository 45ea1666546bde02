"""Per-sample FIFOs of vectors whose valid slots are always a suffix (right-aligned, oldest first).

Notation: b batch, m slots held, n vectors pushed, e vector dim.

Every memory that keeps raw vectors (the XL cache, the compressive memory's two levels, the
∞-former's short-term memory) stores them here. The length m is shared by the batch, but each sample
holds only its own *valid* vectors: invalid positions (padding, slots emptied by a reset) are
squeezed out on every push, so a padded sample's FIFO holds exactly what an unpadded stream of that
sample would hold, right-aligned, with invalid slots only on the left. A memory that sits just before
the segment (positions -m … -1) then gives every valid vector the same relative position it would
have had without padding.

Under ``torch.compile`` (while Dynamo traces) a push treats its FIFO as full from the start, of
invalid slots on the left: it returns ``capacity`` slots and evicts ``n``, valid or not. The same FIFO
and the same valid vectors, at shapes fixed from the first segment on, so the memory filling up is no
recompile. Eager pushes grow the FIFO as before; both forms are valid states for either mode.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact(x: Tensor, valid: Tensor, *, valid_first: bool = False) -> tuple[Tensor, Tensor]:
    """Move each sample's valid vectors to the end (or the start) keeping their order.

    ``x`` (b, L, e), ``valid`` (b, L) → the same shapes; invalid slots are zeroed (so a NaN that sat in
    a padded slot never reaches an attention product, where 0 · NaN would still be NaN).
    """
    key = (valid if not valid_first else ~valid).to(torch.int8)  # (b, L) 0 sorts first
    order = torch.argsort(key, dim=1, stable=True)  # (b, L)
    valid = valid.gather(1, order)  # (b, L)
    x = x.gather(1, order[..., None].expand_as(x))  # (b, L, e)
    return torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device)), valid


def push(
    mem: Tensor, valid: Tensor, x: Tensor, capacity: int, x_valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Append ``x`` (b, n, e) and keep the newest ``capacity`` valid vectors of each sample.

    ``mem`` (b, m, e) / ``valid`` (b, m) must be right-aligned (as every push leaves them);
    ``x_valid`` (b, n) marks which new vectors hold data (None: all of them, and then no reordering is
    needed). Returns ``(mem, valid, evicted, evicted_valid)``: the new FIFO (b, min(m + n, capacity), e)
    and what fell out of it, oldest first and right-aligned too, so that a second-level memory can
    take each valid vector exactly once.
    """
    if x_valid is None:
        x_valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (b, n)
        joined = torch.cat([mem, x], dim=1)  # (b, m + n, e) already right-aligned
        joined_valid = torch.cat([valid, x_valid], dim=1)  # (b, m + n)
    else:
        joined, joined_valid = compact(torch.cat([mem, x], dim=1), torch.cat([valid, x_valid.to(torch.bool)], dim=1))
    if torch.compiler.is_compiling():  # fixed shapes: as if the FIFO had been full (of invalid slots) already
        joined, joined_valid = pad_left(joined, joined_valid, capacity + x.shape[1])  # (b, capacity + n, e), …
    cut = max(joined.shape[1] - capacity, 0)
    # Contiguous copies: a kept slice of ``joined`` would pin it and change strides (a recompile).
    return (joined[:, cut:].contiguous(), joined_valid[:, cut:].contiguous(), joined[:, :cut], joined_valid[:, :cut])


def pad_left(mem: Tensor, valid: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """``mem`` (b, m, e), ``valid`` (b, m) with ``length - m`` invalid zero slots prepended: (b, length, e),
    (b, length). The same FIFO (valid vectors stay right-aligned) at a fixed length.

    Why: under ``torch.compile`` every FIFO is held at its capacity from its first push, so the state's
    shapes stop changing after the first segments (each new shape would be a recompile)."""
    b, m = valid.shape
    if m >= length:
        return mem, valid
    zeros = mem.new_zeros(b, length - m, *mem.shape[2:])  # (b, length - m, e)
    return torch.cat([zeros, mem], dim=1), torch.cat([valid.new_zeros(b, length - m), valid], dim=1)


def reset(mem: Tensor, valid: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Empty the samples where ``mask`` (b,) is True: zero their vectors (NaN/Inf included), mark
    their slots invalid. The other samples stay bit-identical."""
    mask = mask.to(torch.bool)  # (b,)
    zeros = torch.zeros((), dtype=mem.dtype, device=mem.device)
    return torch.where(mask[:, None, None], zeros, mem), valid & ~mask[:, None]


# Names of 0.1 (they lived in memory_plugins.xl): kept as aliases.
fifo_push = push
fifo_reset = reset
