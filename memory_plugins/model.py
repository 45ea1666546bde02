"""``wrap()``: give any supported transformer a memory in one line, and take it away again.

The wrapped model keeps the host's forward signature; every call is one segment of a stream and the
memory carries over to the next call. Parameters of the base model keep their ``state_dict`` names;
memory parameters live under the ``memory.`` prefix.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from torch import Tensor, nn

from .config import MemoryConfig
from .interface import MemoryState
from .layer import LayerMemory, MemoryController
from .registry import create_backend, create_config

_MEMORY_PREFIX = "memory."
_BASE_PREFIX = "model."


class MemoryModel(nn.Module):
    """A host model with a memory spliced into its attention layers (build it with :func:`wrap`)."""

    def __init__(self, model: nn.Module, memory: MemoryController, config: MemoryConfig, adapter: str,
                 remove_hooks: Callable[[], None]) -> None:
        super().__init__()
        self.model = model
        self.memory = memory
        self.memory_config = config
        self.adapter_name = adapter
        self._remove_hooks = remove_hooks
        self._pre_hook = model.register_forward_pre_hook(_BeginForward(memory))
        # Base-model keys stay as they were: strip / restore the "model." level around state_dict().
        self._hooks = [
            self.register_state_dict_post_hook(_strip_base_prefix),
            self.register_load_state_dict_pre_hook(_add_base_prefix),
            self.register_load_state_dict_post_hook(_strip_incompatible),
        ]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Fall back to the base model for everything we do not define (config, generate, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "memory"):
                raise
            return getattr(self.model, name)

    # -- user-facing memory API -----------------------------------------------------------------
    def reset_memory(self, mask: Tensor | None = None) -> None:
        """Empty the memory: of every sample (``mask=None``, batch size may then change) or of the
        samples where the bool ``mask`` (b,) is True, leaving the others bit-identical."""
        self.memory.reset(mask)

    @contextmanager
    def memory_disabled(self) -> Iterator[None]:
        """Inside, the model behaves exactly as the base model and the memory is left untouched."""
        with self.memory.disabled():
            yield

    @contextmanager
    def memory_frozen(self) -> Iterator[None]:
        """Inside, the memory is read but not written (evaluation of a fixed memory, generation steps)."""
        with self.memory.frozen():
            yield

    def memory_aux_loss(self) -> Tensor:
        """Weighted sum of the memories' auxiliary losses (KL, attention reconstruction) of the last forward."""
        return self.memory.aux_loss()

    def memory_state(self) -> dict[str, MemoryState | None]:
        """A detached copy of the memory state of every layer, for saving or resuming a stream."""
        return self.memory.get_state()

    def set_memory_state(self, state: dict[str, MemoryState | None]) -> None:
        """Restore a state from :meth:`memory_state` (this model's or an identical one's)."""
        self.memory.set_state(state)

    def detach_memory(self) -> None:
        """Cut the autograd graph through the memory (for truncated BPTT with ``detach=False``)."""
        self.memory.detach()

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the original model object, as it was before :func:`wrap`."""
        self._remove_hooks()
        self._pre_hook.remove()
        for h in self._hooks:
            h.remove()
        self._remove_hooks = _already_unwrapped
        return self.model


def _already_unwrapped() -> None:
    raise RuntimeError("this MemoryModel was already unwrapped")


class _BeginForward:
    """Pre-hook on the base model. An object, not a closure: ``copy.deepcopy`` of a wrapped model then
    gives the copy's base model a hook on the copy's controller (a closure would keep the original's)."""

    def __init__(self, memory: MemoryController) -> None:
        self.memory = memory

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.memory.begin_forward()


def _strip_base_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    base = prefix + _BASE_PREFIX
    for key in [k for k in state_dict if k.startswith(base)]:
        state_dict[prefix + key[len(base):]] = state_dict.pop(key)


def _add_base_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    module._load_prefix = prefix
    keep = (prefix + _MEMORY_PREFIX, prefix + _BASE_PREFIX)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(keep)]:
        state_dict[prefix + _BASE_PREFIX + key[len(prefix):]] = state_dict.pop(key)


def _strip_incompatible(module: nn.Module, incompatible: Any) -> None:
    base = getattr(module, "_load_prefix", "") + _BASE_PREFIX
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k.replace(base, base[: -len(_BASE_PREFIX)], 1) if k.startswith(base) else k for k in keys]


def wrap(
    model: nn.Module,
    memory: str | MemoryConfig = "xl",
    *,
    targets: Sequence[str] | None = None,
    **options: Any,
) -> MemoryModel:
    """Give ``model`` a memory in every attention layer (or those matching the glob ``targets``).

    ``memory`` is a registered name (see :func:`list_memories`) or a config object; ``options`` are
    that memory's config fields, e.g. ``wrap(model, "xl", mem_len=1024)`` or
    ``wrap(model, "continuous", n_basis=512)``.
    """
    from memory_plugins.adapters import find_adapter  # the adapter registry; host libraries load lazily

    if isinstance(model, MemoryModel):
        raise ValueError("this model is already wrapped: call unwrap() first, or wrap the original model")
    config = create_config(memory, **options)
    adapter = find_adapter(model)
    found = adapter.find(model, targets)
    if not found:
        raise ValueError(f"adapter {adapter.name!r} found no attention layer to extend in {type(model).__name__}")
    shared = nn.ModuleDict()
    backends = [create_backend(config, t.dims, shared) for t in found]
    controller = MemoryController(backends, [t.name for t in found], shared)
    p = next(model.parameters(), None)
    if p is not None:
        controller.to(device=p.device)
        if p.is_floating_point():
            controller.to(dtype=p.dtype)
    hooks = [LayerMemory(controller, i, t.name, t.host) for i, t in enumerate(found)]
    remove = adapter.attach(model, found, hooks)
    return MemoryModel(model, controller, config, adapter.name, remove)
