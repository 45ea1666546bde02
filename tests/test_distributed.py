"""DDP and FSDP2 with every memory: 2 gloo processes on the CPU, one spawn for the whole file.

Each rank trains the reference decoder (dim 32, 2 layers) on its own token stream, 3 segments of 8
tokens, loss = next-token cross-entropy + ``memory_aux_loss()`` (reconstruction, KL), plain SGD.
A single process replays DDP exactly (two copies of the model, one per rank's data, gradients
averaged as DDP averages them) and the distributed runs must match it: parameters identical on both
ranks, and rank r's memory state that of rank r's data (each rank keeps its own memory).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import Tensor, nn

import memory_plugins as mp
from memory_plugins import distributed
from memory_plugins.models.reference import ReferenceDecoder

pytestmark = pytest.mark.usefixtures("on_cpu")  # gloo ranks on the CPU, and the one-process replay beside them

WORLD, STEPS, SEG, BATCH, VOCAB = 2, 3, 8, 2, 50
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "xl": ("xl", {"mem_len": 16}),
    # mem_len = one segment: the second segment compresses (reconstruction loss), the first does not
    "compressive": ("compressive", {"mem_len": 8, "cmem_len": 4, "compression_rate": 2}),
    # nothing pending at the first segment: the gate is idle there
    # (W_O not zero at the start, so that every memory parameter trains within 3 steps)
    "continuous": ("continuous", {"n_basis": 16, "basis_widths": (0.05, 0.1), "kl_weight": 1e-2,
                                  "zero_init_output": False}),
    "continuous-sticky": ("continuous", {"n_basis": 16, "basis_widths": (0.05, 0.1), "kl_weight": 1e-2,
                                         "zero_init_output": False, "sticky": True, "sticky_bins": 16,
                                         "stm_len": 4}),
    # the store holds the first segment when the second reads it: the gate trains from step 2
    "knn": ("knn", {"store_len": 16, "top_k": 4}),
}
FSDP_CASES = ("compressive", "continuous-sticky")


def build(case: str, seed: int) -> mp.MemoryModel:
    memory, options = CASES[case]
    torch.manual_seed(seed)
    return mp.wrap(ReferenceDecoder(dim=32, heads=2, depth=2, vocab_size=VOCAB), memory, **options)


def stream(rank: int) -> Tensor:
    """Rank ``rank``'s tokens (b, STEPS·SEG): different on every rank."""
    return torch.randint(0, VOCAB, (BATCH, STEPS * SEG), generator=torch.Generator().manual_seed(100 + rank))


def loss_of(call: nn.Module, model: mp.MemoryModel, seg: Tensor) -> tuple[Tensor, float]:
    """Task loss + aux loss of one segment through ``call`` (the model or its DDP/FSDP wrapper)."""
    logits = call(seg)  # (b, n, V)
    aux = model.memory_aux_loss()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), seg[:, 1:].flatten()) + aux, aux.item()


