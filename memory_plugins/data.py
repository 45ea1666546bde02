"""Long documents as a stream of fixed-length segments over a batch of lanes, for memory-augmented models.

    stream = DocumentStream(docs, batch_size=B, seg_len=n, train=True, seed=0, bos=bos_id)
    for seg in stream:                                       # Segment, see below
        model.reset_memory(seg.doc_start)                    # (B,) bool: new document in that lane
        inputs, targets = seg.inputs_and_targets()           # (B, n), (B, n); targets -100 where invalid

Notation: B lanes (batch size), n segment length, D documents, L tokens in a document.

**Stream semantics.** Each lane reads one document at a time, in order, n inputs per segment; segment
k of a document holds its sequence positions [k n, k n + n] (inputs [k n, k n + n), targets shifted by
one), so consecutive segments of a lane overlap by one token and every target is predicted once. With
``bos`` the sequence is ``[bos] + tokens``, so every document token (the first included) is a target
exactly once; without it the first token is context only. When a lane's document has no target left,
the lane takes the next document at the next segment and flags ``doc_start`` (the model must reset
that lane's memory); when the documents run out (evaluation) the lane idles: padding, all invalid.
Evaluation ends when every lane is idle; training (``train=True``) draws documents from a seeded
shuffle, reshuffled at every pass, and never ends. Same documents and seed → same segments.

**Documents shorter than one segment** (fewer than n targets) are kept by default: they take one
segment, padded and masked past their end, and the next document starts at the next segment (a
warning counts them). ``short="drop"`` leaves them out, ``short="error"`` refuses them. A document
with no target at all (0 tokens, or 1 token without ``bos``) is always an error.

The LM benchmark (``examples/lm``) and the Hugging Face Trainer integration
(:mod:`memory_plugins.integrations.hf_trainer`) both read documents through this stream.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100


class DocumentError(ValueError):
    """A document set the stream cannot read (empty, a document with nothing to predict, ...)."""


@dataclass
class Document:
    id: str  # a name for messages (the LM corpus uses "<source>/<name>")
    tokens: Tensor  # (L,) int32 token ids


@dataclass
class Segment:
    """One step of a :class:`DocumentStream` (all on the CPU; ``to`` moves it)."""

    tokens: Tensor  # (B, n + 1) int64: inputs tokens[:, :-1], targets tokens[:, 1:]; pad where invalid
    valid: Tensor  # (B, n) bool: target tokens[:, j + 1] belongs to the lane's document
    doc_start: Tensor  # (B,) bool: the lane began a new document at this segment (reset its memory)
    doc_index: Tensor  # (B,) int64: the lane's document (index into stream.documents), -1 idle
    offset: Tensor  # (B,) int64: position of tokens[:, 0] in the lane's sequence ([bos] +) tokens

    @property
    def inputs(self) -> Tensor:
        return self.tokens[:, :-1]  # (B, n)

    @property
    def targets(self) -> Tensor:
        return self.tokens[:, 1:]  # (B, n)

    def inputs_and_targets(self, ignore_index: int = IGNORE) -> tuple[Tensor, Tensor]:
        """Inputs (B, n) and targets (B, n) with ``ignore_index`` where not ``valid``."""
        return self.inputs, self.targets.masked_fill(~self.valid, ignore_index)

    @property
    def num_targets(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> Segment:
        return Segment(*(t.to(device) for t in (self.tokens, self.valid, self.doc_start, self.doc_index, self.offset)))


class DocumentStream:
    """Stream ``documents`` as segments of ``seg_len`` tokens over ``batch_size`` lanes (see the
    module docstring for the semantics).

    Args:
        documents: :class:`Document` list (e.g. from :func:`load_corpus`); evaluation reads them in this order.
        batch_size: B >= 1 lanes.
        seg_len: n >= 1 inputs (and targets) per lane and segment.
        train: cycle forever over seeded shuffles (True) or read each document once, then stop (False).
        seed: the shuffle's seed (train); evaluation does not use it.
        bos: token id put before each document (e.g. ``<|endoftext|>``), or None.
        pad_id: token id of padding (masked out by ``valid``).
        short: "keep" | "drop" | "error": documents with fewer than n targets.

    Errors about the documents are raised as ``error`` (:class:`DocumentError`; a subclass may name its own).
    """

    error: type[Exception] = DocumentError

    def __init__(
        self,
        documents: Sequence[Document],
        batch_size: int,
        seg_len: int,
        *,
        train: bool = False,
        seed: int = 0,
        bos: int | None = None,
        pad_id: int = 0,
        short: str = "keep",
    ) -> None:
        for name, value in (("batch_size", batch_size), ("seg_len", seg_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DocumentStream: {name} must be an int >= 1, got {value!r}")
        if short not in ("keep", "drop", "error"):
            raise ValueError(f"DocumentStream: short must be 'keep', 'drop' or 'error', got {short!r}")
        if not documents:
            raise self.error("DocumentStream: documents is empty (a split with no document?)")
        extra = 0 if bos is None else 1
        empty = [d.id for d in documents if d.tokens.numel() + extra < 2]
        if empty:
            raise self.error(
                f"DocumentStream: {len(empty)} document(s) have nothing to predict (0 tokens, or 1 token "
                f"with bos=None): {empty[:5]}; remove them from the corpus or pass bos"
            )
        short_docs = [d for d in documents if d.tokens.numel() + extra - 1 < seg_len]
        if short_docs:
            listing = ", ".join(f"{d.id} ({d.tokens.numel()} tokens)" for d in short_docs[:5])
            more = f" and {len(short_docs) - 5} more" if len(short_docs) > 5 else ""
            what = (
                f"{len(short_docs)} of {len(documents)} documents are shorter than one segment "
                f"(seg_len={seg_len} targets): {listing}{more}"
            )
            if short == "error":
                raise self.error(
                    f"DocumentStream: {what}; use short='keep' (pad and mask) or 'drop', or a smaller seg_len"
                )
            if short == "drop":
                documents = [d for d in documents if d.tokens.numel() + extra - 1 >= seg_len]
                if not documents:
                    raise self.error(f"DocumentStream: short='drop' leaves no document: {what}")
                warnings.warn(f"DocumentStream: {what}: dropped (short='drop')", stacklevel=2)
            else:
                warnings.warn(
                    f"DocumentStream: {what}: kept, each padded and masked in its last segment (short='keep')",
                    stacklevel=2,
                )
        self.documents = list(documents)
        self.batch_size, self.seg_len, self.train, self.seed = batch_size, seg_len, train, seed
        self.bos, self.pad_id = bos, pad_id
        prefix = torch.tensor([] if bos is None else [bos], dtype=torch.int64, device="cpu")
        self._seqs = [torch.cat([prefix, d.tokens.to("cpu", torch.int64)]) for d in self.documents]  # (1? + L,)

    def _order(self) -> Iterator[int]:
        """Document indices in reading order: as given (eval), seeded shuffles without end (train)."""
        if not self.train:
            yield from range(len(self._seqs))
            return
        rng = random.Random(self.seed)
        while True:
            order = list(range(len(self._seqs)))
            rng.shuffle(order)
            yield from order

    def _num_segments(self, index: int) -> int:
        return -(-(len(self._seqs[index]) - 1) // self.seg_len)  # ceil(targets / n)

    def __len__(self) -> int:
        """Number of segments of an evaluation stream (a training stream has no end: TypeError)."""
        if self.train:
            raise TypeError("DocumentStream: a training stream (train=True) is infinite and has no len()")
        free = [0] * self.batch_size  # step at which each lane takes its next document
        for index in range(len(self._seqs)):
            lane = min(range(self.batch_size), key=lambda b: (free[b], b))
            free[lane] += self._num_segments(index)
        return max(free)

    def __iter__(self) -> Iterator[Segment]:
        B, n = self.batch_size, self.seg_len
        order = self._order()
        lane_doc, lane_pos = [-1] * B, [0] * B
        while True:
            tokens = torch.full((B, n + 1), self.pad_id, dtype=torch.int64, device="cpu")
            valid = torch.zeros(B, n, dtype=torch.bool, device="cpu")
            doc_start = torch.zeros(B, dtype=torch.bool, device="cpu")
            doc_index = torch.full((B,), -1, dtype=torch.int64, device="cpu")
            offset = torch.zeros(B, dtype=torch.int64, device="cpu")
            for b in range(B):
                d = lane_doc[b]
                if d < 0 or lane_pos[b] + 1 >= len(self._seqs[d]):  # no target left: next document
                    d = lane_doc[b] = next(order, -1)
                    lane_pos[b] = 0
                    doc_start[b] = d >= 0
                if d < 0:
                    continue  # idle lane (evaluation, documents used up)
                p = lane_pos[b]
                window = self._seqs[d][p : p + n + 1]
                tokens[b, : len(window)] = window
                valid[b, : len(window) - 1] = True
                doc_index[b], offset[b] = d, p
                lane_pos[b] = p + n
            if not bool((doc_index >= 0).any()):
                return
            yield Segment(tokens, valid, doc_start, doc_index, offset)
