"""Name → (config dataclass, backend class) registry, in the spirit of timm's ``register_model``.

A backend class is constructed as ``backend_cls(config, dims, shared)``: ``dims`` describes the host
layer (:class:`AttentionDims`), ``shared`` is an ``nn.ModuleDict`` owned by the wrapper in which
backends of one model may cache components common to all layers (e.g. the ∞-former's regression
matrix G, stored once and moved with the model).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .config import MemoryConfig
from .interface import AttentionDims


@dataclass(frozen=True)
class MemorySpec:
    name: str
    config_cls: type[MemoryConfig]
    backend_cls: Callable[[Any, AttentionDims, nn.ModuleDict], nn.Module]


_REGISTRY: dict[str, MemorySpec] = {}


def register_memory(name: str, config_cls: type[MemoryConfig], backend_cls: Callable[..., nn.Module]) -> None:
    """Make ``memory=name`` available to :func:`memory_plugins.wrap` and :func:`create_config`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_memory: name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name].backend_cls is not backend_cls:
        raise ValueError(f"register_memory: a memory named {name!r} is already registered")
    _REGISTRY[name] = MemorySpec(name, config_cls, backend_cls)


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


def create_backend(config: MemoryConfig, dims: AttentionDims, shared: nn.ModuleDict) -> nn.Module:
    """One layer's backend for ``config``."""
    return get_spec(type(config).name).backend_cls(config, dims, shared)
