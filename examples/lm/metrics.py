"""Perplexity by position inside the document, with bootstrap intervals over documents.

    nll = [per-token NLL (L_d,) of document d, in document order]     # from benchmark.evaluate
    sums, counts = bucket_sums(nll)                                   # (D, K), (D, K)
    summary(sums, counts)         # {"all": {...}, "0–512": {...}, ...}: ppl, 95% interval, tokens
    paired_difference(sums_a, sums_b, counts)                         # ppl_a − ppl_b with its interval

Notation: D documents, L_d tokens of document d, K position buckets, R bootstrap resamples.

The position of a token is the number of tokens of its document before it (0 for the first token).
Buckets are [0, 512), [512, 2048), [2048, 8192) and [8192, ∞). Perplexities are token-weighted:
exp(Σ NLL / Σ tokens) over the tokens of the bucket (or of all buckets). The 95% intervals resample the
*documents* with replacement (tokens of one document are not independent) and take the 2.5% and 97.5%
percentiles of the resampled perplexities. Every statistic is computed from per-document sums of the
exact per-token NLL, so buckets and bootstraps lose nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

BUCKET_EDGES = (512, 2048, 8192)  # upper edges of all buckets but the last (open) one
BUCKETS = ("0–512", "512–2k", "2k–8k", ">8k")  # K = 4 names, in order
ALL = "all"


def bucket_of(position: Tensor) -> Tensor:
    """Bucket index (…,) int64 of in-document positions ``position`` (…,) int: [0, 512) → 0,
    [512, 2048) → 1, [2048, 8192) → 2, ≥ 8192 → 3."""
    edges = torch.tensor(BUCKET_EDGES, dtype=torch.int64, device=position.device)  # (K - 1,)
    return torch.bucketize(position.to(torch.int64), edges, right=True)  # (…,)


def bucket_sums(nll: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-document, per-bucket NLL sums (D, K) float64 and token counts (D, K) int64 of ``nll``, a
    list of per-token NLL tensors (L_d,) in document order (position = index)."""
    k = len(BUCKETS)
    sums = torch.zeros(len(nll), k, dtype=torch.float64, device="cpu")  # (D, K) on the CPU, whatever the default device
    counts = torch.zeros(len(nll), k, dtype=torch.int64, device="cpu")  # (D, K)
    for d, x in enumerate(nll):
        x = x.detach().to("cpu", torch.float64)  # (L_d,)
        if bool(torch.isnan(x).any()):
            raise ValueError(f"bucket_sums: document {d} has NaN NLL at {int(torch.isnan(x).sum())} positions "
                             "(a token was never scored)")
        b = bucket_of(torch.arange(x.numel(), device="cpu"))  # (L_d,)
        sums[d].index_add_(0, b, x)
        counts[d].index_add_(0, b, torch.ones_like(b))
    return sums, counts


def _resamples(num_docs: int, resamples: int, seed: int) -> Tensor:
    """R bootstrap draws of document multiplicities: (R, D) int64 (each row sums to D)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num_docs, (resamples, num_docs), generator=g, device="cpu")  # (R, D)
    weights = torch.zeros(resamples, num_docs, dtype=torch.int64, device="cpu")  # (R, D)
    weights.scatter_add_(1, idx, torch.ones_like(idx))
    return weights


def _ppl(sums: Tensor, counts: Tensor) -> Tensor:
    """exp(Σ NLL / Σ tokens) along the last dim; NaN where there is no token."""
    c = counts.to(torch.float64)
    return torch.where(c > 0, torch.exp(sums / c.clamp_min(1.0)), torch.full_like(c, math.nan))


def _interval(samples: Tensor) -> list[float] | None:
    """2.5% and 97.5% percentiles of ``samples`` (R,), NaN draws left out (a resample with no token in
    the bucket); None if every draw is NaN."""
    ok = samples[~torch.isnan(samples)]  # (R',)
    if ok.numel() == 0:
        return None
    return [float(torch.quantile(ok, 0.025)), float(torch.quantile(ok, 0.975))]


def _columns(sums: Tensor, counts: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Bucket name → its (D,) sums and counts; "all" sums the buckets."""
    cols = {name: (sums[:, j], counts[:, j]) for j, name in enumerate(BUCKETS)}
    cols[ALL] = (sums.sum(1), counts.sum(1))
    return cols


def summary(sums: Tensor, counts: Tensor, *, resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Perplexity of every bucket and of "all", with its 95% bootstrap interval over documents.

    ``sums`` (D, K) and ``counts`` (D, K) from :func:`bucket_sums`. Returns {name: {"ppl", "ci95"
    ([lo, hi] or None), "tokens", "documents" (that have tokens in the bucket)}}; ppl is None for a
    bucket without tokens."""
    w = _resamples(sums.shape[0], resamples, seed).to(torch.float64)  # (R, D)
    out = {}
    for name, (s, c) in _columns(sums, counts).items():
        total = int(c.sum())
        point = float(_ppl(s.sum(), c.sum())) if total else None
        boot = _ppl(w @ s, (w @ c.to(torch.float64)).round().to(torch.int64))  # (R,)
        out[name] = {"ppl": point, "ci95": _interval(boot) if total else None, "tokens": total,
                     "documents": int((c > 0).sum())}
    return out


def paired_difference(
    sums_a: Tensor, sums_b: Tensor, counts: Tensor, *, resamples: int = 2000, seed: int = 0
) -> dict[str, dict]:
    """Perplexity of model a minus that of model b on the same tokens, per bucket and "all", with a
    95% bootstrap interval that resamples documents jointly for both (a paired comparison).

    ``sums_a``, ``sums_b`` (D, K) NLL sums of the two models over the same documents, ``counts`` (D, K).
    Returns {name: {"diff", "ci95", "rel" (diff / ppl_b)}}; None entries where the bucket is empty."""
    if sums_a.shape != sums_b.shape or sums_a.shape != counts.shape:
        raise ValueError(f"paired_difference: shapes differ: sums_a {tuple(sums_a.shape)}, sums_b "
                         f"{tuple(sums_b.shape)}, counts {tuple(counts.shape)} (same documents needed)")
    w = _resamples(sums_a.shape[0], resamples, seed).to(torch.float64)  # (R, D)
    cols_a, cols_b = _columns(sums_a, counts), _columns(sums_b, counts)
    out = {}
    for name in cols_a:
        (sa, c), (sb, _) = cols_a[name], cols_b[name]
        if int(c.sum()) == 0:
            out[name] = {"diff": None, "ci95": None, "rel": None}
            continue
        pa, pb = float(_ppl(sa.sum(), c.sum())), float(_ppl(sb.sum(), c.sum()))
        cw = (w @ c.to(torch.float64)).round().to(torch.int64)  # (R,)
        boot = _ppl(w @ sa, cw) - _ppl(w @ sb, cw)  # (R,)
        out[name] = {"diff": pa - pb, "ci95": _interval(boot), "rel": (pa - pb) / pb}
    return out
