from .backend import XLMemory, fifo_push, fifo_reset
from .config import XLConfig

__all__ = ["XLConfig", "XLMemory", "fifo_push", "fifo_reset"]
