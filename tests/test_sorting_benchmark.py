"""The sorting benchmark's models: equal memory budgets, and "none" really sees only its segment."""

from __future__ import annotations

import pytest
import torch

from examples.sorting.benchmark import ALL_MEMORIES, PRESETS, build, memory_options, run_segments
from examples.sorting.task import NUM_SYMBOLS, SortingBatch, generate

from .conftest import DEVICE

CPU = PRESETS["cpu"]


@pytest.mark.parametrize("length", CPU.lengths)
@pytest.mark.parametrize("memory", [m for m in ALL_MEMORIES if m != "none"])
def test_every_memory_holds_two_segments_of_vectors_per_layer(memory: str, length: int) -> None:
    """The paper's equal budgets: XL 2n; compressive n + n; ∞-former STM n + N = n basis functions; kNN 2n."""
    n = CPU.segment
    model = build(CPU, memory, length)
    run_segments(model, memory, generate(2, length, seed=0).to(DEVICE), n, train=False)
    state = model.memory_state()["layers"]
    assert len(state) == CPU.depth
    for layer in state.values():
        held = {k: v.shape[1] for k, v in layer.items() if k in ("mem", "cmem", "stm", "coef", "keys")}  # slots per sample
        assert sum(held.values()) == 2 * n, held
    if memory == "compressive":  # rate chosen so that the compressed memory reaches back to the start
        opts = memory_options(memory, CPU, length)[1]
        assert opts["compression_rate"] * opts["cmem_len"] + opts["mem_len"] + n >= length or opts["compression_rate"] == 12


@pytest.mark.parametrize("memory", ALL_MEMORIES)
def test_only_the_memories_see_beyond_the_last_segment(memory: str) -> None:
    """Changing the first half of the sequence changes the ranking logits of every memory but 'none'."""
    torch.manual_seed(0)
    length, n = 256, CPU.segment
    model = build(CPU, memory, length)
    with torch.no_grad():  # a memory's output projection may start at zero: give it a voice
        for name, p in model.named_parameters():
            if name.startswith("memory."):
                p.add_(0.05 * torch.randn_like(p))
    a = generate(2, length, seed=1)
    b_tokens = a.tokens.clone()
    b_tokens[:, : length // 2] = (b_tokens[:, : length // 2] + 7) % NUM_SYMBOLS  # (2, T/2): other symbols
    a, b = a.to(DEVICE), SortingBatch(b_tokens, a.counts).to(DEVICE)
    model.eval()
    la = run_segments(model, memory, a, n, train=False).token_loss[:, -NUM_SYMBOLS:]  # (2, S)
    lb = run_segments(model, memory, b, n, train=False).token_loss[:, -NUM_SYMBOLS:]  # (2, S)
    if memory == "none":
        assert torch.equal(la, lb)
    else:
        assert (la - lb).abs().max() > 1e-4
