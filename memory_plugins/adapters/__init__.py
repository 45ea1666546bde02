"""Adapters splice memory hooks into a host model; each host library's adapter is imported lazily.

An adapter answers three questions about a model: does it handle it (``matches``), which attention
layers take a memory (``find``), and how to install / remove the hooks (``attach`` returns a function
that removes everything it installed).

Importing this package imports no host library: an adapter module is only loaded once a model of
its library is wrapped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from torch import nn

from memory_plugins.interface import AttentionDims, HostAttention
from memory_plugins.layer import LayerMemory


@dataclass
class Target:
    """One attention layer that will take a memory."""

    name: str  # module name inside the model (from named_modules())
    module: nn.Module
    dims: AttentionDims
    host: HostAttention


class Adapter(Protocol):
    name: str

    def find(self, model: nn.Module, targets: Sequence[str] | None) -> list[Target]:
        """The attention layers to extend (all of them unless ``targets`` names some)."""
        ...

    def attach(self, model: nn.Module, targets: list[Target], hooks: list[LayerMemory]) -> Callable[[], None]:
        """Install ``hooks[i]`` on ``targets[i]``; return a function that removes all of it."""
        ...


@dataclass(frozen=True)
class _Entry:
    name: str
    matches: Callable[[nn.Module], bool]
    module: str  # import path of the adapter module, loaded lazily
    attr: str  # the Adapter class in it
    description: str


_ADAPTERS: list[_Entry] = []


def register_adapter(name: str, matches: Callable[[nn.Module], bool], module: str, attr: str, description: str) -> None:
    """Register an adapter; ``module.attr`` is imported only when a matching model is wrapped."""
    _ADAPTERS.insert(0, _Entry(name, matches, module, attr, description))


def _from_library(prefix: str) -> Callable[[nn.Module], bool]:
    return lambda model: type(model).__module__.split(".")[0] == prefix


def list_adapters() -> list[str]:
    return [f"{e.name} ({e.description})" for e in _ADAPTERS]


def find_adapter(model: nn.Module) -> Adapter:
    """The first registered adapter that handles ``model``; a clear error if none does."""
    for entry in _ADAPTERS:
        if entry.matches(model):
            return getattr(importlib.import_module(entry.module), entry.attr)()
    raise TypeError(
        f"memory_plugins cannot wrap a {type(model).__module__}.{type(model).__qualname__}: no adapter handles it. "
        f"Supported: {list_adapters()}. For your own decoder, make its attention modules follow the "
        "MemoryAttention protocol (memory_plugins.MemoryAttention; example: memory_plugins/models/reference.py)."
    )


# Order: the generic protocol adapter is the fallback, library adapters are tried first.
register_adapter(
    "protocol",
    lambda model: any(_is_protocol(m) for m in model.modules()),
    "memory_plugins.adapters.protocol",
    "ProtocolAdapter",
    "any model whose attention modules follow memory_plugins.MemoryAttention",
)


def _is_protocol(module: nn.Module) -> bool:
    from memory_plugins.interface import is_memory_attention

    return is_memory_attention(module)


# Host-library adapters, registered after the fallback so that they are tried before it.
register_adapter(
    "x_transformers",
    _from_library("x_transformers"),
    "memory_plugins.adapters.x_transformers",
    "XTransformersAdapter",
    "x-transformers TransformerWrapper / Decoder: every self-attention block",
)
register_adapter(
    "hf",
    _from_library("transformers"),
    "memory_plugins.adapters.hf",
    "HFAdapter",
    "Hugging Face transformers: GPT-2, Llama, Qwen2, Mistral decoders (sdpa or eager attention)",
)
register_adapter(
    "timm",
    _from_library("timm"),
    "memory_plugins.adapters.timm",
    "TimmViTAdapter",
    "timm VisionTransformer family: the Attention of every block (one frame per forward = one segment)",
)
