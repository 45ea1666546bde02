"""Base class and validation helpers for the per-backend config dataclasses.

Every error names the parameter, the bad value and what is allowed: a researcher sweeping
hyper-parameters should never have to read our code to learn why a run refused to start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

#: ``field`` metadata of an option that cannot change a memory state (a loss weight, the read's
#: implementation, an initialisation): a stream saved under another value resumes with ``strict=True``.
#: States saved before this rule (2026-11-28) hashed it, and are accepted by that older fingerprint too.
NOT_STATE = {"fingerprint": False, "legacy_fingerprint": True}


@dataclass
class MemoryConfig:
    """Options shared by every memory; subclasses add their own and validate in ``__post_init__``.

    ``detach``: cut the autograd graph between segments (the default, as in the paper). Set it to
    ``False`` to backpropagate through the memory; :class:`memory_plugins.SegmentRunner` then
    truncates the graph every ``bptt_segments`` segments.
    """

    name: ClassVar[str] = ""
    detach: bool = True

    def __post_init__(self) -> None:
        check_bool(self, "detach")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _where(cfg: Any, name: str) -> str:
    return f"{type(cfg).__name__}.{name}"


def check_bool(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ValueError(f"{_where(cfg, name)} must be a bool (True or False), got {value!r}")


def check_int(cfg: Any, name: str, low: int, high: int | None = None) -> None:
    """``low <= value <= high`` (``high`` None: unbounded)."""
    value = getattr(cfg, name)
    allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_where(cfg, name)} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{_where(cfg, name)} must be {allowed}, got {value}")


def check_float(
    cfg: Any, name: str, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Finite float in the interval; ``*_open`` excludes the end point."""
    value = getattr(cfg, name)
    lo, hi = ("(" if low_open else "["), (")" if high_open or high == math.inf else "]")  # inf is refused
    allowed = f"a float in {lo}{low}, {high}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_where(cfg, name)} must be {allowed}, got {value!r}")
    if (value < low or (low_open and value == low)) or (value > high or (high_open and value == high)):
        raise ValueError(f"{_where(cfg, name)} must be {allowed}, got {value}")
    setattr(cfg, name, float(value))


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{_where(cfg, name)} must be one of {list(choices)}, got {value!r}")
