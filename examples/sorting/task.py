"""The ∞-former's sorting task (paper §4.1, App. C.1): sort 20 symbols by their frequency in a long,
drifting sequence.

Each sequence draws two distributions over the 20 symbols, ``p_init`` and ``p_final`` (integer weights
1–9, normalised). Token j of a length-T sequence is drawn from ``(1 − α_j) p_init + α_j p_final`` with
α_j rising linearly from 0 (first token) to 1 (last token), so what is frequent early differs from what
is frequent late: a model that only sees the recent past sorts by the wrong counts. The sequence is
followed by a separator and the target: the 20 symbols in decreasing order of their count in the whole
sequence, ties broken by the smaller symbol id.

Notation: B sequences, T sequence length, S = 20 symbols.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_SYMBOLS = 20
SEP = NUM_SYMBOLS  # token id of the separator
VOCAB = NUM_SYMBOLS + 1
IGNORE = -100


@dataclass
class SortingBatch:
    tokens: Tensor  # (B, T + 1 + S) int64: sequence, SEP, target ranking
    counts: Tensor  # (B, S) int64: symbol counts over the sequence

    @property
    def length(self) -> int:
        return self.tokens.shape[1] - 1 - NUM_SYMBOLS

    def inputs_and_targets(self, lm_loss: bool = False) -> tuple[Tensor, Tensor]:
        """Teacher-forced language-model view: inputs (B, T + S) and targets (B, T + S), ``IGNORE``
        everywhere except the S positions (SEP and the first S − 1 ranks) that predict the ranking;
        with ``lm_loss`` the sequence positions predict their next token as well."""
        inputs = self.tokens[:, :-1]  # (B, T + S)
        if lm_loss:
            return inputs, self.tokens[:, 1:]  # (B, T + S)
        targets = torch.full_like(inputs, IGNORE)  # (B, T + S)
        targets[:, self.length :] = self.tokens[:, self.length + 1 :]  # rank k predicted at SEP + k − 1
        return inputs, targets

    def to(self, device: torch.device | str) -> SortingBatch:
        """The tokens on ``device`` (the model's); counts stay where they are (the oracles are CPU code)."""
        return SortingBatch(self.tokens.to(device), self.counts)


def ranking(counts: Tensor) -> Tensor:
    """Symbols (B, S) in decreasing order of ``counts`` (B, S); ties: smaller symbol first."""
    symbols = torch.arange(NUM_SYMBOLS, device=counts.device)  # (S,)
    key = counts * NUM_SYMBOLS + (NUM_SYMBOLS - 1 - symbols)  # (B, S) unique per symbol
    return key.argsort(dim=1, descending=True)  # (B, S)


def generate(num: int, length: int, seed: int, *, chunk: int = 256) -> SortingBatch:
    """``num`` sequences of ``length`` tokens, deterministic in ``seed`` (vectorised, chunked in memory)."""
    if length < 2:
        raise ValueError(f"generate: length must be >= 2, got {length}")
    with torch.device("cpu"):  # data is made on the CPU whatever the default device: same seed, same data
        return _generate(num, length, torch.Generator().manual_seed(seed), chunk)


def _generate(num: int, length: int, gen: torch.Generator, chunk: int) -> SortingBatch:
    alpha = torch.linspace(0.0, 1.0, length)  # (T,)
    seqs, all_counts = [], []
    for start in range(0, num, chunk):
        b = min(chunk, num - start)
        weights = torch.randint(1, 10, (b, 2, NUM_SYMBOLS), generator=gen).float()  # (b, 2, S)
        probs = weights / weights.sum(-1, keepdim=True)  # (b, 2, S): p_init, p_final
        init = torch.multinomial(probs[:, 0], length, replacement=True, generator=gen)  # (b, T)
        final = torch.multinomial(probs[:, 1], length, replacement=True, generator=gen)  # (b, T)
        use_final = torch.rand(b, length, generator=gen) < alpha  # (b, T): mixture component
        x = torch.where(use_final, final, init)  # (b, T)
        counts = torch.zeros(b, NUM_SYMBOLS, dtype=torch.int64).scatter_add_(1, x, torch.ones_like(x))  # (b, S)
        sep = torch.full((b, 1), SEP, dtype=torch.int64)  # (b, 1)
        seqs.append(torch.cat([x, sep, ranking(counts)], dim=1))  # (b, T + 1 + S)
        all_counts.append(counts)
    return SortingBatch(torch.cat(seqs), torch.cat(all_counts))


def teacher_forced_predictions(scores: Tensor, target: Tensor) -> Tensor:
    """What a counter with per-symbol ``scores`` (B, S) predicts at each rank (B, S) when the true
    previous ranks are given: the best-scoring symbol not yet ranked (ties: smaller symbol)."""
    b = scores.shape[0]
    symbols = torch.arange(NUM_SYMBOLS)
    key = (scores * NUM_SYMBOLS + (NUM_SYMBOLS - 1 - symbols)).double()  # (B, S) unique per symbol
    used = torch.zeros(b, NUM_SYMBOLS, dtype=torch.bool)  # (B, S)
    preds = []
    for k in range(NUM_SYMBOLS):  # 20 ranks, vectorised over the batch
        preds.append(key.masked_fill(used, -torch.inf).argmax(dim=1))  # (B,)
        used[torch.arange(b), target[:, k]] = True
    return torch.stack(preds, dim=1)  # (B, S)


def window_counts(batch: SortingBatch, window: int) -> Tensor:
    """Symbol counts (B, S) over the last ``window`` tokens of each sequence only."""
    x = batch.tokens[:, max(batch.length - window, 0) : batch.length]  # (B, W)
    return torch.zeros(x.shape[0], NUM_SYMBOLS, dtype=torch.int64).scatter_add_(1, x, torch.ones_like(x))


@dataclass
class Score:
    accuracy: float  # mean teacher-forced token accuracy over the S target positions
    accuracy_ci95: float  # half-width of the 95% interval over sequences
    exact_match: float  # fraction of sequences whose whole ranking is right
    exact_match_ci95: float


def score(preds: Tensor, target: Tensor) -> Score:
    """Scores of predictions (B, S) against the target ranking (B, S)."""
    correct = (preds == target).float()  # (B, S)
    per_seq = correct.mean(dim=1)  # (B,)
    exact = correct.min(dim=1).values  # (B,)
    n = per_seq.numel()

    def ci(v: Tensor) -> float:
        return float(1.96 * v.std(unbiased=True) / n**0.5) if n > 1 else float("nan")

    return Score(float(per_seq.mean()), ci(per_seq), float(exact.mean()), ci(exact))


def oracle_scores(batch: SortingBatch, window: int | Sequence[int]) -> dict[str, Score]:
    """The full-count oracle (counts the whole sequence: the upper bound) and one window oracle per
    ``window`` (counts only the last W tokens: what a model that sees only them could know)."""
    target = batch.tokens[:, batch.length + 1 :]  # (B, S)
    windows = (window,) if isinstance(window, int) else tuple(window)
    scores = {"full-count oracle": score(teacher_forced_predictions(batch.counts, target), target)}
    for w in windows:
        scores[f"window oracle (W={w})"] = score(teacher_forced_predictions(window_counts(batch, w), target), target)
    return scores
