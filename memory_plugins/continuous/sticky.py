"""Sticky memories (§3.3, App. B): where the old signal is sampled on the next update.

Notation: b batch, h heads, n queries, D bins, M samples.

The attention a read gave the memory, Σ_heads Σ_queries 𝒩(t; μ, σ²), is binned over D equal bins of
[0, 1] (Eq. 16; mass outside [0, 1] is dropped and the histogram renormalised). The next update
samples the old signal at M locations distributed like that histogram, so regions that were
attended get more of the new signal's room. Sampling inverts the histogram's CDF, interpolating
linearly inside a bin (the density is taken as uniform within a bin), so locations can fall anywhere
in [0, 1], not only on bin edges.

``"random"`` sampling draws its uniforms from a counter-based generator whose state is part of the
memory state: per sample, ``rng`` (b, 2) int64 = (seed, counter), both in [0, 2³²). Draw j of an update
is a hash of (seed, counter, j), so a draw needs no global RNG, no host sync and no device-specific
generator: the same state gives the same locations on any device, compiled or not, and a saved and
restored state continues bit-exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .basis import cell_centres


def attention_histogram(mu: Tensor, sigma2: Tensor, num_bins: int, valid: Tensor | None = None) -> Tensor:
    """p(d_j) ∝ Σ_h Σ_i ∫_{d_j} 𝒩(t; μ_{h,i}, σ²_{h,i}) dt (Eqs. 16–17), normalised to sum 1.

    ``mu``, ``sigma2`` (b, h, n) → (b, D) float32; ``valid`` (b, n) leaves padded queries out. The bin
    integrals are differences of the normal CDF Φ((edge − μ)/σ) = ½(1 + erf((edge − μ)/(σ√2))). A
    sample whose attention misses [0, 1] entirely gets the uniform histogram.
    """
    mu32, sd = mu.detach().float(), sigma2.detach().float().sqrt()  # (b, h, n), (b, h, n)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, device=mu.device, dtype=torch.float32)  # (D + 1,)
    cdf = torch.special.ndtr((edges - mu32[..., None]) / sd[..., None])  # (b, h, n, D + 1)
    bins = cdf[..., 1:] - cdf[..., :-1]  # (b, h, n, D)
    if valid is not None:
        bins = torch.where(valid[:, None, :, None], bins, 0.0)  # (b, h, n, D) padded queries out, NaN ones too
    mass = bins.sum(dim=(1, 2))  # (b, D)
    total = mass.sum(dim=-1, keepdim=True)  # (b, 1)
    uniform = torch.full_like(mass, 1.0 / num_bins)  # (b, D)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(mass.dtype).tiny), uniform)  # (b, D)


def uniform_histogram(batch_size: int, num_bins: int, device: torch.device) -> Tensor:
    """The histogram of a memory that has received no attention yet: (b, D), every bin 1/D."""
    return torch.full((batch_size, num_bins), 1.0 / num_bins, device=device, dtype=torch.float32)  # (b, D)


_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2³² / φ: spreads consecutive indices over the 32-bit range


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x · c mod 2³²`` for int64 ``x`` in [0, 2³²) without int64 overflow (16-bit halves)."""
    hi = (((x >> 16) * c) & 0xFFFF) << 16  # high half's product, its low 16 bits moved up
    return (hi + (x & 0xFFFF) * c) & _MASK32


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply, lowbias32 constants) of int64 ``x`` in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def initial_rng(seed: int, stream: int, batch_size: int, device: torch.device) -> Tensor:
    """The generator state of fresh samples: (b, 2) int64, seed of sample i = hash(seed, stream, i),
    counter 0. Distinct per sample and per ``stream`` (the layer), the same on every device."""
    i = torch.arange(batch_size, dtype=torch.int64, device=device)  # (b,)
    layer = mix32(torch.full_like(i, (stream * _GOLDEN + 1) & _MASK32))  # (b,)
    key = mix32(torch.full_like(i, seed & _MASK32) ^ layer)  # (b,) the seed and the stream
    seeds = mix32(key ^ _mul32(i + 1, _GOLDEN))  # (b,) distinct per sample: mix32 is a bijection
    return torch.stack([seeds, torch.zeros_like(seeds)], dim=1)  # (b, 2)


def counter_uniforms(rng: Tensor, num: int) -> Tensor:
    """``num`` uniforms in (0, 1) per sample from its (seed, counter) ``rng`` (b, 2): (b, num) float32.

    u_j = (hash(hash(seed ^ hash(counter)) + j·φ) with 24 bits kept + ½) / 2²⁴: never exactly 0 or 1."""
    seed, counter = rng[:, 0], rng[:, 1]  # (b,), (b,)
    base = mix32(seed ^ mix32(counter & _MASK32))  # (b,)
    j = torch.arange(num, dtype=torch.int64, device=rng.device)  # (M,)
    h = mix32(mix32((base[:, None] + _mul32(j, _GOLDEN)[None]) & _MASK32))  # (b, M)
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24  # (b, M)


def advance_rng(rng: Tensor, used: Tensor) -> Tensor:
    """``rng`` (b, 2) with the counter of the samples where ``used`` (b,) is True moved on by one."""
    return torch.stack([rng[:, 0], (rng[:, 1] + used.to(torch.int64)) & _MASK32], dim=1)  # (b, 2)


def sample_locations(
    hist: Tensor, num_samples: int, mode: str = "quantile", generator: torch.Generator | None = None,
    rng: Tensor | None = None,
) -> Tensor:
    """M locations in [0, 1] distributed like ``hist`` (b, D), in increasing order: (b, M) float32.

    ``"quantile"``: the inverse CDF at the cell-centred quantiles u_m = (m + ½)/M (deterministic; with
    a uniform histogram this is exactly the linear spacing (m + ½)/M). ``"random"``: at M sorted
    uniform draws, from the per-sample counter-based generator state ``rng`` (b, 2) when given (see
    :func:`counter_uniforms`; the memory passes its own), else from ``generator`` / the global RNG.
    Inside bin j, t = (j + (u − C_j)/p_j)/D with C_j the mass of the bins before j.
    """
    b, d = hist.shape
    p = hist.float().clamp_min(0.0)  # (b, D)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)  # (b, D)
    upper = p.cumsum(dim=-1)  # (b, D) C_{j+1}
    upper[:, -1] = 1.0  # exact total despite rounding
    lower = upper - p  # (b, D) C_j
    if mode == "quantile":
        u = cell_centres(num_samples, 0.0, 1.0, torch.float32).to(hist.device).expand(b, num_samples)  # (b, M)
    elif mode == "random":
        u = counter_uniforms(rng, num_samples) if rng is not None else torch.rand(
            b, num_samples, device=hist.device, generator=generator)  # (b, M)
        u = u.sort(dim=-1).values  # (b, M)
    else:
        raise ValueError(f"sample_locations: mode must be 'quantile' or 'random', got {mode!r}")
    j = torch.searchsorted(upper, u.contiguous(), right=True).clamp(max=d - 1)  # (b, M) bin with C_j ≤ u < C_{j+1}
    lo, pj = lower.gather(1, j), p.gather(1, j)  # (b, M), (b, M)
    frac = ((u - lo) / pj.clamp_min(torch.finfo(p.dtype).tiny)).clamp(0.0, 1.0)  # (b, M)
    return (j.to(torch.float32) + frac) / d  # (b, M)
