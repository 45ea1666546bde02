"""Shared fixtures: small configurations of every registered memory for the invariant tests."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import ClassVar, Iterator


def _interpreter_runs_the_kernels() -> bool:
    """Triton ≥ 3.9 is installed: its interpreter runs the read's kernels (3.6's fails on their loops
    over a runtime bound with NumPy ≥ 2.4). Read from the package metadata: triton is not imported yet."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (3, 9)


INTERPRETER_RUNS_THE_KERNELS = _interpreter_runs_the_kernels()

# On the CPU the continuous read's Triton kernels (read_impl="triton") run in Triton's interpreter. The
# variable must be set before triton is imported (memory_plugins' import pulls it in through torch).
if os.environ.get("MEMORY_PLUGINS_TEST_DEVICE", "cpu") == "cpu" and INTERPRETER_RUNS_THE_KERNELS:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import memory_plugins as mp  # noqa: E402
from memory_plugins import HostAttention, MemoryConfig, MemoryRead  # noqa: E402
from memory_plugins.continuous.kernel import kernel_available  # noqa: E402

# The suite runs on the CPU (CI). ``MEMORY_PLUGINS_TEST_DEVICE=cuda pytest`` runs it on a GPU: the tests
# build their models and tensors with torch's default device, which is then that device, with TF32 off so
# that the float32 tolerances keep their meaning.
DEVICE = torch.device(os.environ.get("MEMORY_PLUGINS_TEST_DEVICE", "cpu"))

# Tests of the continuous read's Triton kernels: skipped, with this reason, where they cannot run (the
# same config would read through SDPA there); test_continuous_kernel.py checks they run wherever they can.
needs_kernel_read = pytest.mark.skipif(
    not kernel_available(DEVICE, torch.float32),
    reason="read_impl='triton' runs its kernels on CUDA, or on the CPU in the interpreter of triton >= 3.9",
)


def pytest_configure(config: pytest.Config) -> None:
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if DEVICE.type != "cpu":
        torch.set_default_device(DEVICE)


def make_generator(seed: int) -> torch.Generator:
    """A seeded generator on the test device (random draws with it land where the models are)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def states_equal(a: dict, b: dict) -> bool:
    """Two ``memory_state()`` results hold the same layers, keys and tensors, bit for bit (a layer never
    written is None in both)."""
    a, b = a["layers"], b["layers"]
    return a.keys() == b.keys() and all(
        (a[k] is None) == (b[k] is None)
        and (a[k] is None or (a[k].keys() == b[k].keys() and all(torch.equal(a[k][s], b[k][s]) for s in a[k])))
        for k in a)


# Small options per registered memory, so that the registry-wide invariants run fast on 2 CPU cores.
# A backend added to the registry must add its entry here (the invariant tests fail loudly otherwise).
SMALL_OPTIONS: dict[str, dict] = {
    "xl": {"mem_len": 24},
    "continuous": {"n_basis": 16, "basis_widths": (0.05, 0.1), "stm_len": 16, "sticky": True, "sticky_bins": 16},
    "compressive": {"mem_len": 12, "cmem_len": 6, "compression_rate": 2},
    "knn": {"store_len": 40, "top_k": 4},
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The models here are tiny: one intra-op thread is faster than two, and immune to the stalls that
    two threads suffer on a shared, oversubscribed 2-core machine (seconds per test instead of ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_cpu() -> Iterator[None]:
    """The CPU as default device for tests of CPU-only paths (gloo processes, the example pipelines run
    on the device they are given, the CPU in those tests), also when MEMORY_PLUGINS_TEST_DEVICE puts the
    rest of the suite on a GPU."""
    with torch.device("cpu"):
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- a probe memory for the adapter tests -----------------------------------------------------------


@dataclass
class ProbeConfig(MemoryConfig):
    name: ClassVar[str] = "_probe"


class ProbeMemory(nn.Module):
    """Records the (x, q, valid) it is given; returns ``output = tanh(x R)`` and no K/V sources."""

    uses_queries = True

    def __init__(self, config: ProbeConfig, host: HostAttention, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.r = nn.Parameter(torch.randn(host.embed_dim, host.embed_dim))
        self.seen: list[tuple[Tensor, Tensor | None]] = []
        self.valids: list[Tensor | None] = []

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {"n": torch.zeros(batch_size, device=device)}

    def step(self, state: dict, x: Tensor, q: Tensor | None, valid: Tensor | None) -> tuple[MemoryRead, dict]:
        self.seen.append((x, q))
        self.valids.append(valid)
        return MemoryRead(output=torch.tanh(x @ self.r)), {"n": state["n"] + 1}  # (b, n, e)

    def reset(self, state: dict, mask: Tensor) -> dict:
        return {"n": torch.where(mask, torch.zeros_like(state["n"]), state["n"])}


@pytest.fixture
def probe() -> Iterator[str]:
    """Name of a temporarily registered :class:`ProbeMemory`."""
    mp.register_memory(ProbeConfig.name, ProbeConfig, ProbeMemory)
    yield ProbeConfig.name
    mp.unregister_memory(ProbeConfig.name)
