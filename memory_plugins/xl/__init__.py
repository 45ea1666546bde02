from ..fifo import fifo_push, fifo_reset
from .backend import XLMemory
from .config import XLConfig

__all__ = ["XLConfig", "XLMemory", "fifo_push", "fifo_reset"]
