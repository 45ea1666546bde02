"""Shared fixtures: small configurations of every registered memory for the invariant tests."""

from __future__ import annotations

import pytest
import torch

# Small options per registered memory, so that the registry-wide invariants run fast on 2 CPU cores.
# A backend added to the registry must add its entry here (the invariant tests fail loudly otherwise).
SMALL_OPTIONS: dict[str, dict] = {
    "xl": {"mem_len": 24},
    "compressive": {"mem_len": 12, "cmem_len": 6, "compression_rate": 2},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
