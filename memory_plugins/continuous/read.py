"""The continuous memory's read (Eqs. 8–11) as one scaled-dot-product attention, never (b, h, n, N).

Notation: b batch, h heads, n queries, d head dim, e model dim, N = W·C basis functions (W distinct
widths w_g, C centres c_j evenly spaced in [0, 1], width-major), Q = b·h·n queries in all, K centre
chunks, D the attention's last dim (q̃, k̃ and the values, zero-padded: D ≥ d and D ≥ W·(2K + 2)).

The read of query i in head h is z = Σ_j E_p[ψ_j] V_j with p = 𝒩(μ, σ²) and (Eq. 11)

    E_p[ψ_j] = 𝒩(μ; c_j, v_g) = exp(−(μ − c_j)²/(2 v_g) − ½ log(2π v_g)),  v_g = σ² + w_g²  (j in group g).

The exponent is an inner product of small features: with any offset a, x = μ − a and u = c_j − a, it
is q̃·k̃_j with q̃ = [−x²/(2v) − ½ log(2πv), x/v, −1/(2v)] and k̃_j = [1, u, u²]. Why offsets: the three
terms are each of size ~(μ − a)²/v and must cancel to ~(μ − c)²/v; with w = 0.01 (v ≈ 1e-4) and a
fixed a they reach ~1e3 even centred (a = ½), where float32 rounding (6e-8 relative) moves the
exponent by ~1e-4: the whole error budget of the read. So the centres are cut into K contiguous
chunks with their own offset a_k (their middle): the keys that carry weight lie near μ, hence near
their own a_k, and the terms stay ~(|μ − c| + ½ chunk)²/v. Each width group gets a block of
features: K α's and K β's (one per chunk) and one γ (−1/(2v) does not depend on the offset); a key
fills only its group's block, with 1 in its chunk's α, u in its β and u² in γ. K is set by the
narrowest width, then raised to fill the padding.

SDPA normalises by Σ_j exp(q̃·k̃_j); the read needs the plain sum. One extra key with a known logit L
and a zero value, L far above every log density (:func:`extra_logit`), makes the normaliser
e^L + Σ_j exp ℓ_j = e^L (1 + ε) with ε < e⁻²³ ≈ 1e-10, so z = e^L · o: a constant rescaling of
SDPA's output, differentiated exactly by SDPA's own backward (the function computed is e^L · o; it
differs from the ideal read by the relative ε). The logit comes from one feature column that is 1 in
every query and L in the extra key alone. No value column is spent on the normaliser, so D is d
whenever the features fit (D = 32 for d = 32 with the paper's widths). SDPA's backward ignores its
returned log-sum-exp, so un-normalising with it would give wrong gradients; the constant e^L needs
no gradient.

Precision: features, SDPA and the un-normalisation run in float32 (float64 for float64 inputs), with
autocast off: bf16 logits of size 1e3 would be meaningless. The value projection follows autocast (as
the dense read's does) and is cast up for the attention; z is returned in its dtype.
Kernels: CPU's fused (flash) kernel needs q, k and v of one last dim, hence one padded D for all
three. On CUDA, fp32 rules out the flash and cuDNN kernels; the memory-efficient kernel takes fp32
with last dims divisible by 4, so D is a multiple of 4.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .basis import expected_basis_grid
from .kernel import expected_values_triton, kernel_available

_LOG_2PI = math.log(2.0 * math.pi)
IMPLS = ("sdpa", "dense", "triton")
CHUNK_HALF_WIDTH = 10.0  # a chunk spans at most ±10 w_min around its offset (see feature_layout)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the Gaussian terms are computed in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian_params(q: Tensor, coef: Tensor, w_k: Tensor, w_mu: Tensor, w_sigma: Tensor,
                    sigma2_min: float) -> tuple[Tensor, Tensor]:
    """μ = sigmoid(w_μ·(K_h q)/√d), σ² = max(softplus(w_σ·(K_h q)/√d), σ²_min) (Eqs. 9–10), (b, h, n) each.

    w·(K_h q) = q·(K_hᵀ w) with K_hᵀ w = W_K,hᵀ (Bᵀ w): the (b, h, n, N) scores are never formed.
    ``q`` (b, h, n, d), ``coef`` (b, N, e), ``w_k`` (h·d, e), ``w_mu``/``w_sigma`` (N,) or (1, N).
    Computed in float32 (float64 for float64 queries) with autocast off.
    """
    b, h, n, d = q.shape
    ct = compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        maps = torch.stack([w_mu.reshape(-1), w_sigma.reshape(-1)]).to(ct)  # (2, N)
        bw = torch.einsum("kN,bNe->bke", maps, coef.to(ct))  # (b, 2, e) Bᵀ w
        kw = (F.linear(bw, w_k.to(ct)) / math.sqrt(d)).view(b, 2, h, d)  # (b, 2, h, d) K_hᵀ w / √d
        logits = torch.matmul(q.to(ct), kw.permute(0, 2, 3, 1))  # (b, h, n, 2) q read in place, no copy
        mu_logit, sigma_logit = logits.unbind(-1)  # (b, h, n) each; one stack in the backward, not two scatters
        mu = torch.sigmoid(mu_logit)  # (b, h, n) Eq. 9
        sigma2 = F.softplus(sigma_logit).clamp_min(sigma2_min)  # (b, h, n) Eq. 10
    return mu, sigma2


def value_heads(coef: Tensor, w_v: Tensor, num_heads: int) -> Tensor:
    """V_h = B W_V,hᵀ per head (Eq. 8): ``coef`` (b, N, e), ``w_v`` (h·d, e) → (b, h, N, d).

    Runs under autocast if enabled (bf16 values, as any projection of the host model)."""
    b, n_basis, _ = coef.shape
    v = F.linear(coef.to(w_v.dtype), w_v)  # (b, N, h·d)
    return v.view(b, n_basis, num_heads, -1).transpose(1, 2)  # (b, h, N, d)


# -- the Gaussian read as attention --------------------------------------------------------------------


def feature_layout(head_dim: int, num_widths: int, num_centres: int, min_width: float) -> tuple[int, int]:
    """(D, K): the attention's last dim and the number of centre chunks.

    Accuracy needs chunks no wider than 2·CHUNK_HALF_WIDTH·w_min (the narrowest width sets the size of
    the cancelling terms). D holds the d value columns and W blocks of D/W ≥ 2K + 2 columns (2K + 1
    features; the last column of the last block is the extra key's logit column); it is a multiple of
    4 (CUDA's fp32 kernels) and of W (equal blocks), as small as allowed. K then fills the blocks (at
    most C chunks: one centre each).
    """
    k_min = min(num_centres, math.ceil(1.0 / (2.0 * CHUNK_HALF_WIDTH * min_width) - 1e-6))  # w_min in fp32 or not
    step = 4 * num_widths // math.gcd(4, num_widths)  # lcm(4, W)
    dim = step * math.ceil(max(head_dim, num_widths * (2 * k_min + 2)) / step)
    return dim, min(num_centres, (dim // num_widths - 2) // 2)


def extra_logit(n_basis: int, min_width: float) -> float:
    """L, the extra key's logit: e^L ≥ e²³ · Σ_j exp ℓ_j for any query. Each log density is at most
    −½ log(2π w_min²) (v = σ² + w² ≥ w_min²), so the sum is at most N times that density."""
    return math.log(n_basis) - math.log(min_width) - 0.5 * math.log(2.0 * math.pi) + 23.0


def chunk_offsets(centres: Tensor, num_chunks: int) -> tuple[Tensor, Tensor]:
    """(chunk of each centre (C,) long, offset a_k of each chunk (K,)): K contiguous, near-equal chunks
    of the sorted centres, each offset the middle of its chunk's centres."""
    c = centres.numel()
    chunk = torch.arange(c, device=centres.device) * num_chunks // c  # (C,) 0 … K−1, non-decreasing
    lo = torch.full((num_chunks,), math.inf, device=centres.device, dtype=centres.dtype)  # (K,)
    hi = torch.full((num_chunks,), -math.inf, device=centres.device, dtype=centres.dtype)  # (K,)
    lo = lo.scatter_reduce(0, chunk, centres, "amin")  # (K,)
    hi = hi.scatter_reduce(0, chunk, centres, "amax")  # (K,)
    return chunk, 0.5 * (lo + hi)  # (C,), (K,)


def key_features(centres: Tensor, chunk: Tensor, offsets: Tensor, num_widths: int, dim: int,
                 logit: float) -> Tensor:
    """k̃ for the N basis keys plus the extra key: (N + 1, D).

    Width group g owns the block of columns g·D/W + [0, D/W): [0, K) the α's (one per chunk), [K, 2K)
    the β's, 2K the γ shared by its chunks, the rest padding. Key j = g·C + c of chunk k holds 1 in
    α_k, u = c_j − a_k in β_k and u² in γ of its group's block; every other column is 0. The extra
    key holds ``logit`` (L) in the last column, where every query holds 1, and 0 elsewhere.
    """
    c_count, k_count = centres.numel(), offsets.numel()
    u = centres - offsets[chunk]  # (C,)
    block = centres.new_zeros(c_count, dim // num_widths)  # (C, D/W) one width group's block
    rows = torch.arange(c_count, device=centres.device)  # (C,)
    block[rows, chunk] = 1.0
    block[rows, k_count + chunk] = u
    block[:, 2 * k_count] = u * u
    keys = torch.block_diag(*[block] * num_widths)  # (N, D) width-major keys
    extra = F.pad(centres.new_full((1, 1), logit), (dim - 1, 0))  # (1, D) L in the last column
    return torch.cat([keys, extra])  # (N + 1, D) the last row is the extra key


class ReadConstants(NamedTuple):
    """The fused read's constants for one basis and head dim (:func:`sdpa_constants`), in the read's
    dtype. Queries' features are built from the last five in a handful of ops (:class:`_QueryFeatures`)."""

    keys: Tensor  # (N + 1, D) k̃ of the basis keys, then the extra key
    half_offsets: Tensor  # (K,) a_k / 2, the chunks' offsets halved
    widths_sq: Tensor  # (W,) w_g²
    log_cols: Tensor  # (D/W,) −½ in the α columns of a block, 0 elsewhere: the weight of log v
    base: Tensor  # (W, D/W) −½ log 2π in every α column, 1 in the extra key's logit column, 0 elsewhere
    tail: Tensor  # (D/W − 2K,) ¼ (the γ column of f), then zeros


class _QueryFeatures(torch.autograd.Function):
    """q̃ (b, h, n, D) from μ, σ² (b, h, n), in eight ops forward and seven backward.

    Group g's block is α_k = −x_k²/(2v) − ½ log(2πv), β_k = x_k/v, γ = −1/(2v) with x_k = μ − a_k,
    v = σ² + w_g², then zeros (the last column of the last block 1, the extra key's logit column). With
    y_k = −x_k/2 and r = 1/v the block is an outer product plus a constant:

        block_g = base_g + log v_g · log_cols − 2 r_g · f,  f = [y_0² … y_{K−1}², y_0 … y_{K−1}, ¼, 0 …],

    since −2r·y² = −r x²/2, −2r·y = r x and −2r·¼ = −r/2. The Q = b·h·n queries lead every buffer,
    so the (Q, W, D/W) result is q̃ in place, with no transposed copy. Why by hand: the features are
    tiny per query (D ≲ 64), and on a GPU each op of autograd's version (broadcasts, reductions over
    the blocks) is a kernel launch; the backward here reduces over blocks and chunks with three small
    matrix products.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, sigma2: Tensor, half_offsets: Tensor, widths_sq: Tensor, log_cols: Tensor,  # type: ignore[override]
                base: Tensor, tail: Tensor) -> Tensor:
        q_count = mu.numel()
        y = torch.add(half_offsets, mu.reshape(q_count, 1), alpha=-0.5)  # (Q, K) y_k = (a_k − μ)/2
        f = torch.cat([y * y, y, tail.expand(q_count, -1)], dim=1)  # (Q, D/W)
        var = torch.add(widths_sq, sigma2.reshape(q_count, 1))  # (Q, W) v = σ² + w²
        inv = var.reciprocal()  # (Q, W) r
        feats = torch.addcmul(base, var.log()[:, :, None], log_cols)  # (Q, W, D/W) −½ log(2πv) in the α's
        feats.addcmul_(inv[:, :, None], f[:, None, :], value=-2.0)  # (Q, W, D/W) q̃, block by block
        ctx.save_for_backward(y, f, inv, log_cols)
        return feats.view(*mu.shape, -1)  # (b, h, n, D)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        y, f, inv, log_cols = ctx.saved_tensors  # (Q, K), (Q, D/W), (Q, W), (D/W,)
        (q_count, num_w), num_k = inv.shape, y.shape[1]
        with torch.autocast(device_type=grad.device.type, enabled=False):  # a backward under autocast keeps float32
            g = grad.reshape(q_count, num_w, -1)  # (Q, W, D/W)
            d_mu = d_sigma2 = None
            if ctx.needs_input_grad[0]:  # ∂q̃/∂y = −2r·∂f/∂y summed over blocks; ∂y/∂μ = −½
                g_f = torch.bmm(inv[:, None, :], g)[:, 0]  # (Q, D/W) Σ_g r_g g_g (= −½ ∂L/∂f)
                d_y = torch.addcmul(g_f[:, num_k : 2 * num_k], y, g_f[:, :num_k], value=2.0)  # (Q, K) −½ ∂L/∂y
                d_mu = d_y.sum(dim=1).view(grad.shape[:-1])  # (b, h, n)
            if ctx.needs_input_grad[1]:  # ∂L/∂v = −r² ∂L/∂r + r ∂L/∂log v with ∂L/∂r = −2 Σ_j g_j f_j
                g_r = torch.bmm(g, f[:, :, None])[:, :, 0]  # (Q, W) Σ_j g_j f_j
                g_log = torch.matmul(g, log_cols)  # (Q, W) ∂L/∂log v
                d_var = torch.addcmul(g_log, inv, g_r, value=2.0)  # (Q, W) v ∂L/∂v
                d_sigma2 = torch.bmm(d_var[:, None, :], inv[:, :, None]).view(grad.shape[:-1])  # (b, h, n) Σ_g r_g (v ∂L/∂v)_g
        return d_mu, d_sigma2, None, None, None, None, None


def query_features(mu: Tensor, sigma2: Tensor, constants: ReadConstants) -> Tensor:
    """q̃ for every query (see :class:`_QueryFeatures`): μ, σ² (b, h, n) → (b, h, n, D)."""
    c = constants
    return _QueryFeatures.apply(mu, sigma2, c.half_offsets, c.widths_sq, c.log_cols, c.base, c.tail)


class _Rescale(torch.autograd.Function):
    """z = e^L · o_V from the SDPA output (b, h, n, D): its first d columns, rescaled. The gradient is
    written straight as one contiguous (b, h, n, D) tensor (what SDPA's backward wants), zero in the
    padding columns.

    Eager, z (b, h, n, d) is returned as a view of a (b, n, h, d) buffer: the heads' concatenation that
    W_O reads, (b, n, h·d), is then a free view instead of a transposed copy."""

    @staticmethod
    def forward(ctx, out: Tensor, head_dim: int, scale: float) -> Tensor:  # type: ignore[override]
        if torch.compiler.is_compiling():  # the compiler picks layouts itself (and refuses strided out=)
            z = out[..., :head_dim] * scale  # (b, h, n, d)
        else:
            b, h, n, _ = out.shape
            z = out.new_empty(b, n, h, head_dim).transpose(1, 2)  # (b, h, n, d) strides of (b, n, h, d)
            torch.mul(out[..., :head_dim], scale, out=z)  # (b, h, n, d)
        ctx.scale, ctx.pad = scale, out.shape[-1] - head_dim
        return z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        return F.pad(grad * ctx.scale, (0, ctx.pad)), None, None  # (b, h, n, D)


def sdpa_constants(centres: Tensor, widths: Tensor, head_dim: int, min_width: float) -> ReadConstants:
    """The fused read's constants for one basis and head dim, in the dtype of ``centres`` (C,);
    ``widths`` (W,). A caller that reads often caches them (``BasisCache.read_constants``): building
    them is some thirty small ops."""
    num_w, num_c = widths.numel(), centres.numel()
    dim, num_k = feature_layout(head_dim, num_w, num_c, min_width)
    chunk, offsets = chunk_offsets(centres, num_k)  # (C,), (K,)
    keys = key_features(centres, chunk, offsets, num_w, dim, extra_logit(num_w * num_c, min_width))  # (N + 1, D)
    block = dim // num_w  # D/W
    log_cols = centres.new_zeros(block)  # (D/W,)
    log_cols[:num_k] = -0.5
    base = log_cols.mul(_LOG_2PI).repeat(num_w, 1)  # (W, D/W) −½ log 2π in the α columns
    base[-1, -1] = 1.0  # the extra key's logit column
    tail = centres.new_zeros(block - 2 * num_k)  # (D/W − 2K,)
    tail[0] = 0.25
    return ReadConstants(keys, 0.5 * offsets, widths.to(centres.dtype) ** 2, log_cols, base, tail)


def expected_values_sdpa(mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor,
                         min_width: float | None = None, constants: ReadConstants | None = None) -> Tensor:
    """z = Σ_j 𝒩(μ; c_j, σ² + w_j²) V_j through one SDPA over the N + 1 keys: (b, h, n, d).

    ``mu``, ``sigma2`` (b, h, n); ``v`` (b, h, N, d); ``centres`` (C,), ``widths`` (W,) the distinct
    centres and widths (N = W·C, width-major); ``min_width`` min(widths) as a float (None: read from
    ``widths``, a device sync on a GPU); ``constants`` :func:`sdpa_constants` of these (in the dtype
    of ``mu``), or None to build them. Computed in the dtype of ``mu`` (float32/64), autocast off;
    returned in the dtype of ``v``.
    """
    b, h, n_basis, d = v.shape
    ct = mu.dtype
    num_w, num_c = widths.numel(), centres.numel()
    if num_w * num_c != n_basis:
        raise ValueError(f"continuous read: {num_w} widths × {num_c} centres ≠ {n_basis} value rows")
    if min_width is None:
        min_width = float(widths.min())
    logit = extra_logit(n_basis, min_width)  # L
    with torch.autocast(device_type=mu.device.type, enabled=False):
        if constants is None:
            constants = sdpa_constants(centres.to(ct), widths, d, min_width)
        keys = constants.keys  # (N + 1, D)
        dim = keys.shape[1]  # D
        queries = query_features(mu, sigma2, constants)  # (b, h, n, D)
        values = F.pad(v.to(ct), (0, dim - d, 0, 1))  # (b, h, N + 1, D) the extra key's value row is 0
        keys = keys.expand(b, h, -1, -1)  # (b, h, N + 1, D) stride 0 over b, h: read in place on CPU
        if keys.device.type != "cpu":  # some CUDA memory-efficient kernels mis-index stride-0 K/V (pytorch#191937)
            keys = keys.contiguous()  # (b, h, N + 1, D)
        out = F.scaled_dot_product_attention(queries, keys, values, scale=1.0)  # (b, h, n, D)
        z = _Rescale.apply(out, d, math.exp(logit))  # (b, h, n, d) e^L · o_V = Σ_j exp(ℓ_j) V_j
    return z.to(v.dtype)


def expected_values_dense(mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor,
                          min_width: float | None = None, constants: ReadConstants | None = None) -> Tensor:
    """The same z through the materialised E_p[ψ] (b, h, n, N) (the reference and fallback).

    E_p[ψ] is built in the dtype of ``mu`` with autocast off, then multiplied with ``v`` in its dtype
    (bf16 under autocast, as the read always did). Returns (b, h, n, d) in the dtype of ``v``;
    ``min_width`` and ``constants`` are unused (the signature matches :func:`expected_values_sdpa`).
    """
    with torch.autocast(device_type=mu.device.type, enabled=False):
        e_psi = expected_basis_grid(mu, sigma2, centres, widths)  # (b, h, n, N) E_p[ψ], Eq. 11
    return torch.matmul(e_psi.to(v.dtype), v)  # (b, h, n, d) z_{h,i} = V_hᵀ E_p[ψ]


def gaussian_read(q: Tensor, coef: Tensor, w_k: Tensor, w_v: Tensor, w_mu: Tensor, w_sigma: Tensor,
                  centres: Tensor, widths: Tensor, sigma2_min: float,
                  impl: str = "sdpa", min_width: float | None = None,
                  constants: ReadConstants | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The LTM read before W_O (Eqs. 8–11): ``(z (b, h, n, d), μ (b, h, n), σ² (b, h, n))``.

    ``q`` (b, h, n, d) the host's queries; ``coef`` (b, N, e) the LTM coefficients B; ``w_k``, ``w_v``
    (h·d, e) the key/value projections' weights; ``w_mu``, ``w_sigma`` (N,) or (1, N) the maps N → 1;
    ``centres`` (C,), ``widths`` (W,) the distinct centres and widths (``BasisCache.grid``);
    ``sigma2_min`` the clamp of σ²; ``min_width`` min(widths) as a Python float (sizes the SDPA's
    features; None reads it from ``widths``, a device sync on a GPU); ``constants`` the fused read's
    :func:`sdpa_constants` (None: built per call). ``impl``: "sdpa" (fused attention, no (b, h, n, N)
    tensor), "dense" (materialised E_p[ψ]) or "triton" (the read's own kernels, :mod:`.kernel`, on
    CUDA in float32; "sdpa" wherever they do not run). μ, σ² are float32 (float64
    for float64 queries); z has the dtype of the value projection (bf16 under bf16 autocast).
    """
    if impl not in IMPLS:
        raise ValueError(f"continuous read: impl must be one of {IMPLS}, got {impl!r}")
    mu, sigma2 = gaussian_params(q, coef, w_k, w_mu, w_sigma, sigma2_min)  # (b, h, n), (b, h, n)
    v = value_heads(coef, w_v, q.shape[1])  # (b, h, N, d)
    if impl == "triton" and not kernel_available(mu.device, mu.dtype, q.shape[-1], max(q.numel(), v.numel())):
        impl = "sdpa"  # the kernel is CUDA's (float32's, heads ≤ 512 wide, < 2³¹ elements): elsewhere SDPA
    read = {"sdpa": expected_values_sdpa, "dense": expected_values_dense, "triton": expected_values_triton}[impl]
    return read(mu, sigma2, v, centres, widths, min_width, constants), mu, sigma2  # (b, h, n, d), (b, h, n), (b, h, n)
