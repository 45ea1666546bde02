"""Compressive memory (Rae et al., 2019): an XL cache whose evicted vectors are compressed, not dropped.

Notation: b batch, n segment length, m memory length (≤ mem_len), c compression rate,
g groups of c vectors compressed in one write, p pending vectors (< c), k compressed-memory length
(≤ cmem_len), h heads, d head dim, e model dim.

State (all batch-first, oldest first along dim 1):

* ``mem`` (b, m, e), ``valid`` (b, m): the uncompressed memory, exactly as the XL backend keeps it;
* ``cmem`` (b, k, e), ``cmem_valid`` (b, k): the compressed memory; what falls out of it is dropped;
* ``pending`` (b, p, e), ``pending_valid`` (b, p): vectors already evicted from ``mem`` that do not yet
  fill a whole group of c. They wait for the next write (never padded, never lost) and are not read.

Every write moves the same number of vectors for every sample, so the lengths m, p, k are shared by the
batch; a per-sample reset only zeroes a sample's vectors and marks its slots invalid. A group of c that
mixes invalid slots (from before a reset) with valid ones is compressed from its valid vectors only
(mean / max over them; the convolution sees zeros in the invalid slots, as at a zero-padded border) and
is valid if any of its vectors is; a group with no valid vector is a zero, invalid slot.

Data flow per segment: ``read`` hands the host [cmem ; mem] with its mask; ``write`` pushes the segment
into ``mem``, appends what fell out to ``pending``, compresses every whole group of c, pushes the result
into ``cmem`` and returns the attention-reconstruction loss of the groups it just compressed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..interface import AttentionDims, HostAttention, MemoryRead, MemoryState
from ..xl.backend import fifo_push, fifo_reset
from .config import CompressiveConfig


class _ProjectWithoutParamGrad(torch.autograd.Function):
    """``project(x)`` whose backward reaches ``x`` only: the host's parameters never get a ``.grad``.

    The attention-reconstruction loss must train the compressor through the host's K/V projections
    without training those projections (Rae et al. §3.2 stop the gradient into the model). Detaching the
    host's weights is impossible from outside the host, so the forward runs the projection on a detached
    leaf copy of ``x`` with its own little graph, and the backward differentiates that graph with respect
    to the leaf alone (``torch.autograd.grad`` never accumulates into parameters' ``.grad``).
    """

    @staticmethod
    def forward(ctx: Any, project: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
        leaf = x.detach().requires_grad_(True)  # (b, g, e)
        with torch.enable_grad():
            k, v = project(leaf)  # (b, h, g, d) each
        ctx.leaf, ctx.outputs = leaf, (k, v)
        return k.detach(), v.detach()

    @staticmethod
    def backward(ctx: Any, grad_k: Tensor, grad_v: Tensor) -> tuple[None, Tensor | None]:
        (grad_x,) = torch.autograd.grad(ctx.outputs, ctx.leaf, (grad_k, grad_v), allow_unused=True)
        ctx.leaf = ctx.outputs = None  # free the local graph
        return None, grad_x  # (b, g, e)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Content attention of ``q`` (b, h, n, d) over ``k``, ``v`` (b, h, L, d) masked by ``mask`` (b, L).

    A sample with no valid key gets a uniform (finite) attention; callers drop it from their loss.
    """
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (b, h, n, L)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)  # (b, h, n, L)
    return scores.softmax(dim=-1) @ v  # (b, h, n, d)


