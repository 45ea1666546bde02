"""The per-layer hook a host attention calls, and the controller that owns every layer's state.

Data flow for one segment (see docs/architecture.md):
host attention → ``LayerMemory(x, q)`` → ``backend.read(state)`` (contribution for this segment)
→ ``backend.write(state, x)`` (new state, replacing the old one) → ``MemoryRead`` back to the host.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .interface import AttentionDims, HostAttention, MemoryRead, MemoryState


class LayerMemory:
    """Callable hook bound to one host attention layer; holds no tensors itself.

    Calling it with the layer's attention inputs ``x`` (b, n, e) and content queries ``q``
    (b, h, n, d) reads the memory for this segment and then writes the segment into it.
    Returns ``None`` while memory is disabled: the host then attends exactly as without memory.
    """

    def __init__(self, controller: MemoryController, index: int, name: str, host: HostAttention) -> None:
        self.controller = controller
        self.index = index
        self.name = name
        self.host = host

    def __call__(self, x: Tensor, q: Tensor | None = None) -> MemoryRead | None:
        return self.controller.step(self.index, x, q, self.host)

    def __repr__(self) -> str:
        return f"LayerMemory({self.name!r}, {type(self.controller.layers[self.index]).__name__})"


class MemoryController(nn.Module):
    """One backend per target layer, their per-sample states, and the switches of a wrapped model.

    Parameters live in ``layers`` (one backend per attention layer) and ``shared`` (components that
    all layers use); states live in the plain list ``states`` and never in ``state_dict()``: use
    :meth:`get_state` / :meth:`set_state` to save and restore a stream.
    """

    def __init__(self, backends: list[nn.Module], names: list[str], shared: nn.ModuleDict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(backends)
        self.shared = shared
        self.names = list(names)
        self.states: list[MemoryState | None] = [None] * len(backends)
        self.enabled = True
        self.writing = True
        self.aux_losses: list[Tensor] = []

    def __getstate__(self) -> dict:
        # Aux losses of the last forward hold autograd graphs, which copy.deepcopy and pickle refuse;
        # they belong to that forward only, so a copy starts without them.
        state = self.__dict__.copy()
        state["aux_losses"] = []
        return state

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "MemoryController":
        # ``model.to(device)`` takes the stream's state along (its dtype stays: a float32 memory under
        # a bf16 model is the backend's choice, see its init_state).
        super()._apply(fn, recurse)
        self.states = [
            None if s is None else {k: v.to(fn(v.new_empty(0)).device) for k, v in s.items()} for s in self.states
        ]
        return self

    # -- the hot path -------------------------------------------------------------------------
    def step(self, index: int, x: Tensor, q: Tensor | None, host: HostAttention) -> MemoryRead | None:
        if not self.enabled:
            return None
        backend = self.layers[index]
        state = self._state_for(index, x)
        read = backend.read(state, x, q)
        if read.aux_loss is not None:
            self.aux_losses.append(read.aux_loss)
        if self.writing:
            new_state, aux = backend.write(state, x, host, read)
            self.states[index] = new_state
            if aux is not None:
                self.aux_losses.append(aux)
        return read

    def _state_for(self, index: int, x: Tensor) -> MemoryState:
        state = self.states[index]
        b = x.shape[0]
        if state is None:
            state = self.layers[index].init_state(b, x.device, x.dtype)
            self.states[index] = state
            return state
        held = next(iter(state.values())).shape[0]
        if held != b:
            raise ValueError(
                f"batch size changed from {held} to {b} without a reset: memory is per sample, so call "
                f"reset_memory() to start new streams (layer {self.names[index]!r})"
            )
        if next(iter(state.values())).device != x.device:
            state = {k: v.to(x.device) for k, v in state.items()}
            self.states[index] = state
        return state

    # -- switches ---------------------------------------------------------------------------
    def begin_forward(self) -> None:
        """Called before every forward of the wrapped model: aux losses are per forward."""
        self.aux_losses = []

    def aux_loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses of the last forward (0 if there were none)."""
        if not self.aux_losses:
            p = next(self.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        return torch.stack([a.float() for a in self.aux_losses]).sum()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextmanager
    def frozen(self) -> Iterator[None]:
        previous, self.writing = self.writing, False
        try:
            yield
        finally:
            self.writing = previous

    # -- state management ---------------------------------------------------------------------
    def reset(self, mask: Tensor | None = None) -> None:
        if mask is None:
            self.states = [None] * len(self.layers)
            return
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else repr(mask)
            raise ValueError(f"reset_memory(mask=...) must be a 1-D bool tensor over the batch, got {got}")
        for i, (backend, state) in enumerate(zip(self.layers, self.states)):
            if state is None:
                continue
            b = next(iter(state.values())).shape[0]
            if mask.shape[0] != b:
                raise ValueError(f"reset_memory(mask=...) has {mask.shape[0]} entries but the memory holds {b} samples")
            self.states[i] = backend.reset(state, mask.to(next(iter(state.values())).device))

    def detach(self) -> None:
        """Cut the autograd graph held by the states (truncated BPTT)."""
        self.states = [None if s is None else {k: v.detach() for k, v in s.items()} for s in self.states]

    def get_state(self) -> dict[str, MemoryState | None]:
        """A detached copy of every layer's state, keyed by the host layer's module name."""
        return {
            name: None if s is None else {k: v.detach().clone() for k, v in s.items()}
            for name, s in zip(self.names, self.states)
        }

    def set_state(self, states: dict[str, MemoryState | None]) -> None:
        if set(states) != set(self.names):
            raise ValueError(
                f"set_memory_state: layers {sorted(states)} do not match this model's memory layers {self.names}"
            )
        self.states = [None if states[n] is None else {k: v.clone() for k, v in states[n].items()} for n in self.names]

    def state_size(self) -> int:
        """Total number of elements held in memory state (all layers)."""
        return sum(v.numel() for s in self.states if s is not None for v in s.values())


def dims_of(module: nn.Module) -> AttentionDims:
    """:class:`AttentionDims` of a module that follows the :class:`MemoryAttention` protocol."""
    return AttentionDims(int(module.embed_dim), int(module.num_heads), int(module.head_dim))
