"""The controller that owns every layer's memory state, and the hook a host attention layer calls.

Data flow for one forward of a wrapped model (one segment; see docs/architecture.md):

    base-model pre-hook   → controller.begin()          new transaction: nothing staged, no reads
    host attention layer  → hook(x, q, valid)           = controller.step(i, …)
                              read, new = backend.step(committed[i], x, q, valid)
                              staged[i] = new           (unless frozen / read-only)
    base-model post-hook  → controller.commit()         committed[i] = staged[i] for every layer

An exception anywhere in the forward (KeyboardInterrupt included) never reaches ``commit``: the
staged states are dropped by the next ``begin``, so the memory is exactly what it was before the
failed call, and a retry equals a clean run.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn

from .graph_ops import copy_out
from .interface import AttentionDims, HostAttention, MemoryRead, MemoryState

STATE_FORMAT = 2  # version of the dict memory_state() returns
MODEL_CALL = "model call"  # the owner of a transaction that the model's own hooks began (MemoryController.begin)


class MemoryHook:
    """Callable bound to one host attention layer; holds no tensors itself.

    ``hook(x, q=None, valid=None, write=True)`` with the layer's attention inputs ``x`` (b, n, e),
    its content queries ``q`` (b, h, n, d) (projected here when the memory needs them and the host
    did not pass them), and ``valid`` (b, n) bool (None: no padding). Returns this segment's
    :class:`MemoryRead`, or ``None`` while the memory is disabled: the host then attends exactly as
    without memory. ``write=False`` reads without writing (a kv-cached decoding step).
    """

    def __init__(self, controller: MemoryController, index: int, name: str, host: HostAttention) -> None:
        self.controller = controller
        self.index = index
        self.name = name
        self.host = host

    def __call__(self, x: Tensor, q: Tensor | None = None, valid: Tensor | None = None, *,
                 write: bool = True) -> MemoryRead | None:
        return self.controller.step(self.index, x, q, valid, write=write)

    @property
    def enabled(self) -> bool:
        return self.controller.enabled

    def take_read(self) -> MemoryRead | None:
        """This forward's read of the layer, handed from a pre-hook to a post-hook (and then dropped)."""
        return self.controller.reads.pop(self.index, None)

    def __repr__(self) -> str:
        return f"MemoryHook({self.name!r}, {type(self.controller.backends[self.index]).__name__})"


LayerMemory = MemoryHook  # name of 0.1


