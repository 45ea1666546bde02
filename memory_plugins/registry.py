"""Name → (config dataclass, backend class) registry, in the spirit of timm's ``register_model``.

Each memory registers itself next to its code, with the decorator form::

    @register_memory("xl", XLConfig)
    class XLMemory(nn.Module): ...

A backend class is constructed as ``backend_cls(config, host, shared)``: ``host`` is the layer's
:class:`HostAttention` (its dims and content projections, given once), ``shared`` an
``nn.ModuleDict`` owned by the wrapper in which backends of one model may cache components common
to all layers (e.g. the ∞-former's regression matrix G, stored once and moved with the model).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .config import MemoryConfig
from .interface import AttentionDims, HostAttention, MemoryRead


@dataclass(frozen=True)
class MemorySpec:
    name: str
    config_cls: type[MemoryConfig]
    backend_cls: Callable[[Any, AttentionDims, nn.ModuleDict], nn.Module]


_REGISTRY: dict[str, MemorySpec] = {}


def register_memory(name: str, config_cls: type[MemoryConfig], backend_cls: Callable[..., nn.Module] | None = None) -> Any:
    """Make ``memory=name`` available to :func:`memory_plugins.wrap` and :func:`create_config`.

    Without ``backend_cls`` it is a class decorator (``@register_memory("xl", XLConfig)``)."""
    if backend_cls is None:
        def decorate(cls: Any) -> Any:
            register_memory(name, config_cls, cls)
            return cls

        return decorate
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_memory: name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and _qualified(_REGISTRY[name].backend_cls) != _qualified(backend_cls):
        raise ValueError(f"register_memory: a memory named {name!r} is already registered")
    _REGISTRY[name] = MemorySpec(name, config_cls, backend_cls)
    return backend_cls


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


def unregister_memory(name: str) -> None:
    """Remove ``name`` from the registry (for memories registered temporarily, e.g. in tests)."""
    get_spec(name)  # unknown name: the usual error
    del _REGISTRY[name]


def list_memories() -> list[str]:
    """Names of the registered memories, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> MemorySpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown memory {name!r}; choose from {list_memories()}")
    return _REGISTRY[name]


def create_config(memory: str | MemoryConfig, **options: Any) -> MemoryConfig:
    """Validated config for ``memory`` with ``options``; a config instance passes through."""
    if isinstance(memory, MemoryConfig):
        if options:
            raise TypeError(f"got a config object and extra options {sorted(options)}: pass one or the other")
        return memory
    spec = get_spec(memory)
    known = spec.config_cls.option_names()
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"memory {memory!r} has no option {key!r}{hint}; its options are {known}")
    return spec.config_cls(**options)


def create_backend(config: MemoryConfig, host: HostAttention | AttentionDims, shared: nn.ModuleDict) -> nn.Module:
    """One layer's backend for ``config``, built for the host layer ``host``."""
    backend = get_spec(type(config).name).backend_cls(config, host, shared)
    if not hasattr(backend, "step"):
        if not (hasattr(backend, "read") and hasattr(backend, "write")):
            raise TypeError(f"memory {type(config).name!r}: {type(backend).__name__} has no step() method")
        warnings.warn(
            f"memory {type(config).name!r}: {type(backend).__name__} implements the 0.1 read()/write() pair; "
            "implement step(state, x, q, valid) -> (read, new_state) instead (support for read/write will go)",
            DeprecationWarning, stacklevel=3)
        _adopt_legacy(backend, host)
    if getattr(backend, "host", None) is None and isinstance(host, HostAttention):
        object.__setattr__(backend, "host", host)
    return backend


def _adopt_legacy(backend: nn.Module, host: Any) -> None:
    """Give a 0.1 backend (read + write) a step(): read, then write; padding is not supported there."""

    def step(state: Any, x: Any, q: Any, valid: Any) -> tuple[MemoryRead, Any]:
        read = backend.read(state, x, q)
        new_state, aux = backend.write(state, x, host if isinstance(host, HostAttention) else None, read)
        if aux is not None:
            read.aux_loss = aux if read.aux_loss is None else read.aux_loss + aux
        return read, new_state

    object.__setattr__(backend, "step", step)
    if not hasattr(type(backend), "uses_queries"):
        object.__setattr__(backend, "uses_queries", True)
