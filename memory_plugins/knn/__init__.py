"""kNN retrieval memory (Memorizing Transformers): ``memory="knn"``."""

from .backend import KNNMemory
from .config import KNNConfig

__all__ = ["KNNConfig", "KNNMemory"]