def config_fingerprint(config: Any, *, legacy: bool = False) -> str:
    """A short hash of a memory config's name and options: states are only valid for the same one.

    An option added in a later version (``metadata={"fingerprint_if_set": True}``) counts only when it
    differs from its default, so that states saved before it existed keep their fingerprint. An option
    that cannot change a state (``metadata={"fingerprint": False}``: a cache size, a loss weight) never
    counts; ``legacy`` counts those that states saved before 2026-11-28 hashed (``config.NOT_STATE``)."""
    options = {f.name: getattr(config, f.name) for f in fields(config)
               if (f.metadata.get("fingerprint", True) or legacy and f.metadata.get("legacy_fingerprint"))
               and not (f.metadata.get("fingerprint_if_set") and getattr(config, f.name) == f.default)}
    text = json.dumps({"memory": type(config).name, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class MemoryController(nn.Module):
    """One backend per target layer, their per-sample states, and the switches of a wrapped model.

    Parameters live in ``backends`` (one per attention layer) and ``shared`` (components all layers
    use); committed states live in the plain list ``states`` and never in ``state_dict()``: use
    :meth:`get_state` / :meth:`set_state` to save and restore a stream.
    """

    def __init__(self, backends: list[nn.Module], names: list[str], shared: nn.ModuleDict,
                 config: Any = None) -> None:
        super().__init__()
        self.backends = nn.ModuleList(backends)
        self.shared = shared
        self.names = list(names)
        self.config = config
        self.memory_name = type(config).name if config is not None else ""
        self.fingerprint = config_fingerprint(config) if config is not None else ""
        # what a state may carry: this fingerprint, or the one states saved before NOT_STATE hashed
        self.accepted = {self.fingerprint, config_fingerprint(config, legacy=True) if config is not None else ""}
        self.states: list[MemoryState | None] = [None] * len(backends)  # committed
        self.staged: dict[int, MemoryState] = {}
        self.reads: dict[int, MemoryRead] = {}
        self.owner: object | None = None  # who began the open transaction (MODEL_CALL, or an inner call's hook); None: none
        self.last_index = -1  # the layer stepped last outside any transaction (a new call starts at or below it)
        self.commit_deferred = False  # the wrapper's forward commits once the base model's call has returned
        self.expand_for_generation = False  # inside MemoryModel.generate: beams / sequences read their sample's memory
        self.expanded: dict[int, MemoryState] = {}  # those rows' states, per layer, for one generate() call
        self.enabled = True
        self.writing = True
        self.state_dtype = torch.float32  # dtype of the host's activations, for state templates
        self.aux_losses: list[Tensor] = []
        self.register_load_state_dict_pre_hook(_rename_layers_prefix)

    @property
    def layers(self) -> nn.ModuleList:
        """The backends (name of 0.1)."""
        return self.backends

    def __getstate__(self) -> dict:
        # Aux losses and reads of the last forward hold autograd graphs, which copy.deepcopy and
        # pickle refuse; they belong to that forward only, so a copy starts without them.
        state = self.__dict__.copy()
        state["aux_losses"], state["reads"], state["staged"], state["expanded"] = [], {}, {}, {}
        state["commit_deferred"] = state["expand_for_generation"] = False
        state["owner"], state["last_index"] = None, -1
        return state

    def __setstate__(self, state: dict) -> None:
        state = {"commit_deferred": False, "expand_for_generation": False, "expanded": {}, "owner": None,
                 "last_index": -1, **state}  # pickled before 0.2's last fixes
        state.setdefault("accepted", {state.get("fingerprint", "")})
        state.pop("in_forward", None)  # pickled before 0.3: now derived from owner
        super().__setstate__(state)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "MemoryController":
        # ``model.to(device / dtype)`` takes the stream's state along: devices follow, and floating
        # tensors take the dtype that init_state gives for the new host dtype (the ∞-former keeps its
        # coefficients in float32 under a bf16 model).
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(0, dtype=self.state_dtype))
        self.state_dtype = probe.dtype if probe.is_floating_point() else self.state_dtype
        self.states = [None if s is None else self._conform(i, s, probe.device) for i, s in enumerate(self.states)]
        self.staged, self.reads = {}, {}
        return self

    def _conform(self, index: int, state: MemoryState, device: torch.device) -> MemoryState:
        """``state`` moved to ``device`` with its floating tensors in the dtypes of a fresh state."""
        b = next(iter(state.values())).shape[0]
        template = self.backends[index].init_state(b, device, self.state_dtype)
        return {k: v.to(device=device, dtype=template[k].dtype if k in template else v.dtype)
                for k, v in state.items()}

    # -- transactions ---------------------------------------------------------------------------
    @property
    def in_forward(self) -> bool:
        """Whether a transaction is open (a forward has begun and not yet committed or aborted)."""
        return self.owner is not None

    def begin(self, owner: object = MODEL_CALL) -> None:
        """Start a forward: drop whatever an interrupted forward staged, and last forward's reads.
        ``owner``: who will end it (:data:`MODEL_CALL` for the model's own hooks, see :meth:`enter_inner`)."""
        self.staged, self.reads, self.aux_losses = {}, {}, []
        self.owner = owner
        self.last_index = len(self.backends)  # a layer stepped outside a transaction after this one starts a new call

    def commit(self) -> None:
        """The forward returned: every layer's staged state becomes its state, all at once.

        In a compiled forward the states are copied out of the graph first (:func:`.graph_ops.copy_out`):
        under CUDA graphs a graph's outputs are overwritten by its next replay, and the next step reads
        these."""
        compiling = torch.compiler.is_compiling()
        for i, s in self.staged.items():
            if compiling:
                s = dict(zip(s, copy_out(list(s.values()))))
            self.states[i] = s
        self.staged = {}
        self.owner = None

    def abort(self) -> None:
        """The forward failed: nothing it staged is kept, and no read survives it."""
        self.staged, self.reads = {}, {}
        self.owner = None

    def enter_inner(self, owner: object) -> bool:
        """An inner module that runs every memory layer (an HF backbone, a ViT's blocks) was called: on its
        own (hidden states, features) its call is one transaction, as a call of the model is; inside the
        model's call it is part of that one. Returns whether ``owner`` began a transaction (and must end
        it with :meth:`exit_inner`)."""
        if self.owner is MODEL_CALL:
            return False
        self.begin(owner)
        return True

    def exit_inner(self, owner: object, failed: bool) -> None:
        """End the transaction that ``owner`` began: commit, or keep nothing if its call raised."""
        if self.owner is owner:
            self.abort() if failed else self.commit()

    begin_forward = begin  # name of 0.1

    # -- the hot path -------------------------------------------------------------------------
    def step(self, index: int, x: Tensor, q: Tensor | None, valid: Tensor | None,
             *, write: bool = True) -> MemoryRead | None:
        if not self.enabled:
            return None
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            raise NotImplementedError(
                f"memory layer {self.names[index]!r} was run during a backward pass: activation checkpointing "
                "(torch.utils.checkpoint, checkpoint_wrapper) re-runs the layers it wraps in backward, which would "
                "read the memory a second time, after this segment has already advanced it, and write it again. "
                "Checkpoint only blocks without a memory, or train without checkpointing"
            )
        backend = self.backends[index]
        b, n = x.shape[:2]
        if n == 0:  # an empty segment: nothing to read with, nothing to write (the host runs as without memory)
            return None
        if valid is not None:
            if not isinstance(valid, Tensor) or tuple(valid.shape) != (b, n):
                got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
                raise ValueError(f"memory layer {self.names[index]!r}: valid must be a (batch, segment) = {(b, n)} "
                                 f"mask of real tokens, got {got}")
            valid = valid.to(device=x.device, dtype=torch.bool)
        state = self._state_for(index, x)
        if getattr(backend, "uses_queries", True) and q is None:
            q = backend.host.project_q(x) if getattr(backend, "host", None) is not None else None
        if not self.in_forward:  # layers called one by one, outside any transaction: a new call starts
            if index <= self.last_index:  # at or below the layer stepped last (its aux losses replace the last call's)
                self.aux_losses = []
            self.last_index = index
        read, new_state = backend.step(state, x, q, valid)
        if read.aux_loss is not None:
            self.aux_losses.append(read.aux_loss)
        if write and self.writing:
            if self.in_forward:
                self.staged[index] = new_state
            else:  # called outside a forward of the wrapped model: nothing to wait for
                self.states[index] = new_state
        self.reads[index] = read
        return read

    def _state_for(self, index: int, x: Tensor) -> MemoryState:
        state = self.states[index]
        b = x.shape[0]
        if state is None:
            return self.backends[index].init_state(b, x.device, x.dtype)
        if next(iter(state.values())).device != x.device:
            state = {k: v.to(x.device) for k, v in state.items()}
            self.states[index] = state
        held = next(iter(state.values())).shape[0]
        if held != b and self.expand_for_generation and not self.writing and b % held == 0:
            expanded = self.expanded.get(index)  # each sample's memory, once per row of it (HF's repeat_interleave order)
            if expanded is None or next(iter(expanded.values())).shape[0] != b:
                expanded = {k: v.repeat_interleave(b // held, dim=0) for k, v in state.items()}
                self.expanded[index] = expanded
            return expanded
        if held != b:
            raise ValueError(
                f"batch size changed from {held} to {b} without a reset: memory is per sample, so call "
                f"reset_memory() to start new streams (layer {self.names[index]!r})"
            )
        return state

    # -- switches ---------------------------------------------------------------------------
    def aux_loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses of the last forward (0 if there were none)."""
        if not self.aux_losses:
            p = next(self.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        return torch.stack([a.float() for a in self.aux_losses]).sum()

    def disabled(self) -> ContextManager[None]:
        return self._switched("enabled", False)

    def frozen(self) -> ContextManager[None]:
        return self._switched("writing", False)

    @contextmanager
    def _switched(self, name: str, value: bool) -> Iterator[None]:
        """Set the switch ``name`` to ``value`` inside the block, and back to what it was after."""
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)

    # -- state management ---------------------------------------------------------------------
    def reset(self, mask: Tensor | None = None) -> None:
        self.staged, self.reads = {}, {}
        if mask is None:
            self.states = [None] * len(self.backends)
            return
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else repr(mask)
            raise ValueError(f"reset_memory(mask=...) must be a 1-D bool tensor over the batch, got {got}")
        for i, (backend, state) in enumerate(zip(self.backends, self.states)):
            if state is None:
                continue
            b = next(iter(state.values())).shape[0]
            if mask.shape[0] != b:
                raise ValueError(f"reset_memory(mask=...) has {mask.shape[0]} entries but the memory holds {b} samples")
            self.states[i] = backend.reset(state, mask.to(next(iter(state.values())).device))

    def detach(self) -> None:
        """Cut the autograd graph held by the states (truncated BPTT)."""
        self.states = [None if s is None else {k: v.detach() for k, v in s.items()} for s in self.states]

    def get_state(self) -> dict[str, Any]:
        """A detached copy of every layer's state, with what it belongs to (see :meth:`set_state`)."""
        return {
            "format": STATE_FORMAT,
            "memory": self.memory_name,
            "fingerprint": self.fingerprint,
            "layers": {
                name: None if s is None else {k: v.detach().clone() for k, v in s.items()}
                for name, s in zip(self.names, self.states)
            },
        }

    def set_state(self, states: dict[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`get_state`'s output after checking every layer, key, shape, dtype and value.

        ``strict=False`` accepts a state saved under other options of the same memory (the shapes are
        still checked). Floating tensors are converted to this model's state dtypes and device.
        A 0.1 state (a plain ``{layer: state}`` dict) is accepted too.
        """
        if not isinstance(states, dict):
            raise ValueError(f"set_memory_state: expected the dict memory_state() returns, got {type(states).__name__}")
        if "layers" in states and "format" in states:
            fmt, name, fp = states.get("format"), states.get("memory"), states.get("fingerprint")
            if fmt != STATE_FORMAT:
                raise ValueError(f"set_memory_state: state format {fmt!r} is not supported (expected {STATE_FORMAT})")
            if name != self.memory_name:
                raise ValueError(f"set_memory_state: the state is of memory {name!r}, this model has {self.memory_name!r}")
            if strict and fp not in self.accepted:
                raise ValueError(
                    f"set_memory_state: the state was saved under other options of memory {name!r} (config fingerprint "
                    f"{fp} vs this model's {self.fingerprint}); pass strict=False to load it anyway")
            layers = states["layers"]
        else:
            layers = states
        if not isinstance(layers, dict) or set(layers) != set(self.names):
            found = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise ValueError(f"set_memory_state: layers {found} do not match this model's memory layers {self.names}")
        new: list[MemoryState | None] = []
        batch: int | None = None
        for i, name in enumerate(self.names):
            state = layers[name]
            if state is None:
                new.append(None)
                continue
            checked, b = self._check_layer_state(i, name, state, batch)
            batch = b
            new.append(checked)
        self.states, self.staged, self.reads = new, {}, {}

    def _check_layer_state(self, index: int, name: str, state: Any, batch: int | None) -> tuple[MemoryState, int]:
        where = f"set_memory_state: layer {name!r}"
        if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{where}: expected a non-empty dict of tensors, got {type(state).__name__}")
        b = next(iter(state.values())).shape[0] if next(iter(state.values())).dim() else -1
        if batch is not None and b != batch:
            raise ValueError(f"{where}: batch size {b} differs from the other layers' {batch}")
        p = next(self.parameters(), None)
        device = p.device if p is not None else next(iter(state.values())).device
        backend = self.backends[index]
        template = backend.init_state(max(b, 1), device, self.state_dtype)
        # Keys a backend added later (``optional_state_keys``) may be missing from an older state: fresh.
        missing = set(template) - set(state)
        if missing and missing <= set(getattr(backend, "optional_state_keys", ())) and b > 0:
            fresh = backend.init_state(b, device, self.state_dtype)
            state = {**state, **{k: fresh[k] for k in missing}}
        if set(state) != set(template):
            raise ValueError(f"{where}: keys {sorted(state)} do not match this memory's {sorted(template)}")
        out: MemoryState = {}
        for key, want in template.items():
            got = state[key]
            if got.dim() != want.dim() or got.shape[0] != b:
                raise ValueError(f"{where}, key {key!r}: expected a tensor of shape (batch={b}, …) like "
                                 f"{tuple(want.shape[1:])} after the batch, found shape {tuple(got.shape)}")
            fixed = [j for j in range(1, want.dim()) if j >= 2 or want.shape[1] > 0]
            for j in fixed:
                if got.shape[j] != want.shape[j]:
                    raise ValueError(f"{where}, key {key!r}: expected size {want.shape[j]} in dim {j} "
                                     f"(shape (b, …) = {tuple(want.shape)} for b={b}), found shape {tuple(got.shape)}")
            if (want.dtype == torch.bool) != (got.dtype == torch.bool) or (
                    want.is_floating_point() != got.is_floating_point()):
                raise ValueError(f"{where}, key {key!r}: expected dtype {want.dtype}, found {got.dtype}")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise ValueError(f"{where}, key {key!r}: the state holds NaN or Inf values")
            out[key] = got.detach().to(device=device, dtype=want.dtype).clone()
        check = getattr(backend, "check_state", None)
        if check is not None:
            problem = check(out)
            if problem:
                raise ValueError(f"{where}: {problem}")
        return out, b

    def state_size(self) -> int:
        """Total number of elements held in memory state (all layers)."""
        return sum(v.numel() for s in self.states if s is not None for v in s.values())


def _rename_layers_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints of 0.1 name the backends ``layers.<i>``; they are ``backends.<i>`` now."""
    old = prefix + "layers."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "backends." + key[len(old):]] = state_dict.pop(key)


def dims_of(module: nn.Module) -> AttentionDims:
    """:class:`AttentionDims` of a module that follows the :class:`MemoryAttention` protocol."""
    return AttentionDims(int(module.embed_dim), int(module.num_heads), int(module.head_dim))
