"""Configuration of the compressive memory (Rae et al., 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import NOT_STATE, MemoryConfig, check_choice, check_float, check_int


@dataclass
class CompressiveConfig(MemoryConfig):
    """Compressive Transformer memory (Rae et al., 2019): a Transformer-XL memory of ``mem_len`` vectors
    whose evicted vectors are compressed by ``compression_rate`` into a second FIFO of ``cmem_len`` vectors.

    The host attends over [compressed memory ; memory ; segment], oldest first.

    * ``compression``: ``"conv"`` (a 1-D convolution with kernel and stride ``compression_rate``, the
      paper's best), ``"mean"`` or ``"max"`` pooling (parameter-free ablations). With
      ``compression_rate=1``, ``"mean"`` and ``"max"`` are the identity and the memory equals an XL cache
      of ``mem_len + cmem_len`` vectors.
    * ``recon_weight``: weight of the attention-reconstruction loss (Rae et al. §3.2), the only signal
      that trains the convolution (the task loss never reaches it: compressed memories are stored
      detached, as in the paper). ``0`` disables it; the pooling compressions have nothing to train and
      never report it, and it is computed in training mode only (``model.train()``). With
      ``recon_weight=0`` a ``"conv"`` compressor keeps its initialisation.
    * ``detach``: as for every memory; with ``False`` only the uncompressed memory keeps its graph
      (the compressed memory and the vectors waiting to be compressed are always detached).

    Paper settings (∞-former §4, App. C): LM ``mem_len=cmem_len=150, compression_rate=4``; sorting
    ``mem_len=cmem_len=1024, compression_rate`` 2–12, with and without the reconstruction loss.
    """

    name: ClassVar[str] = "compressive"
    COMPRESSIONS: ClassVar[tuple[str, ...]] = ("conv", "mean", "max")

    mem_len: int = 512
    cmem_len: int = 512
    compression_rate: int = 4
    compression: str = "conv"
    recon_weight: float = field(default=1.0, metadata=NOT_STATE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "mem_len", 1)
        check_int(self, "cmem_len", 1)
        check_int(self, "compression_rate", 1)
        check_choice(self, "compression", self.COMPRESSIONS)
        check_float(self, "recon_weight", 0.0)
