"""Configuration of the kNN retrieval memory (Memorizing Transformers, Wu et al., ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import NOT_STATE, MemoryConfig, check_int


@dataclass
class KNNConfig(MemoryConfig):
    """kNN memory: per layer and head, the (key, value) pairs of the last ``store_len`` tokens.

    Each query retrieves its ``top_k`` most similar stored keys (exact search, cosine similarity) and
    attends over them; a learned per-head gate mixes that result with the host's own attention before
    the output projection. Keys and values are always stored without gradients (as in the paper), so
    ``detach`` must stay True.
    """

    name: ClassVar[str] = "knn"
    store_len: int = 4096
    top_k: int = field(default=32, metadata=NOT_STATE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "store_len", 1)
        check_int(self, "top_k", 1)
        if self.top_k > self.store_len:
            raise ValueError(f"KNNConfig.top_k must be an int in [1, store_len={self.store_len}], got {self.top_k}")
        if not self.detach:
            raise ValueError("KNNConfig.detach must be True, got False: the kNN memory stores keys and values "
                             "without gradients (Memorizing Transformers); use memory='xl' to backpropagate "
                             "through a memory")
