"""Compressive memory (Rae et al., 2019): an XL cache whose evicted vectors are compressed, not dropped.

Notation: b batch, n segment length, m memory length (≤ mem_len), c compression rate,
g groups of c vectors compressed in one write, p pending vectors (< c), k compressed-memory length
(≤ cmem_len), h heads, d head dim, e model dim.

State (all batch-first, oldest first along dim 1; each sample's valid vectors right-aligned, see
:mod:`memory_plugins.fifo`, so padding never enters and a reset only marks slots invalid):

* ``mem`` (b, m, e), ``valid`` (b, m): the uncompressed memory, exactly as the XL backend keeps it;
* ``cmem`` (b, k, e), ``cmem_valid`` (b, k): the compressed memory; what falls out of it is dropped;
* ``pending`` (b, p, e), ``pending_valid`` (b, p), p ≤ c − 1: each sample's valid vectors already
  evicted from ``mem`` that do not yet fill a whole group of c. They wait for the next step (never
  padded, never lost) and are not read.

Groups are formed per sample from its own valid vectors only, so a sample whose segments are padded
compresses exactly the groups an unpadded stream of it would: sample i compresses ⌊count_i / c⌋
whole groups in a step, and the batch computes the static maximum (n + c − 1)/c of them with the
others masked.

Data flow per segment (``step``): the read hands the host [cmem ; mem] with its mask; the segment's
valid vectors are pushed into ``mem``, what fell out joins ``pending``, every whole group of c is
compressed and pushed into ``cmem``, and the attention-reconstruction loss of the groups just
compressed is the read's aux loss (training mode).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from .. import fifo
from ..distributed import refuse_sharded_step
from ..interface import HostAttention, MemoryRead, MemoryState
from ..registry import register_memory
from .config import CompressiveConfig


class _DetachedProjection(nn.Module):
    """Runs ``project`` with the parameters of its owners detached (plain autograd, no custom Function).

    The attention-reconstruction loss must train the compressor through the host's K/V projections
    without training those projections (Rae et al. §3.2 stop the gradient into the model). The owners
    are the modules the bound method ``project`` reads its weights from (the method's object when it is
    a module, else the modules it holds: the adapters' projection helpers); ``functional_call`` swaps
    their parameters for detached aliases for the call, so the gradient reaches ``x`` and no parameter
    sees the graph at all (no ``.grad``, no DDP hook fired twice, nothing for ``torch.compile`` to trip
    on). A projection with no owner module runs as is.
    """

    def __init__(self, project: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        owner = getattr(project, "__self__", None)
        if isinstance(owner, nn.Module):
            owners = [owner]
        else:
            owners = [v for v in vars(owner).values() if isinstance(v, nn.Module)] if owner is not None else []
        self.owners = nn.ModuleList(owners)
        object.__setattr__(self, "project", project)  # not a submodule attribute: a bound method

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.project(x)  # (b, h, g, d) each


def _project_without_param_grad(call: _DetachedProjection, x: Tensor) -> tuple[Tensor, Tensor]:
    """``call.project(x)`` (b, g, e) → two (b, h, g, d) whose gradient reaches ``x`` and no parameter."""
    detached = {name: p.detach() for name, p in call.named_parameters(remove_duplicate=False)}
    return torch.func.functional_call(call, detached, (x,), tie_weights=False)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Content attention of ``q`` (b, h, n, d) over ``k``, ``v`` (b, h, L, d) masked by ``mask`` (b, L).

    A sample with no valid key gets a uniform (finite) attention; callers drop it from their loss.
    """
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (b, h, n, L)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)  # (b, h, n, L)
    return scores.softmax(dim=-1) @ v  # (b, h, n, d)


