"""The Triton kernels of the continuous memory's read (see :mod:`.kernel`, which imports this module
only when a read runs them, and re-imports it when ``TRITON_INTERPRET`` changes: ``triton.jit``
reads the variable when it decorates).

Notation: BM × BN a tile of queries × keys, BD ≥ d the head dim's tile; tensors are addressed as
μ, σ² (b·h, n) and z, dz (b, n, h, d), contiguous; V and ∂V (b, h, N, d) through their strides (sv*, sdv*:
sample, head, key; unit stride along d), so that V = W_V B is read where the projection left it. V, z, dz
and ∂V are float32, bf16 or fp16; every product and sum runs in float32.
"""

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0")  # what triton.jit saw when it decorated these


@triton.jit
def density(mu, s2, c_ptr, w_ptr, sw, keys, mask_n, num_c):
    """p (BM, BN) of queries (μ, σ²) (BM,) against ``keys`` (BN,) global key indices, and (μ − c), 1/v.
    The widths are read with their stride ``sw`` (every C-th of the per-key widths, no copy)."""
    c = tl.load(c_ptr + keys % num_c, mask=mask_n, other=0.0)  # (BN,)
    w = tl.load(w_ptr + (keys // num_c) * sw, mask=mask_n, other=1.0)  # (BN,)
    inv = 1.0 / (s2[:, None] + (w * w)[None, :])  # (BM, BN) 1/v
    diff = mu[:, None] - c[None, :]  # (BM, BN) μ − c
    p = tl.exp(-0.5 * diff * diff * inv) * tl.sqrt(inv) * 0.3989422804014327  # (BM, BN) 1/√(2π) = 0.39894…
    return tl.where(mask_n[None, :], p, 0.0), diff, inv


@triton.jit
def forward_kernel(mu_ptr, s2_ptr, v_ptr, c_ptr, w_ptr, z_ptr, n, n_keys, num_c, heads, d, sw, svb, svh, svn,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    bh, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BM + tl.arange(0, BM)  # (BM,) query indices
    cols = tl.arange(0, BD)  # (BD,)
    mask_m, mask_d = rows < n, cols < d
    b, h = bh // heads, bh % heads
    mu = tl.load(mu_ptr + bh * n + rows, mask=mask_m, other=0.5)  # (BM,)
    s2 = tl.load(s2_ptr + bh * n + rows, mask=mask_m, other=1.0)  # (BM,)
    acc = tl.zeros((BM, BD), dtype=tl.float32)  # (BM, BD)
    for start in range(0, n_keys, BN):
        keys = start + tl.arange(0, BN)  # (BN,)
        mask_n = keys < n_keys
        p, _, _ = density(mu, s2, c_ptr, w_ptr, sw, keys, mask_n, num_c)  # (BM, BN)
        v = tl.load(v_ptr + b * svb + h * svh + keys[:, None] * svn + cols[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BN, BD)
        acc += tl.dot(p, v, input_precision="ieee")  # (BM, BD)
    out = z_ptr + b * n * heads * d + rows[:, None] * heads * d + h * d + cols[None, :]  # z (b, n, h, d)
    tl.store(out, acc, mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def query_grad_kernel(mu_ptr, s2_ptr, v_ptr, c_ptr, w_ptr, dz_ptr, dmu_ptr, ds2_ptr, n, n_keys, num_c, heads, d,
                      sw, svb, svh, svn, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    bh, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BM + tl.arange(0, BM)  # (BM,)
    cols = tl.arange(0, BD)  # (BD,)
    mask_m, mask_d = rows < n, cols < d
    mu = tl.load(mu_ptr + bh * n + rows, mask=mask_m, other=0.5)  # (BM,)
    s2 = tl.load(s2_ptr + bh * n + rows, mask=mask_m, other=1.0)  # (BM,)
    b, h = bh // heads, bh % heads
    dz = tl.load(dz_ptr + b * n * heads * d + rows[:, None] * heads * d + h * d + cols[None, :],
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BM, BD) dz (b, n, h, d)
    d_mu = tl.zeros((BM,), dtype=tl.float32)  # (BM,)
    d_s2 = tl.zeros((BM,), dtype=tl.float32)  # (BM,)
    for start in range(0, n_keys, BN):
        keys = start + tl.arange(0, BN)  # (BN,)
        mask_n = keys < n_keys
        p, diff, inv = density(mu, s2, c_ptr, w_ptr, sw, keys, mask_n, num_c)  # (BM, BN) ×3
        v = tl.load(v_ptr + b * svb + h * svh + keys[:, None] * svn + cols[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BN, BD)
        g = tl.dot(dz, tl.trans(v), input_precision="ieee") * p  # (BM, BN) s·p
        d_mu -= tl.sum(g * diff * inv, axis=1)  # (BM,)
        d_s2 += tl.sum(g * (0.5 * diff * diff * inv - 0.5) * inv, axis=1)  # (BM,)
    tl.store(dmu_ptr + bh * n + rows, d_mu, mask=mask_m)
    tl.store(ds2_ptr + bh * n + rows, d_s2, mask=mask_m)


@triton.jit
def value_grad_kernel(mu_ptr, s2_ptr, c_ptr, w_ptr, dz_ptr, dv_ptr, n, n_keys, num_c, heads, d,
                      sw, sdvb, sdvh, sdvn, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    bh, tile = tl.program_id(0), tl.program_id(1)
    keys = tile * BN + tl.arange(0, BN)  # (BN,)
    cols = tl.arange(0, BD)  # (BD,)
    mask_n, mask_d = keys < n_keys, cols < d
    b, h = bh // heads, bh % heads
    acc = tl.zeros((BN, BD), dtype=tl.float32)  # (BN, BD)
    for start in range(0, n, BM):
        rows = start + tl.arange(0, BM)  # (BM,)
        mask_m = rows < n
        mu = tl.load(mu_ptr + bh * n + rows, mask=mask_m, other=0.5)  # (BM,)
        s2 = tl.load(s2_ptr + bh * n + rows, mask=mask_m, other=1.0)  # (BM,)
        p, _, _ = density(mu, s2, c_ptr, w_ptr, sw, keys, mask_n, num_c)  # (BM, BN)
        p = tl.where(mask_m[:, None], p, 0.0)  # (BM, BN)
        dz = tl.load(dz_ptr + b * n * heads * d + rows[:, None] * heads * d + h * d + cols[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BM, BD)
        acc += tl.dot(tl.trans(p), dz, input_precision="ieee")  # (BN, BD)
    tl.store(dv_ptr + b * sdvb + h * sdvh + keys[:, None] * sdvn + cols[None, :], acc,
             mask=mask_n[:, None] & mask_d[None, :])  # cast to ∂V's dtype