class CompressiveMemory(nn.Module):
    """Compressive memory backend; its only parameters are those of the ``"conv"`` compressor."""

    def __init__(self, config: CompressiveConfig, dims: AttentionDims, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.config = config
        self.dims = dims
        c, e = config.compression_rate, dims.embed_dim
        # Conv1d over time: group j of c vectors (oldest first) → one vector; tap i weighs its i-th oldest.
        self.conv = nn.Conv1d(e, e, kernel_size=c, stride=c) if config.compression == "conv" else None

    # -- compression ------------------------------------------------------------------------------
    def compress(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Compress ``x`` (b, g·c, e), oldest first, into ``(compressed, compressed_valid)``:
        (b, g, e) and (b, g); group j is ``x[:, j·c : (j+1)·c]`` and keeps the order of the groups.

        Invalid slots (``valid`` False, from a reset) are left out of each group; a group is valid if
        any of its vectors is. Gradients reach the compressor's parameters and ``x`` (callers pass a
        detached ``x``).
        """
        b, length, e = x.shape
        c = self.config.compression_rate
        if length % c:
            raise ValueError(f"compress: length {length} is not a multiple of compression_rate={c}")
        g = length // c
        groups = x.reshape(b, g, c, e)  # (b, g, c, e)
        gvalid = valid.reshape(b, g, c)  # (b, g, c)
        out_valid = gvalid.any(dim=-1)  # (b, g)
        kind = self.config.compression
        if kind == "mean":
            # Shifted mean: x0 + mean(x - x0) with x0 the group's first valid vector. Exact for a
            # constant group (a plain sum / c is not) and better conditioned; identity when c = 1.
            first = gvalid.to(torch.int8).argmax(dim=-1)  # (b, g) index of the first valid slot
            x0 = groups.gather(2, first[:, :, None, None].expand(b, g, 1, e))  # (b, g, 1, e)
            w = gvalid[..., None].to(x.dtype)  # (b, g, c, 1)
            count = w.sum(dim=2).clamp(min=1)  # (b, g, 1)
            out = x0[:, :, 0] + ((groups - x0) * w).sum(dim=2) / count  # (b, g, e)
        elif kind == "max":
            masked = groups.masked_fill(~gvalid[..., None], float("-inf"))  # (b, g, c, e)
            out = masked.amax(dim=2)  # (b, g, e)
        else:
            assert self.conv is not None
            w = valid[..., None].to(x.dtype)  # (b, g·c, 1)
            z = (x * w).to(self.conv.weight.dtype).transpose(1, 2)  # (b, e, g·c)
            out = self.conv(z).transpose(1, 2).to(x.dtype)  # (b, g, e)
        out = torch.where(out_valid[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out, out_valid  # (b, g, e), (b, g)

    def reconstruction_loss(
        self, x: Tensor, old: Tensor, old_valid: Tensor, comp: Tensor, comp_valid: Tensor, host: HostAttention
    ) -> Tensor:
        """Attention-reconstruction loss (Rae et al. §3.2), unweighted.

        MSE between the host's content attention of this segment's queries over the original vectors
        ``old`` (b, g·c, e) and over their compression ``comp`` (b, g, e), averaged over the samples that
        compressed at least one valid vector. The target and the queries carry no gradient; ``comp``
        gets one through the host's K/V projections, whose parameters do not (stop-gradient into the
        host, so only the compressor learns from this loss).
        """
        dtype = x.dtype
        with torch.no_grad():
            q = host.project_q(x.detach())  # (b, h, n, d)
            k, v = host.project_kv(old.detach().to(dtype))  # (b, h, g·c, d)
            target = _attend(q, k, v, old_valid)  # (b, h, n, d)
        comp = comp.to(dtype)
        if torch.is_grad_enabled() and comp.requires_grad:
            kc, vc = _ProjectWithoutParamGrad.apply(host.project_kv, comp)  # (b, h, g, d) each
        else:
            with torch.no_grad():
                kc, vc = host.project_kv(comp)  # (b, h, g, d) each
        pred = _attend(q, kc, vc, comp_valid)  # (b, h, n, d)
        acc = torch.promote_types(pred.dtype, torch.float32)  # at least float32 for the loss
        per_sample = (pred.to(acc) - target.to(acc)).pow(2).flatten(1).mean(dim=1)  # (b,)
        counts = old_valid.any(dim=1).to(per_sample.dtype)  # (b,) samples with something compressed
        return (per_sample * counts).sum() / counts.sum().clamp(min=1)

    # -- MemoryBackend -----------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        e = self.dims.embed_dim

        def empty() -> tuple[Tensor, Tensor]:
            return (
                torch.zeros(batch_size, 0, e, device=device, dtype=dtype),  # (b, 0, e)
                torch.zeros(batch_size, 0, dtype=torch.bool, device=device),  # (b, 0)
            )

        (mem, valid), (cmem, cvalid), (pending, pvalid) = empty(), empty(), empty()
        return {
            "mem": mem, "valid": valid,
            "cmem": cmem, "cmem_valid": cvalid,
            "pending": pending, "pending_valid": pvalid,
        }  # fmt: skip

    def read(self, state: MemoryState, x: Tensor, q: Tensor | None) -> MemoryRead:
        if state["mem"].shape[1] + state["cmem"].shape[1] == 0:
            return MemoryRead()
        source = torch.cat([state["cmem"], state["mem"]], dim=1)  # (b, k + m, e), oldest first
        mask = torch.cat([state["cmem_valid"], state["valid"]], dim=1)  # (b, k + m)
        return MemoryRead(kv_source=source, kv_mask=mask)

    def write(
        self, state: MemoryState, x: Tensor, host: HostAttention | None, read: MemoryRead | None
    ) -> tuple[MemoryState, Tensor | None]:
        cfg, c = self.config, self.config.compression_rate
        dtype = state["mem"].dtype
        x_in = x.detach() if cfg.detach else x
        mem, valid, evicted, evicted_valid = fifo_push(state["mem"], state["valid"], x_in.to(dtype), cfg.mem_len)
        # Evicted vectors join those still waiting; only whole groups of c are compressed now.
        queue = torch.cat([state["pending"], evicted.detach()], dim=1)  # (b, p + evicted, e)
        queue_valid = torch.cat([state["pending_valid"], evicted_valid], dim=1)  # (b, p + evicted)
        g = queue.shape[1] // c
        old, old_valid = queue[:, : g * c], queue_valid[:, : g * c]  # (b, g·c, e), (b, g·c)
        new_state: MemoryState = {
            "mem": mem, "valid": valid,
            "cmem": state["cmem"], "cmem_valid": state["cmem_valid"],
            "pending": queue[:, g * c :], "pending_valid": queue_valid[:, g * c :],  # (b, p', e), p' < c
        }  # fmt: skip
        if g == 0:
            return new_state, None
        comp, comp_valid = self.compress(old, old_valid)  # (b, g, e), (b, g)
        aux = None  # a training signal only (as the other memories' aux losses): skipped in eval()
        if self.conv is not None and cfg.recon_weight > 0 and host is not None and self.training:
            aux = cfg.recon_weight * self.reconstruction_loss(x, old, old_valid, comp, comp_valid, host)
        # The task loss must not train the compressor through the memory: store the compression detached.
        new_state["cmem"], new_state["cmem_valid"], _, _ = fifo_push(
            state["cmem"], state["cmem_valid"], comp.detach().to(dtype), cfg.cmem_len, comp_valid
        )  # (b, k', e), (b, k'); what falls out of the compressed memory is dropped
        return new_state, aux

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        new: MemoryState = {}
        for vec, val in (("mem", "valid"), ("cmem", "cmem_valid"), ("pending", "pending_valid")):
            new[vec], new[val] = fifo_reset(state[vec], state[val], mask)
        return new

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"mem_len={cfg.mem_len}, cmem_len={cfg.cmem_len}, compression={cfg.compression!r}, "
            f"compression_rate={cfg.compression_rate}, recon_weight={cfg.recon_weight}"
        )
