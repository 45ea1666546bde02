"""Operators that a compiled graph runs as opaque calls, most of them outside CUDA graphs.

``torch.compile(model, mode="reduce-overhead")`` records the graph's kernels as CUDA graphs and
replays them. Two things in a memory's step do not fit a replay:

* **State that outlives the step.** A replayed graph's outputs live in the CUDA-graph memory pool and
  the next replay overwrites them, but the memory state a step commits is read by the next step.
  :func:`copy_out` copies it into ordinary memory.
* **A choice that needs the data.** The continuous update fits the new vectors with cached matrices
  when every pending slot is valid and solves each sample's own layout otherwise (padding). The
  choice reads ``valid`` on the host; inside a graph it was a ``torch.cond``, which makes inductor
  give up CUDA graphs for the whole graph.

Both are custom operators tagged ``cudagraph_unsafe``: inductor splits the graph around them (graph
partitions), runs them eagerly between the captured parts and captures the rest. Without CUDA
graphs they are plain calls: Dynamo traces through them without a graph break, and eager code does
not use them. On a torch without ``torch.library.custom_op`` (< 2.4) they fall back to functions
that Dynamo does not trace (a graph break each: slower, still correct).

The same helper registers operators that CUDA graphs may capture (``capturable=True``): the
continuous read's Triton kernels (:mod:`memory_plugins.continuous.kernel`), opaque to Dynamo so
that it does not trace into Triton, and plain kernel launches for CUDA graphs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def graph_op(name: str, *, fake: Callable[..., Any], backward: Callable[..., Any] | None = None,
             setup: Callable[..., None] | None = None, capturable: bool = False,
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the operator ``memory_plugins::<name>``, tagged
    ``cudagraph_unsafe`` unless ``capturable`` (a kernel launch with no host logic: CUDA graphs record
    it like any other). ``fake`` returns empty outputs of the right shapes (what tracing sees);
    ``backward(ctx, *grads)`` makes it differentiable, with ``setup(ctx, inputs, output)`` saving what
    it needs (None: nothing)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not hasattr(torch.library, "custom_op"):
            return torch.compiler.disable(fn) if hasattr(torch, "compiler") else fn
        unsafe = None if capturable else getattr(getattr(torch, "Tag", None), "cudagraph_unsafe", None)
        try:
            op = torch.library.custom_op(f"memory_plugins::{name}", mutates_args=(),
                                         tags=(unsafe,) if unsafe is not None else ())(fn)
        except TypeError:  # no ``tags`` in older torch: still opaque to Dynamo, split by nothing
            op = torch.library.custom_op(f"memory_plugins::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup or (lambda ctx, inputs, output: None))
        return op

    return register


def _copy_fake(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [torch.empty_like(t) for t in tensors]


def _copy_backward(ctx: Any, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    return list(grads)  # the identity's gradient


@graph_op("copy_out", fake=_copy_fake, backward=_copy_backward)
def copy_out(tensors: list[Tensor]) -> list[Tensor]:
    """Fresh copies of ``tensors``, made outside any CUDA graph (differentiable: the identity)."""
    return [t.clone() for t in tensors]
