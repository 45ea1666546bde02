from .backend import CompressiveMemory
from .config import CompressiveConfig

__all__ = ["CompressiveConfig", "CompressiveMemory"]
