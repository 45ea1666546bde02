"""Segment-wise sampling from any wrapped model: the stream is cut into segments as in training.

Notation: b batch, t prompt length, c tokens of the current segment, V vocabulary.

Complete segments (of the prompt, then of the generated text) are written to the memory with one
forward each, exactly as :class:`memory_plugins.SegmentRunner` writes them while training; the
current, incomplete segment is decoded with the memory read-only, either by full forwards of the
segment so far or by a host's kv cache (``cached_step``, supplied by its adapter). Unless
``write_memory``, the memory is restored afterwards: sampling never changes the stream it reads.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .runner import default_logits


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    segment_len: int,
    temperature: float = 0.0,
    filter_logits: Callable[[Tensor], Tensor] | None = None,
    cached_step: Callable[[nn.Module, Tensor, Any], tuple[Tensor, Any]] | None = None,
    logits_fn: Callable[[Any], Tensor] = default_logits,
    write_memory: bool = False,
) -> Tensor:
    """Sample ``max_new_tokens`` after ``prompt`` (b, t) from a wrapped model; returns the new tokens (b, T).

    ``temperature`` 0 is greedy; ``filter_logits`` (e.g. a top-k filter) is applied to the logits (b, V)
    before sampling. ``cached_step(model, current (b, c), cache) -> (logits (b, V), cache)`` decodes
    with a kv cache (None: a full forward of the current segment at every step).
    """
    if not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"generate: segment_len must be an int >= 1, got {segment_len!r}")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be (batch, time) with time >= 1, got shape {tuple(prompt.shape)}")
    if not hasattr(model, "memory_frozen"):
        raise TypeError("generate: pass the model returned by memory_plugins.wrap()")
    # the committed states as they are (a backend never changes a state in place): restored as they were,
    # with no copy and no check (set_memory_state would refuse, say, a stream whose memory took in a NaN)
    saved = None if write_memory else list(model.memory.states)
    was_training = model.training
    model.eval()

    def step(current: Tensor, cache: Any) -> tuple[Tensor, Any]:
        with model.memory_frozen():  # the current segment is read-only until it is complete
            if cached_step is None:
                return logits_fn(model(current))[:, -1], None
            return cached_step(model, current, cache)

    try:
        full = prompt.shape[1] // segment_len * segment_len
        last: Tensor | None = None  # (b, V) logits for the next token
        for s in range(0, full, segment_len):  # complete prompt segments: read + write
            last = logits_fn(model(prompt[:, s : s + segment_len]))[:, -1]
        current = prompt[:, full:]  # (b, c) the segment being decoded
        cache = None
        if current.shape[1]:
            last, cache = step(current, None)
        new = []
        for _ in range(max_new_tokens):
            assert last is not None
            token = _sample(last, temperature, filter_logits)  # (b, 1)
            new.append(token)
            current = torch.cat([current, token], dim=1)  # (b, c + 1)
            if current.shape[1] == segment_len:  # segment complete: write it, start an empty one
                last = logits_fn(model(current))[:, -1]
                current, cache = current[:, :0], None
            else:
                last, cache = step(current, cache)
        return torch.cat(new, dim=1) if new else prompt[:, :0]
    finally:
        model.train(was_training)
        if saved is not None:
            model.memory.states = saved


def _sample(logits: Tensor, temperature: float, filter_logits: Callable[[Tensor], Tensor] | None) -> Tensor:
    if filter_logits is not None:
        logits = filter_logits(logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (b, 1)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)  # (b, 1)