def state_of(model: mp.MemoryModel) -> dict[str, Tensor]:
    return {f"{layer}.{k}": v for layer, s in model.memory_state()["layers"].items() for k, v in s.items()}


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by name, gathered whole where FSDP2 shards them (a collective: every rank calls it)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def train(call: nn.Module, model: mp.MemoryModel, rank: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens, aux = stream(rank), []
    for s in range(STEPS):
        opt.zero_grad()
        loss, a = loss_of(call, model, tokens[:, s * SEG : (s + 1) * SEG])
        loss.backward()
        opt.step()
        aux.append(a)
    return aux


def run_case(rank: int, case: str, mode: str) -> dict[str, Any]:
    """One training run on this rank; ``mode``: ddp, fsdp (blocks + root), fsdp_memory (also each
    memory backend, its step registered) or fsdp_memory_unregistered (expected to be refused)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.nn.parallel import DistributedDataParallel

    if mode == "ddp":
        model = build(case, seed=rank)  # different initial weights: DDP must start from rank 0's
        call: nn.Module = DistributedDataParallel(model)  # default flags: find_unused_parameters=False
    else:
        model = build(case, seed=0)  # fully_shard broadcasts nothing: every rank starts from rank 0's weights
        for block in model.model.blocks:
            fully_shard(block)
        if mode.startswith("fsdp_memory"):
            for backend in model.memory.backends:
                fully_shard(backend)
                if mode == "fsdp_memory":
                    register_fsdp_forward_method(backend, "step")
        fully_shard(model)
        call = model
    try:
        aux = train(call, model, rank)
    except TypeError as err:
        return {"error": str(err)}
    return {"params": full_params(model), "state": state_of(model), "aux": aux}


def run_segment_runner(rank: int) -> dict[str, Tensor]:
    """``SegmentRunner`` (which needs a MemoryModel) training through DDP via ``memory_view``."""
    from torch.nn.parallel import DistributedDataParallel

    model = build("compressive", seed=rank)
    view = distributed.memory_view(model, DistributedDataParallel(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = mp.SegmentRunner(view, SEG)(stream(rank), backward=True)  # every segment with gradients, aux included
    assert out.aux_loss > 0
    opt.step()
    return full_params(model)


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {(case, "ddp"): run_case(rank, case, "ddp") for case in CASES}
        for case in FSDP_CASES:
            results[(case, "fsdp")] = run_case(rank, case, "fsdp")
        results[("continuous", "fsdp_memory")] = run_case(rank, "continuous", "fsdp_memory")
        for case in ("compressive", "continuous"):
            results[(case, "fsdp_memory_unregistered")] = run_case(rank, case, "fsdp_memory_unregistered")
        results[("compressive", "segment_runner")] = run_segment_runner(rank)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' results of every run (one spawn of 2 gloo processes for the whole file)."""
    out = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:  # gloo on the CPU: on a GPU host too, the ranks see no GPU
        patch.setenv("CUDA_VISIBLE_DEVICES", "")  # (FSDP2 would take it)
        tmp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def replay(case: str) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], dict[str, Tensor]]:
    """DDP in one process: a model per rank from rank 0's weights, each on its rank's data, the
    gradients averaged as DDP does (g₀/2 + g₁/2) before every step. Returns the parameters, each
    rank's memory state and the initial parameters."""
    models = [build(case, seed=0) for _ in range(WORLD)]  # on the CPU (on_cpu), like the gloo ranks
    initial = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    tokens = [stream(r) for r in range(WORLD)]
    for s in range(STEPS):
        for m, opt, t in zip(models, opts, tokens):
            opt.zero_grad()
            loss_of(m, m, t[:, s * SEG : (s + 1) * SEG])[0].backward()
        for ps in zip(*(m.parameters() for m in models)):
            avg = sum(p.grad / WORLD for p in ps)  # what every rank holds after DDP's all-reduce
            for p in ps:
                p.grad = avg.clone()
        for opt in opts:
            opt.step()
    return dict(models[0].named_parameters()), [state_of(m) for m in models], initial


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_with_default_flags_equals_a_single_process_replay(runs: list[dict], case: str) -> None:
    got = [r[(case, "ddp")] for r in runs]
    params, states, initial = replay(case)
    for name, p in got[0]["params"].items():
        assert torch.equal(p, got[1]["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(p, params[name].detach(), msg=lambda m: f"{name}: {m}")
    changed = {n for n, p in got[0]["params"].items() if not torch.equal(p, initial[n])}
    memory = {n for n in initial if n.startswith("memory.")}
    assert changed >= memory, f"memory parameters never trained: {sorted(memory - changed)}"
    assert "model.embed.weight" in changed
    for r in range(WORLD):  # each rank's memory holds its own data, exactly as one process computes it
        assert got[r]["state"].keys() == states[r].keys()
        for key, value in got[r]["state"].items():
            torch.testing.assert_close(value, states[r][key], msg=lambda m: f"rank {r} {key}: {m}")
    held = [k for k, v in got[0]["state"].items() if v.is_floating_point() and bool(v.abs().sum() > 0)]
    assert held and all(not torch.equal(got[0]["state"][k], got[1]["state"][k]) for k in held)
    if case not in ("xl", "knn"):  # the auxiliary losses were part of the loss (reconstruction once compressing; KL)
        assert max(got[0]["aux"]) > 0


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp2_per_block_and_root_equals_ddp(runs: list[dict], case: str) -> None:
    for r in range(WORLD):
        fsdp, ddp = runs[r][(case, "fsdp")], runs[r][(case, "ddp")]
        assert "error" not in fsdp, fsdp.get("error")
        for name, p in ddp["params"].items():
            torch.testing.assert_close(fsdp["params"][name], p, msg=lambda m: f"rank {r} {name}: {m}")
        for key, value in ddp["state"].items():
            torch.testing.assert_close(fsdp["state"][key], value, msg=lambda m: f"rank {r} {key}: {m}")


def test_fsdp2_sharded_memory_works_with_step_registered_and_is_refused_without(runs: list[dict]) -> None:
    for r in range(WORLD):
        sharded, ddp = runs[r][("continuous", "fsdp_memory")], runs[r][("continuous", "ddp")]
        assert "error" not in sharded, sharded.get("error")
        for name, p in ddp["params"].items():
            torch.testing.assert_close(sharded["params"][name], p, msg=lambda m: f"rank {r} {name}: {m}")
        for case, cls in (("compressive", "CompressiveMemory"), ("continuous", "ContinuousMemory")):
            refused = runs[r][(case, "fsdp_memory_unregistered")]
            assert "error" in refused, f"{case}: a memory backend sharded on its own trained without an error"
            assert refused["error"].startswith(cls) and "register_fsdp_forward_method(backend, 'step')" in refused["error"]


def test_segment_runner_trains_through_ddp_with_memory_view(runs: list[dict]) -> None:
    """Ranks start from different weights and see different data: equal weights after one step mean
    that DDP broadcast rank 0's weights and averaged the gradients, through the view."""
    a, b = (r[("compressive", "segment_runner")] for r in runs)
    initial = dict(build("compressive", seed=0).named_parameters())
    for name, p in a.items():
        assert torch.equal(p, b[name]), f"{name} differs across ranks"
    assert not torch.equal(a["memory.backends.0.conv.weight"], initial["memory.backends.0.conv.weight"])
