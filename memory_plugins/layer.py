"""Names of 0.1: the hook and controller now live in :mod:`memory_plugins.controller`."""

from .controller import LayerMemory, MemoryController, MemoryHook, dims_of

__all__ = ["LayerMemory", "MemoryController", "MemoryHook", "dims_of"]
