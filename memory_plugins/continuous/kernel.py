"""The continuous memory's read as one Triton kernel forward and two backward (``read_impl="triton"``).

Notation: b batch, h heads, n queries, d head dim, N = W·C basis functions (width-major: key j has
centre c_{j mod C} and width w_{⌊j/C⌋}), BM × BN a tile of queries × keys, BD ≥ d a power of two ≥ 16.

The read z_i = Σ_j p_ij V_j with p_ij = 𝒩(μ_i; c_j, v_ij), v_ij = σ²_i + w_j² (Eq. 11) needs no
softmax: each density is at most 1/√(2π w_min²), so the sum is formed directly, tile by tile, with
the exponent computed as it stands, −(μ − c)²/(2v), in float32 (no cancelling features, unlike the
SDPA read of :mod:`.read`). Gradients (s_ij = dz_i·V_j, the density's sensitivity):

    ∂L/∂V_j = Σ_i p_ij dz_i,   ∂L/∂μ_i = −Σ_j s_ij p_ij (μ_i − c_j)/v_ij,
    ∂L/∂σ²_i = Σ_j s_ij p_ij ((μ_i − c_j)²/(2v_ij²) − 1/(2v_ij)).

Forward: one program per (sample·head, query tile) sweeps the keys. Backward: one kernel per query
tile for ∂μ, ∂σ² (sweeping keys), one per key tile for ∂V (sweeping queries); p is recomputed, never
stored. Matrix products use ``input_precision="ieee"`` (TF32 would cost ~1e-3 relative).

Where it runs: CUDA tensors with the ``triton`` package, and any device under ``TRITON_INTERPRET=1``
(Triton's interpreter: how the CPU tests run it). :func:`kernel_available` says whether a read on a
device takes it; elsewhere the read goes through SDPA (float64 reads too). The
kernels are registered as the operators ``memory_plugins::gauss_read`` and its backward, so a
compiled graph calls them without a break and CUDA graphs capture them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Any, ContextManager

import torch
from torch import Tensor

from ..graph_ops import graph_op

# found, not imported; the kernels' gradients are registered through torch.library.custom_op (torch ≥ 2.4)
_HAS_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "custom_op")
MAX_HEAD_DIM = 512  # larger head dims read through SDPA (the kernels' tiles would outgrow shared memory)
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # V, z, dz, ∂V as they come; the sums are float32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _beyond_limits(head_dim: int, elements: int) -> str | None:
    """Why a read of this size cannot run the kernels (None if it can): heads wider than ``MAX_HEAD_DIM``,
    or a tensor (``elements``: the largest of queries, values and output) past their 32-bit offsets."""
    if head_dim > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    if elements >= 2**31:
        return f"the Triton kernels index tensors of fewer than 2**31 elements, got {elements}"
    return None


def kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int = 64, elements: int = 0) -> bool:
    """Whether a read of ``dtype`` on ``device`` runs the kernel: float32 (the read's compute dtype for
    every float32/bf16/fp16 model) on CUDA, or anywhere under the interpreter; triton installed; a size
    within the kernels' limits (:func:`_beyond_limits`)."""
    return (_HAS_TRITON and dtype == torch.float32 and _beyond_limits(head_dim, elements) is None
            and (device.type == "cuda" or _interpreting()))


