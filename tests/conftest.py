"""Shared fixtures: small configurations of every registered memory for the invariant tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

# Small options per registered memory, so that the registry-wide invariants run fast on 2 CPU cores.
# A backend added to the registry must add its entry here (the invariant tests fail loudly otherwise).
SMALL_OPTIONS: dict[str, dict] = {
    "xl": {"mem_len": 24},
    "continuous": {"n_basis": 16, "basis_widths": (0.05, 0.1), "stm_len": 16, "sticky": True, "sticky_bins": 16},
    "compressive": {"mem_len": 12, "cmem_len": 6, "compression_rate": 2},
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The models here are tiny: one intra-op thread is faster than two, and immune to the stalls that
    two threads suffer on a shared, oversubscribed 2-core machine (seconds per test instead of ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
