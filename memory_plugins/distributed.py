"""Several processes: torchrun launches, DDP around a wrapped model, and the FSDP2 rule for memories.

A wrapped model is an ``nn.Module`` like any other, so ``DistributedDataParallel(model)`` (default flags)
and FSDP2's ``fully_shard`` per transformer block (plus the root) train it; each process keeps the
memory of its own lanes (memory state is never a parameter or a buffer, so nothing synchronises it).
This module holds what a training script needs around that (docs/scale.md shows the commands):

* :func:`launch` reads torchrun's environment and starts the process group (gloo on the CPU, NCCL on
  CUDA); a plain ``python`` process gets a world of one and no process group, so one script serves both;
* :func:`data_parallel` wraps for DDP where there are several processes, :func:`unwrap` undoes it, and
  :func:`memory_view` gives code written for a :class:`~memory_plugins.MemoryModel` (``SegmentRunner``)
  a model whose forward goes through DDP;
* :func:`shard`, :func:`gather`, :func:`agree` and :func:`barrier`: each rank's share of a dataset,
  per-rank results collected on every rank, one decision for all ranks, a rendezvous;
* :func:`refuse_sharded_step`: memory backends are called through ``step()``, not ``forward()``, so a
  backend sharded on its own by ``fully_shard`` would see its parameters still sharded; it raises a
  clear error instead of torch's "mixed torch.Tensor and DTensor".
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes results and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch(device: str | torch.device = "cpu", *, timeout_minutes: float = 120.0) -> Launch:
    """Start the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL for a CUDA ``device`` (this rank then uses
    ``cuda:LOCAL_RANK``), gloo otherwise. Without ``WORLD_SIZE`` (or with 1) nothing is started and the
    process is rank 0 of 1 on ``device`` as given. ``timeout_minutes``: how long a rank may wait for the others
    (rank 0 alone evaluating, for instance) before the collective fails."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch(0, 1, device)
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed; run one process")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type != "cpu":
        device = torch.device(device.type, local)  # one accelerator per process on this node, whatever index was asked
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return Launch(dist.get_rank(), dist.get_world_size(), device)


def close(run: Launch) -> None:
    """Tear down the default process group after a run of several processes (nothing for a single one)."""
    if run.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def data_parallel(model: nn.Module, run: Launch) -> nn.Module:
    """``DistributedDataParallel(model)`` with default flags when there are several processes, else
    ``model`` itself. Every memory gives each of its parameters a gradient in every backward of
    ``task loss + model.memory_aux_loss()``, so ``find_unused_parameters`` is not needed."""
    if not run.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself): for resets, state, saving, evaluation."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def memory_view(model: nn.Module, parallel: nn.Module) -> nn.Module:
    """A shallow copy of the wrapped ``model`` whose forward runs through ``parallel`` (its DDP
    wrapper): code that takes a :class:`~memory_plugins.MemoryModel` (``SegmentRunner``, which resets
    and reads the memory through it) then trains with DDP's gradient synchronisation. Parameters,
    memory and state are ``model``'s own. A model without memory, or ``parallel is model`` (one
    process), gives ``parallel`` itself."""
    from .model import MemoryModel

    if parallel is model or not isinstance(model, MemoryModel):
        return parallel
    view = copy.copy(model)  # shares the submodules, parameters and memory controller
    object.__setattr__(view, "forward", parallel.forward)  # DDP.forward calls model(...), not the view
    return view


def shard(items: Sequence[T], run: Launch) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one from position ``rank`` (all of them
    for a single process). The shares of all ranks are disjoint and cover ``items``."""
    return list(items[run.rank :: run.world_size])


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather(obj: Any, run: Launch) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` itself for a single process).
    Picklable objects; with several processes their tensors arrive on the CPU (a CUDA tensor would
    otherwise be unpickled onto its sender's device number)."""
    if not run.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * run.world_size
    dist.all_gather_object(out, _to_cpu(obj))
    return out


def agree(ok: bool, run: Launch) -> bool:
    """True on every rank only if ``ok`` is True on every rank (so that all stop together on an error)."""
    return all(gather(bool(ok), run))


def barrier(run: Launch) -> None:
    """Wait until every rank gets here."""
    if run.distributed:
        import torch.distributed as dist

        dist.barrier()


_DTENSOR: list[type | None] = []  # filled on first use: torch.distributed.tensor is a heavy import


def _dtensor_type() -> type | None:
    if not _DTENSOR:
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            _DTENSOR.append(DTensor)
        else:
            _DTENSOR.append(None)
    return _DTENSOR[0]


def refuse_sharded_step(backend: nn.Module) -> None:
    """Raise if ``backend``'s parameters are FSDP2-sharded while its ``step()`` runs.

    ``fully_shard`` gathers a module's parameters around its ``forward()``; a memory backend is called
    through ``step()``, so sharded on its own it would compute with shards. Two ways work: leave the
    memory in the root's group (``fully_shard`` the blocks, then the whole wrapped model), or register
    ``step`` as a forward method after sharding it."""
    dtensor = _dtensor_type()
    p = next(backend.parameters(), None)
    if dtensor is not None and isinstance(p, dtensor):
        name = next(c.__name__ for c in type(backend).__mro__ if not c.__name__.startswith("FSDP"))  # not FSDP's subclass
        raise TypeError(
            f"{name}: its parameters are still sharded (DTensor) inside step(): fully_shard() was applied to "
            f"this memory backend (model.memory.backends[i]), and FSDP2 only gathers parameters around "
            f"forward(), while memories run through step(). Either do not shard the memory on its own "
            f"(fully_shard each transformer block, then the whole wrapped model: the memory joins the "
            f"root's group), or after fully_shard(backend) call "
            f"torch.distributed.fsdp.register_fsdp_forward_method(backend, 'step')"
        )
