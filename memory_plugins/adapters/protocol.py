"""Adapter for custom decoders whose attention modules follow :class:`memory_plugins.MemoryAttention`."""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

from memory_plugins.interface import HostAttention, is_memory_attention
from memory_plugins.layer import LayerMemory, dims_of

from . import Target


def select(names: list[str], targets: Sequence[str] | None, kind: str) -> list[str]:
    """Names matching any of the glob patterns in ``targets`` (all names if ``targets`` is None)."""
    if targets is None:
        return names
    if isinstance(targets, str):
        targets = [targets]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not chosen:
        raise ValueError(f"targets={list(targets)} matches none of the {kind} layers {names}")
    return chosen


class ProtocolAdapter:
    name = "protocol"

    def find(self, model: nn.Module, targets: Sequence[str] | None) -> list[Target]:
        modules = {n: m for n, m in model.named_modules() if is_memory_attention(m)}
        found = []
        for name in select(list(modules), targets, "MemoryAttention"):
            m = modules[name]
            if m.memory_hook is not None:
                raise ValueError(f"layer {name!r} already has a memory hook: is this model wrapped already?")
            found.append(Target(name, m, dims_of(m), HostAttention(dims_of(m), m.project_q, m.project_kv)))
        return found

    def attach(self, model: nn.Module, targets: list[Target], hooks: list[LayerMemory]) -> "_ClearHooks":
        for t, hook in zip(targets, hooks):
            t.module.memory_hook = hook
        return _ClearHooks([t.module for t in targets])


class _ClearHooks:
    """Removes the hooks again. An object rather than a closure, so that ``copy.deepcopy`` of a wrapped
    model gives the copy a remover bound to the copy's modules."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def __call__(self) -> None:
        for m in self.modules:
            m.memory_hook = None
