"""The contract between a host attention layer and a memory backend.

Notation: b batch, n segment length, m memory length, h heads, d head dim, e model dim.

A *host* is one attention layer of somebody's transformer. Per segment it hands the memory the
layer's attention inputs ``x`` (b, n, e) (the vectors its K/V projections see, after any pre-norm),
its content queries ``q`` (b, h, n, d) where the memory uses them, and ``valid`` (b, n): which
positions hold real tokens (padding never enters a memory). A *backend* makes one call per segment,

    read, new_state = backend.step(state, x, q, valid)

where ``read`` is this segment's contribution, one or both of

(a) ``kv_source`` (b, m, e): extra source vectors that the host projects with its *own* K/V weights and
    prepends to the segment's keys/values (Transformer-XL cache, compressive memory), with
    ``kv_mask`` (b, m) marking which of them hold data for each sample;
(b) ``output`` (b, n, e): an additive term for the attention block's output, computed from the layer's
    queries (the ∞-former's continuous long-term memory, Eq. 12);
(c) ``head_output`` (b, h, n, d) with ``head_gate`` (b or 1, h, n or 1, 1): a per-head, per-query result
    mixed into the host's attention *before* its output projection, ``(1 − g)·attn + g·head_output``
    (the kNN memory's learned gate, Memorizing Transformers; :func:`memory_plugins.splice.mix_heads`);

and ``new_state`` is the memory after taking in the segment. The controller stages it and commits the
new states of all layers only when the whole model forward returns (:mod:`memory_plugins.controller`).

State is a plain ``dict[str, Tensor]`` of batch-first tensors, so it can be saved with ``torch.save``,
reset per sample and moved across devices without knowing the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol, runtime_checkable

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
    """One host attention layer as a backend sees it: its dims and its content projections.

    ``project_q(x)`` (b, n, e) -> (b, h, n, d) and ``project_kv(x)`` (b, m, e) -> two (b, h, m, d):
    the layer's *content* projections (no positional rotation or bias; kv repeated to every query
    head). A backend receives this once, at construction (the compressive memory's reconstruction
    loss projects with them). ``embed_dim`` / ``num_heads`` / ``head_dim`` read through to ``dims``.
    """

    dims: AttentionDims
    project_q: Callable[[Tensor], Tensor]
    project_kv: Callable[[Tensor], tuple[Tensor, Tensor]]

    @property
    def embed_dim(self) -> int:
        return self.dims.embed_dim

    @property
    def num_heads(self) -> int:
        return self.dims.num_heads

    @property
    def head_dim(self) -> int:
        return self.dims.head_dim


@dataclass
class MemoryRead:
    """What a step hands back to the host layer for the current segment."""

    kv_source: Tensor | None = None  # (b, m, e) vectors to prepend, oldest first
    kv_mask: Tensor | None = None  # (b, m) bool, True where kv_source holds data
    output: Tensor | None = None  # (b, n, e) added to the attention block's output
    head_output: Tensor | None = None  # (b, h, n, d) mixed into the per-head attention output before W_O
    head_gate: Tensor | None = None  # (b or 1, h, n or 1, 1) its weight g in [0, 1]; None: g = 1
    aux_loss: Tensor | None = None  # scalar, already weighted by the backend's config
    info: dict[str, Tensor] = field(default_factory=dict)  # diagnostics (e.g. μ, σ²); never needed


@runtime_checkable
class MemoryBackend(Protocol):
    """One layer's memory. Implementations are ``nn.Module`` s holding parameters, never state.

    Built once per host layer as ``Backend(config, host, shared)`` (``host``: :class:`HostAttention`;
    ``shared``: an ``nn.ModuleDict`` for components common to all layers). ``step`` is a pure
    function of its arguments: the state goes in and a new state comes out, so one backend instance
    can serve any number of independent streams, and a caller may discard the new state (frozen
    memory, a failed forward) without the backend knowing.
    """

    uses_queries: ClassVar[bool]  # step() needs q; hosts skip projecting it otherwise

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        """An empty memory for ``batch_size`` samples."""
        ...

    def step(
        self, state: MemoryState, x: Tensor, q: Tensor | None, valid: Tensor | None
    ) -> tuple[MemoryRead, MemoryState]:
        """This segment's read and the memory after it.

        ``x`` (b, n, e) attention inputs, ``q`` (b, h, n, d) content queries (None unless
        ``uses_queries``), ``valid`` (b, n) bool or None (all valid). The read must not depend on
        ``x`` beyond causality (position i may see the state and ``x[:, : i + 1]``); invalid
        positions must not enter the new state.
        """
        ...

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        """Empty the samples where ``mask`` (b,) is True (NaN/Inf cleared: the sample equals a fresh
        stream); the others stay bit-identical."""
        ...


@runtime_checkable
class MemoryAttention(Protocol):
    """The protocol a custom decoder's attention module satisfies to take any memory.

    * ``num_heads``, ``head_dim`` and ``embed_dim`` describe the layer;
    * ``project_q`` / ``project_kv`` are its content projections (see :class:`HostAttention`);
    * ``memory_hook`` is ``None`` until :func:`memory_plugins.wrap` sets it. In ``forward`` the module
      calls ``read = self.memory_hook(x, q, valid)`` when it is set (``valid`` (b, n) bool marks real
      tokens, None if the batch has no padding); a ``None`` read means "attend as usual". Otherwise it
      prepends ``project_kv(read.kv_source)`` to its keys/values (masked with ``read.kv_mask``; the
      memory sits just before the segment, so with rotary or relative positions the memory vectors
      get positions ``-m … -1``), mixes ``read.head_output`` into its per-head attention output before
      the output projection (:func:`memory_plugins.splice.mix_heads`) and adds ``read.output`` to its output.

    See ``memory_plugins/models/reference.py`` for a ~100-line decoder that does exactly this.
    """

    num_heads: int
    head_dim: int
    embed_dim: int
    memory_hook: Callable[..., MemoryRead | None] | None

    def project_q(self, x: Tensor) -> Tensor: ...

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


def is_memory_attention(module: nn.Module) -> bool:
    """True if ``module`` satisfies :class:`MemoryAttention` (duck-typed, no inheritance needed)."""
    return all(hasattr(module, a) for a in ("num_heads", "head_dim", "embed_dim", "memory_hook")) and all(
        callable(getattr(module, a, None)) for a in ("project_q", "project_kv")
    )