@register_memory("compressive", CompressiveConfig)
class CompressiveMemory(nn.Module):
    """Compressive memory backend; its only parameters are those of the ``"conv"`` compressor."""

    uses_queries: ClassVar[bool] = False

    def __init__(self, config: CompressiveConfig, host: HostAttention, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.config = config
        self.dims = host.dims if isinstance(host, HostAttention) else host
        object.__setattr__(self, "host", host)  # not a submodule: the host layer belongs to the model
        # Built once, not per call: a module made inside forward breaks torch.compile's graph. Not a
        # submodule either (its owners are the host's modules, whose parameters are not ours).
        detached = _DetachedProjection(host.project_kv) if isinstance(host, HostAttention) else None
        object.__setattr__(self, "_detached_projection", detached)
        c, e = config.compression_rate, self.dims.embed_dim
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
        self, x: Tensor, old: Tensor, old_valid: Tensor, comp: Tensor, comp_valid: Tensor, host: HostAttention,
        x_valid: Tensor | None = None,
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
            call = self._detached_projection if host is self.host and self._detached_projection is not None \
                else _DetachedProjection(host.project_kv)
            kc, vc = _project_without_param_grad(call, comp)  # (b, h, g, d) each
        else:
            with torch.no_grad():
                kc, vc = host.project_kv(comp)  # (b, h, g, d) each
        pred = _attend(q, kc, vc, comp_valid)  # (b, h, n, d)
        acc = torch.promote_types(pred.dtype, torch.float32)  # at least float32 for the loss
        err = (pred.to(acc) - target.to(acc)).pow(2).mean(dim=(1, 3))  # (b, n)
        if x_valid is None:
            per_sample = err.mean(dim=1)  # (b,)
        else:  # padded queries are not part of the stream: they take no part in the loss
            keep = x_valid.to(torch.bool)  # (b, n) selected, not multiplied: a NaN there stays out
            per_sample = torch.where(keep, err, 0.0).sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(acc)  # (b,)
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

    def step(self, state: MemoryState, x: Tensor, q: Tensor | None,
             valid: Tensor | None) -> tuple[MemoryRead, MemoryState]:
        cfg, c = self.config, self.config.compression_rate
        if self.conv is not None:
            refuse_sharded_step(self)  # FSDP2 on this backend alone: a clear error, not a DTensor mix-up
        read = MemoryRead()
        if state["mem"].shape[1] + state["cmem"].shape[1]:
            read.kv_source = torch.cat([state["cmem"], state["mem"]], dim=1)  # (b, k + m, e), oldest first
            read.kv_mask = torch.cat([state["cmem_valid"], state["valid"]], dim=1)  # (b, k + m)
        dtype = state["mem"].dtype
        x_in = x.detach() if cfg.detach else x
        mem, mem_valid, evicted, evicted_valid = fifo.push(state["mem"], state["valid"], x_in.to(dtype), cfg.mem_len, valid)
        # Evicted vectors join those still waiting, each sample's valid ones first and in order.
        queue, queue_valid = fifo.compact(
            torch.cat([state["pending"], evicted.detach()], dim=1),  # (b, L, e)
            torch.cat([state["pending_valid"], evicted_valid], dim=1),  # (b, L)
            valid_first=True,
        )
        length = queue.shape[1]
        g = length // c  # most groups any sample can complete now (static)
        count = queue_valid.sum(dim=1)  # (b,)
        whole = (count // c) * c  # (b,) vectors each sample compresses now
        slot = torch.arange(length, device=queue.device)  # (L,)
        # What stays pending: each sample's count - whole < c leftovers, moved to the front, right-aligned.
        keep = min(c - 1, length)
        src = (whole[:, None] + torch.arange(keep, device=queue.device)).clamp(max=max(length - 1, 0))  # (b, keep)
        rest = queue.gather(1, src[..., None].expand(-1, -1, queue.shape[2])) if keep else queue[:, :0]  # (b, keep, e)
        rest_valid = (whole[:, None] + torch.arange(keep, device=queue.device)) < count[:, None]  # (b, keep)
        rest, rest_valid = fifo.compact(rest, rest_valid)  # (b, keep, e), (b, keep)
        new_state: MemoryState = {
            "mem": mem, "valid": mem_valid,
            "cmem": state["cmem"], "cmem_valid": state["cmem_valid"],
            "pending": rest, "pending_valid": rest_valid,
        }  # fmt: skip
        if g == 0:
            if self._reconstructs():  # nothing to compress: the compressor still takes part, with zero gradient
                read.aux_loss = sum(p.sum() for p in self.conv.parameters()) * 0.0  # (), so DDP sees every parameter
            return read, new_state
        old = queue[:, : g * c]  # (b, g·c, e)
        old_valid = slot[None, : g * c] < whole[:, None]  # (b, g·c) whole groups only
        comp, comp_valid = self.compress(old, old_valid)  # (b, g, e), (b, g)
        if self._reconstructs():
            read.aux_loss = cfg.recon_weight * self.reconstruction_loss(x, old, old_valid, comp, comp_valid, self.host, valid)
        # The task loss must not train the compressor through the memory: store the compression detached.
        new_state["cmem"], new_state["cmem_valid"], _, _ = fifo.push(
            state["cmem"], state["cmem_valid"], comp.detach().to(dtype), cfg.cmem_len, comp_valid
        )  # (b, k', e), (b, k'); what falls out of the compressed memory is dropped
        return read, new_state

    def _reconstructs(self) -> bool:
        """Whether steps hand back the reconstruction loss (training a conv compressor with a host to
        project with). Such a step always hands back one, zero when nothing was compressed, so that the
        compressor's parameters take part in every backward of ``task + memory_aux_loss()`` (what DDP's
        default ``find_unused_parameters=False`` requires) without changing any value or gradient."""
        cfg = self.config
        return self.conv is not None and cfg.recon_weight > 0 and self.training and isinstance(self.host, HostAttention)

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        new: MemoryState = {}
        for vec, val in (("mem", "valid"), ("cmem", "cmem_valid"), ("pending", "pending_valid")):
            new[vec], new[val] = fifo.reset(state[vec], state[val], mask)
        return new

    def check_state(self, state: MemoryState) -> str | None:
        """Why a restored state cannot be this memory's (None if it can)."""
        cfg = self.config
        for vec, val, cap in (("mem", "valid", cfg.mem_len), ("cmem", "cmem_valid", cfg.cmem_len),
                              ("pending", "pending_valid", cfg.compression_rate - 1)):
            if state[vec].shape[1] != state[val].shape[1] or state[vec].shape[1] > cap:
                return f"{vec} holds {state[vec].shape[1]} slots and {val} {state[val].shape[1]}; both must be ≤ {cap}"
        return None

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"mem_len={cfg.mem_len}, cmem_len={cfg.cmem_len}, compression={cfg.compression!r}, "
            f"compression_rate={cfg.compression_rate}, recon_weight={cfg.recon_weight}"
        )
