"""memory_plugins: plug-in long-term memories for any PyTorch transformer.

    model = memory_plugins.wrap(model, memory="xl", mem_len=1024)
    for segment in stream:            # each call is one segment; memory carries over
        logits = model(segment)

Importing this package loads torch and einops only; host libraries (x-transformers, transformers)
are imported by their adapter when a model of theirs is wrapped.
"""

from .config import MemoryConfig
from .interface import AttentionDims, HostAttention, MemoryAttention, MemoryBackend, MemoryRead, MemoryState
from .controller import LayerMemory, MemoryController, MemoryHook
from .model import MemoryModel, wrap
from .registry import create_backend, create_config, get_spec, list_memories, register_memory, unregister_memory
from .runner import SegmentRunner, SegmentOutput
# Built-in memories: each registers itself in its own folder (@register_memory on its backend).
from .xl import XLConfig, XLMemory
from .continuous import ContinuousConfig, ContinuousMemory
from .compressive import CompressiveConfig, CompressiveMemory
from .knn import KNNConfig, KNNMemory

__version__ = "0.2.0"

__all__ = [
    "AttentionDims",
    "CompressiveConfig",
    "CompressiveMemory",
    "ContinuousConfig",
    "ContinuousMemory",
    "HostAttention",
    "KNNConfig",
    "KNNMemory",
    "LayerMemory",
    "MemoryAttention",
    "MemoryBackend",
    "MemoryConfig",
    "MemoryController",
    "MemoryHook",
    "MemoryModel",
    "MemoryRead",
    "MemoryState",
    "SegmentOutput",
    "SegmentRunner",
    "XLConfig",
    "XLMemory",
    "create_backend",
    "create_config",
    "get_spec",
    "list_memories",
    "register_memory",
    "unregister_memory",
    "wrap",
]
