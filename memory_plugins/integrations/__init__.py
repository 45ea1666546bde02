"""Integrations with training frameworks; each module imports its framework only when it is used.

* :mod:`memory_plugins.integrations.hf_trainer`: ``transformers.Trainer`` on long documents
  (``SegmentDataset`` + ``MemoryTrainer``).
"""
