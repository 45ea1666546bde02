"""Configuration of the Transformer-XL cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import MemoryConfig, check_int


@dataclass
class XLConfig(MemoryConfig):
    """Transformer-XL memory (Dai et al., 2019): the last ``mem_len`` attention inputs of each layer.

    The host attends over [memory ; segment]. Exact with relative or rotary positions; with absolute
    position embeddings the memory vectors carry the positions they had in their own segment (see
    docs/architecture.md).
    """

    name: ClassVar[str] = "xl"
    mem_len: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "mem_len", 1)
