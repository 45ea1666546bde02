"""Stream a long batch through any wrapped model, segment by segment, and score every token.

Like x-transformers' ``XLAutoregressiveWrapper`` but for any :class:`MemoryModel`: the runner splits
the sequence into segments, lets the memory carry over between them, optionally backpropagates
through the memory for ``bptt_segments`` segments at a time, resets a sample's memory where a new
document starts, and returns the per-token loss.

Notation: b batch, T sequence length, n segment length, V vocabulary.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from torch import nn

from .model import MemoryModel


def default_logits(out: Any) -> Tensor:
    """Logits from a host's output: a tensor, an object with ``.logits`` (HF) or a tuple's first item."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}; pass logits_fn= to SegmentRunner")


@dataclass
class SegmentOutput:
    loss: Tensor  # scalar: mean token loss over the graded segments' targets + mean aux loss per segment
    token_loss: Tensor  # (b, T') per-token cross-entropy, 0 where the target is ignored
    predictions: Tensor  # (b, T') argmax of the logits at every input position
    aux_loss: Tensor  # scalar: the memories' weighted aux losses, mean over segments
    num_tokens: int  # tokens scored, in every segment


class SegmentRunner:
    """Run ``model`` over a long batch in segments of ``segment_len`` tokens.

    ``model`` is a wrapped :class:`MemoryModel`, or a plain model (a no-memory baseline: each segment
    then sees only itself).

    ``bptt_segments``: segments per truncated-BPTT window (needs a memory built with
    ``detach=False``; the default 1 keeps the paper's stop-gradient between segments).
    """

    def __init__(
        self,
        model: MemoryModel | nn.Module,
        segment_len: int,
        *,
        bptt_segments: int = 1,
        ignore_index: int = -100,
        logits_fn: Callable[[Any], Tensor] = default_logits,
    ) -> None:
        if not isinstance(segment_len, int) or segment_len < 1:
            raise ValueError(f"SegmentRunner: segment_len must be an int >= 1, got {segment_len!r}")
        if not isinstance(bptt_segments, int) or bptt_segments < 1:
            raise ValueError(f"SegmentRunner: bptt_segments must be an int >= 1, got {bptt_segments!r}")
        detach = getattr(getattr(model, "memory_config", None), "detach", True)
        if bptt_segments > 1 and detach:
            raise ValueError(
                f"SegmentRunner: bptt_segments={bptt_segments} backpropagates through the memory, which needs "
                "a memory built with detach=False (e.g. wrap(model, 'xl', detach=False))"
            )
        self.model = model
        self.segment_len = segment_len
        self.bptt_segments = bptt_segments
        self.ignore_index = ignore_index
        self.logits_fn = logits_fn

    def __call__(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        *,
        doc_start: Tensor | None = None,
        reset: bool = True,
        align: str = "start",
        grad_segments: int | None = None,
        backward: bool = False,
        aux_weight: float = 1.0,
    ) -> SegmentOutput:
        """Score ``tokens`` (b, T).

        * ``targets`` (b, T): the label of every input position (``ignore_index`` to skip); if None,
          next-token prediction on ``tokens[:, :-1] → tokens[:, 1:]``.
        * ``doc_start`` (b, T) bool over the inputs: a sample whose new document starts inside a segment
          has its memory emptied before that segment (within the segment, what the host attends to is
          the host's business).
        * ``reset``: start every sample with an empty memory (a new batch of streams).
        * ``align``: ``"start"`` cuts segments from the first token (the last one may be short);
          ``"end"`` cuts them from the last token, so that the final segment is full (tasks whose
          answer sits at the end, like sorting).
        * ``grad_segments``: only the last k segments are run with gradients; earlier ones only build
          the memory (the paper's sorting setup). None: all segments. ``loss`` (and what ``backward``
          differentiates) is then the mean over the targets of those k segments; ``token_loss`` still
          has every position. The aux term stays the mean over all segments' aux losses (those of
          the no-grad segments carry no gradient).
        * ``backward``: call ``backward()`` on each BPTT window's share of the loss as soon as it is
          complete, so the graph of at most one window is alive; the returned tensors are detached.
        """
        if tokens.dim() != 2:
            raise ValueError(f"SegmentRunner: tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        if targets is None:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
        else:
            if targets.shape != tokens.shape:
                raise ValueError(f"SegmentRunner: targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
            inputs = tokens
        if doc_start is not None and doc_start.shape[:2] != tokens.shape:
            raise ValueError(f"SegmentRunner: doc_start shape {tuple(doc_start.shape)} != tokens shape {tuple(tokens.shape)}")
        b, t = inputs.shape
        n = self.segment_len
        if align not in ("start", "end"):
            raise ValueError(f"SegmentRunner: align must be 'start' or 'end', got {align!r}")
        offset = 0 if align == "start" else (t % n) - n if t % n else 0  # first cut, possibly < 0
        bounds = [(max(s, 0), min(s + n, t)) for s in range(offset, t, n)]
        first_grad = 0 if grad_segments is None else max(len(bounds) - grad_segments, 0)
        scored = targets != self.ignore_index  # (b, T)
        total = int(scored.sum())
        # The objective is the mean over the targets of the segments run with gradients: targets in
        # earlier (no-grad) segments would only shrink its gradient, by the share of them they hold.
        denom = max(int(scored[:, bounds[first_grad][0] :].sum()), 1)

        has_memory = isinstance(self.model, MemoryModel)
        if reset and has_memory:
            self.model.reset_memory()
        token_losses, aux_terms, window, predictions = [], [], [], []
        for i, (s, e) in enumerate(bounds):
            if doc_start is not None and (i > 0 or not reset):  # after a reset the first segment starts empty
                starting = doc_start[:, s:e].any(dim=1)  # (b,)
                if has_memory and bool(starting.any()):
                    self.model.reset_memory(starting)
            ctx = torch.no_grad() if i < first_grad else nullcontext()
            with ctx:
                logits = self.logits_fn(self.model(inputs[:, s:e]))  # (b, n, V)
                tl = F.cross_entropy(
                    logits.float().transpose(1, 2), targets[:, s:e], ignore_index=self.ignore_index, reduction="none"
                )  # (b, n)
                aux = self.model.memory_aux_loss() if has_memory else tl.new_zeros(())
            predictions.append(logits.argmax(dim=-1))  # (b, n)
            token_losses.append(tl)
            aux_terms.append(aux)
            if i < first_grad:
                continue
            if backward:
                window.append(tl.sum() / denom + aux_weight * aux / len(bounds))
            if (i + 1 - first_grad) % self.bptt_segments == 0 or i == len(bounds) - 1:  # window complete
                if backward:
                    torch.stack(window).sum().backward()
                    token_losses = [x.detach() for x in token_losses]
                    aux_terms = [x.detach() for x in aux_terms]
                    window = []
                if has_memory:  # the window's end: no gradient into earlier ones (a detach=False memory holds one)
                    self.model.detach_memory()

        token_loss = torch.cat(token_losses, dim=1)  # (b, T')
        aux_loss = torch.stack(aux_terms).mean()
        loss = token_loss[:, bounds[first_grad][0] :].sum() / denom + aux_weight * aux_loss
        if backward:
            token_loss, aux_loss, loss = token_loss.detach(), aux_loss.detach(), loss.detach()
        return SegmentOutput(
            loss=loss, token_loss=token_loss, predictions=torch.cat(predictions, 1), aux_loss=aux_loss, num_tokens=total
        )
