"""The ∞-former's continuous long-term memory (``memory="continuous"``)."""

from .backend import ContinuousMemory
from .basis import BasisCache, expected_basis, regression_matrix
from .config import ContinuousConfig

__all__ = ["BasisCache", "ContinuousConfig", "ContinuousMemory", "expected_basis", "regression_matrix"]