def _build() -> Any:
    """The kernels' module, jitted under the current ``TRITON_INTERPRET`` (re-imported if it changed)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # a clear error where the kernel is forced (kernel_available guards the backend)
        raise ImportError("the continuous memory's read_impl='triton' needs the triton package "
                          "(pip install triton; CUDA builds of torch ship it)") from err
    from . import _triton_read

    if _triton_read.INTERPRET != os.environ.get("TRITON_INTERPRET", "0"):
        importlib.reload(_triton_read)
    return _triton_read


def tiles(d: int) -> tuple[int, int, int, int]:
    """(BM, BN, BD, pipeline stages) for head dim ``d``: BD the head-dim tile, the next power of two ≥ d
    and at least 16 (tl.dot); each kernel then needs at most 64 KiB of shared memory per block (checked
    by compiling them, tests/test_continuous_kernel.py), which every GPU since Turing (64 KiB) has. Wide
    heads get smaller query × key tiles and shallower pipelines."""
    block_d = max(16, 1 << (d - 1).bit_length())
    if block_d <= 64:
        return 64, 64, block_d, 3
    if block_d <= 128:
        return 64, 64, block_d, 2
    if block_d <= 256:
        return 32, 32, block_d, 2
    return 16, 16, block_d, 1


def _read_fake(mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    b, h, n = mu.shape
    return v.new_empty(b, n, h, v.shape[-1])  # (b, n, h, d)


def _on(device: torch.device) -> ContextManager[Any]:
    """Launch on ``device``: Triton launches on the current CUDA device, whatever the tensors' (a model on
    cuda:1 would otherwise hand cuda:0 a kernel with cuda:1 pointers)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _unit_d(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernels step along the last dim one element at a time


def _value_grad_buffer(v: Tensor) -> Tensor:
    """∂V's buffer (b, h, N, d): V's own layout where it is dense with a unit stride along d (the head
    split of W_V B, so the projection's backward reads ∂V without a copy), else contiguous. The same
    rule for real and fake tensors, so a compiled graph sees the strides the kernel writes."""
    out = torch.empty_like(v)
    return out if out.stride(-1) == 1 else torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _read_backward(ctx: Any, dz: Tensor) -> tuple[Tensor | None, ...]:
    mu, sigma2, v, centres, widths = ctx.saved_tensors
    d_mu, d_sigma2, d_v = gauss_read_backward(dz, mu, sigma2, v, centres, widths)
    return d_mu, d_sigma2, d_v, None, None


def _read_setup(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


@graph_op("gauss_read", fake=_read_fake, backward=_read_backward, setup=_read_setup, capturable=True)
def gauss_read(mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """z (b, n, h, d) = Σ_j 𝒩(μ; c_j, σ² + w_j²) V_j in V's dtype. ``mu``, ``sigma2`` (b, h, n) float32;
    ``v`` (b, h, N, d) of a dtype in ``_VALUE_DTYPES``; ``centres`` (C,), ``widths`` (W,) float32, N = W·C
    width-major. Any layout: V (the head split of W_V B) and the widths (every C-th per-key width) are
    read through their strides; μ, σ², the centres are made contiguous (the backend's already are)."""
    kernels = _build()
    mu, sigma2, v, centres = mu.contiguous(), sigma2.contiguous(), _unit_d(v), centres.contiguous()
    b, h, n = mu.shape
    n_keys, d = v.shape[-2:]
    z = v.new_empty(b, n, h, d)  # (b, n, h, d)
    bm, bn, block_d, stages = tiles(d)
    with _on(v.device):
        kernels.forward_kernel[(b * h, _cdiv(n, bm))](mu, sigma2, v, centres, widths, z, n, n_keys, centres.numel(), h,
                                                      d, widths.stride(0), *v.stride()[:3], BM=bm, BN=bn, BD=block_d,
                                                      num_stages=stages)
    return z


def _backward_fake(dz: Tensor, mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    return mu.new_empty(mu.shape), sigma2.new_empty(sigma2.shape), _value_grad_buffer(v)  # μ, σ²: contiguous


@graph_op("gauss_read_backward", fake=_backward_fake, capturable=True)
def gauss_read_backward(dz: Tensor, mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor,
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂μ (b, h, n), ∂L/∂σ² (b, h, n), ∂L/∂V (b, h, N, d)) from ``dz`` (b, n, h, d) in z's dtype; ∂V
    has V's dtype and, where V is dense, its layout (:func:`_value_grad_buffer`)."""
    kernels = _build()
    d_mu, d_sigma2, d_v = _backward_fake(dz, mu, sigma2, v, centres, widths)  # (b, h, n) ×2 contiguous, (b, h, N, d)
    dz, mu, sigma2, v, centres = dz.contiguous(), mu.contiguous(), sigma2.contiguous(), _unit_d(v), centres.contiguous()
    b, h, n = mu.shape
    n_keys, d = v.shape[-2:]
    bm, bn, block_d, stages = tiles(d)
    sizes = dict(n=n, n_keys=n_keys, num_c=centres.numel(), heads=h, d=d, sw=widths.stride(0), BM=bm, BN=bn,
                 BD=block_d, num_stages=stages)
    sv, sdv = v.stride(), d_v.stride()
    with _on(v.device):
        kernels.query_grad_kernel[(b * h, _cdiv(n, bm))](mu, sigma2, v, centres, widths, dz, d_mu, d_sigma2,
                                                         svb=sv[0], svh=sv[1], svn=sv[2], **sizes)
        kernels.value_grad_kernel[(b * h, _cdiv(n_keys, bn))](mu, sigma2, centres, widths, dz, d_v,
                                                              sdvb=sdv[0], sdvh=sdv[1], sdvn=sdv[2], **sizes)
    return d_mu, d_sigma2, d_v


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expected_values_triton(mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor,
                           min_width: float | None = None, constants: Any = None) -> Tensor:
    """z = Σ_j 𝒩(μ; c_j, σ² + w_j²) V_j through the kernels: (b, h, n, d) in the dtype of ``v``, laid
    out as a (b, n, h, d) buffer (the heads' concatenation W_O reads is a free view).

    ``mu``, ``sigma2`` (b, h, n) float32; ``v`` (b, h, N, d), read in place in float32, bf16 or fp16
    (bf16 under autocast: no cast before or after; the kernels sum in float32), other dtypes cast to
    float32; ``centres`` (C,), ``widths`` (W,). ``min_width`` and ``constants`` are unused (the
    signature matches :func:`.read.expected_values_sdpa`)."""
    b, h, n_basis, d = v.shape
    beyond = _beyond_limits(d, max(v.numel(), mu.numel() * d))  # values; queries and output (b, h, n, d)
    if beyond:
        raise ValueError(f"continuous read: {beyond}, for values {tuple(v.shape)} and mu {tuple(mu.shape)} "
                         "(read_impl='triton' reads such sizes through SDPA)")
    if widths.numel() * centres.numel() != n_basis:
        raise ValueError(f"continuous read: {widths.numel()} widths × {centres.numel()} centres ≠ {n_basis} value rows")
    if mu.shape != sigma2.shape or mu.dim() != 3 or tuple(mu.shape[:2]) != (b, h):  # the kernels index them unchecked
        raise ValueError(f"continuous read: mu {tuple(mu.shape)} and sigma2 {tuple(sigma2.shape)} must both be "
                         f"(batch, heads, queries) = ({b}, {h}, n) for values of shape {tuple(v.shape)}")
    with torch.autocast(device_type=mu.device.type, enabled=False):
        values = v if v.dtype in _VALUE_DTYPES else v.to(torch.float32)  # (b, h, N, d)
        z = gauss_read(mu, sigma2, values, centres.to(torch.float32), widths.to(torch.float32))  # (b, n, h, d)
    return z.transpose(1, 2).to(v.dtype)  # (b, h, n, d)
