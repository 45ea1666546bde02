"""Transformer-XL cache through the reference decoder equals full attention over the same context."""

from __future__ import annotations

import pytest
import torch

import memory_plugins as mp
from memory_plugins.models import ReferenceDecoder
from memory_plugins.xl import fifo_push


def _model() -> ReferenceDecoder:
    return ReferenceDecoder(vocab_size=61, dim=48, depth=3, heads=4).eval()


def _stream(model: torch.nn.Module, tokens: torch.Tensor, seg: int) -> torch.Tensor:
    return torch.cat([model(tokens[:, s : s + seg]) for s in range(0, tokens.shape[1], seg)], dim=1)


def block_banded_mask(t: int, seg: int, mem_len: int) -> torch.Tensor:
    """What XL sees: query i attends to keys j <= i from ``mem_len`` before the start of i's segment."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    return (j <= i) & (j >= (i // seg) * seg - mem_len)


@pytest.mark.parametrize("seg", [8, 13, 32])
def test_xl_covering_the_prefix_equals_full_attention(seg: int) -> None:
    base = _model()
    tokens = torch.randint(0, 61, (3, 96))
    full = base(tokens)  # (b, t, V), one pass with a causal mask
    wrapped = mp.wrap(base, "xl", mem_len=96)
    streamed = _stream(wrapped, tokens, seg)
    assert (streamed - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("seg,mem_len", [(16, 8), (16, 16), (12, 30)])
def test_short_xl_equals_full_attention_with_block_banded_mask(seg: int, mem_len: int) -> None:
    base = _model()
    tokens = torch.randint(0, 61, (2, 80))
    reference = base(tokens, attn_mask=block_banded_mask(80, seg, mem_len))
    causal_only = base(tokens)
    streamed = _stream(mp.wrap(base, "xl", mem_len=mem_len), tokens, seg)
    assert (streamed - reference).abs().max().item() <= 1e-5
    # ...and the window matters: the same stream differs from unrestricted causal attention.
    assert (streamed - causal_only).abs().max().item() > 1e-3


def test_fifo_keeps_newest_and_reports_what_fell_out() -> None:
    mem = torch.zeros(1, 0, 1)
    valid = torch.zeros(1, 0, dtype=torch.bool)
    fell = []
    for step in range(4):
        x = torch.arange(step * 3, step * 3 + 3, dtype=torch.float32).view(1, 3, 1)
        mem, valid, out, _ = fifo_push(mem, valid, x, capacity=5)
        fell += out.flatten().tolist()
    assert mem.flatten().tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert fell == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # each vector evicted exactly once, oldest first
