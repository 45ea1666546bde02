"""The contract between a host attention layer and a memory backend.

Notation: b batch, n segment length, m memory length, h heads, d head dim, e = h·d model dim.

A *host* is one attention layer of somebody's transformer. Per segment it hands the memory the
layer's attention inputs ``x`` (b, n, e): the vectors its K/V projections see (after the pre-norm, if
any). A *backend* turns that stream into a fixed-size, per-sample *state* and, on each read, gives back
one or both of:

(a) ``kv_source`` (b, m, e): extra source vectors that the host projects with its *own* K/V weights and
    prepends to the segment's keys/values (Transformer-XL cache, compressive memory), with
    ``kv_mask`` (b, m) marking which of them hold data for each sample;
(b) ``output`` (b, n, e): an additive term for the attention block's output, computed from the layer's
    queries (the ∞-former's continuous long-term memory, Eq. 12).

State is a plain ``dict[str, Tensor]`` of batch-first tensors, so it can be saved with ``torch.save``,
reset per sample and moved across devices without knowing the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

MemoryState = dict[str, Tensor]
"""Per-layer memory state: batch-first tensors (dim 0 = b) named by the backend."""


@dataclass(frozen=True)
class AttentionDims:
    """Shape of one host attention layer, as a memory backend needs to know it."""

    embed_dim: int  # e: width of the attention inputs x
    num_heads: int  # h
    head_dim: int  # d (h·d need not equal e, e.g. x-transformers' dim_head)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionDims.{name} must be a positive int, got {value!r}")


@dataclass
class HostAttention:
    """What a backend may call on the host layer, besides reading its inputs.

    ``project_q(x)`` (b, n, e) -> (b, h, n, d) and ``project_kv(x)`` (b, m, e) -> two (b, h, m, d):
    the layer's *content* projections (no positional rotation or bias). The compressive memory uses
    them for its attention-reconstruction loss.
    """

    dims: AttentionDims
    project_q: Callable[[Tensor], Tensor]
    project_kv: Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class MemoryRead:
    """What a read hands back to the host layer for the current segment."""

    kv_source: Tensor | None = None  # (b, m, e) vectors to prepend, oldest first
    kv_mask: Tensor | None = None  # (b, m) bool, True where kv_source holds data
    output: Tensor | None = None  # (b, n, e) added to the attention block's output
    aux_loss: Tensor | None = None  # scalar, already weighted by the backend's config
    info: dict[str, Tensor] = field(default_factory=dict)  # diagnostics (e.g. μ, σ²); never needed


@runtime_checkable
class MemoryBackend(Protocol):
    """One layer's memory. Implementations are ``nn.Module`` s holding parameters, never state.

    Every method is a pure function of its arguments: the state goes in and a new state comes out,
    so one backend instance can serve any number of independent streams.
    """

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        """An empty memory for ``batch_size`` samples."""
        ...

    def read(self, state: MemoryState, x: Tensor, q: Tensor | None) -> MemoryRead:
        """Memory contribution for the segment ``x`` (b, n, e) with host queries ``q`` (b, h, n, d).

        Must not look at ``x`` beyond what causality allows: position i of the output may depend on
        the state and on ``x[:, : i + 1]`` only.
        """
        ...

    def write(
        self, state: MemoryState, x: Tensor, host: HostAttention | None, read: MemoryRead | None
    ) -> tuple[MemoryState, Tensor | None]:
        """Store the segment ``x`` (b, n, e); return the new state and an optional aux loss.

        ``read`` is the read just made for this segment (sticky memories use its attention).
        """
        ...

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        """Empty the memory of the samples where ``mask`` (b,) is True; others stay bit-identical."""
        ...


@runtime_checkable
class MemoryAttention(Protocol):
    """The protocol a custom decoder's attention module satisfies to take any memory.

    * ``num_heads``, ``head_dim`` and ``embed_dim`` describe the layer;
    * ``project_q`` / ``project_kv`` are its content projections (see :class:`HostAttention`);
    * ``memory_hook`` is ``None`` until :func:`memory_plugins.wrap` sets it. In ``forward`` the module
      calls ``read = self.memory_hook(x, q)`` when it is set; a ``None`` read means "attend as usual".
      Otherwise it prepends ``project_kv(read.kv_source)`` to its keys/values (masked with
      ``read.kv_mask``; the memory sits just before the segment, so with rotary or relative
      positions the memory vectors get positions ``-m … -1``) and adds ``read.output`` to its output.

    See ``memory_plugins/models/reference.py`` for a ~100-line decoder that does exactly this.
    """

    num_heads: int
    head_dim: int
    embed_dim: int
    memory_hook: Callable[[Tensor, Tensor | None], MemoryRead | None] | None

    def project_q(self, x: Tensor) -> Tensor: ...

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


def is_memory_attention(module: nn.Module) -> bool:
    """True if ``module`` satisfies :class:`MemoryAttention` (duck-typed, no inheritance needed)."""
    return all(hasattr(module, a) for a in ("num_heads", "head_dim", "embed_dim", "memory_hook")) and all(
        callable(getattr(module, a, None)) for a in ("project_q", "project_kv")
    )
