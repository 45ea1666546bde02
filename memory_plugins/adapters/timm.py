"""Adapter for timm's ``VisionTransformer`` family: one frame (one image) per forward = one segment.

Notation: b batch, n tokens of the frame (prefix tokens + patches), p prefix tokens (class +
registers), m memory slots, h heads, d head dim, a attention width h·d, e model dim.

How it hooks in (no module is replaced, so ``state_dict`` keys and ``isinstance`` checks stay as they
were): every block in ``model.blocks`` must hold a timm ``Attention`` (found by type; DeiT, DINOv2-style
register ViTs, SigLIP towers, … built from ``VisionTransformer`` all qualify) at ``block.attn``. Each
such module gets

* a forward pre-hook (``with_kwargs``) that calls the layer's memory hook with the module's input ``x``
  (b, n, e), the vectors its qkv projection sees (after the block's ``norm1``); when the memory hands
  K/V sources (XL, compressive, the ∞-former's STM) it *prepends them to the module's input*,
  ``[memory (m) ; frame (n)]``, and passes an ``attn_mask`` over those m + n keys. The module then
  projects the memory with its own qkv weights, q/k norms included, on its own fused
  (``F.scaled_dot_product_attention``) or unfused path, whichever ``fused_attn`` selects. The m
  memory rows are also queries of that call; they see only themselves and their outputs are dropped.
  This costs m extra query rows per layer, and buys exactly the host's own attention arithmetic
  (gating, scale norm, dropout) without re-implementing it.
* a forward pre-hook on the module's ``norm`` (the step between its merged heads and ``proj``) that
  mixes the memory's per-head ``head_output`` (the kNN memory) into the frame's rows;
* a forward hook that drops those m rows again and adds the memory's ``output`` (the ∞-former's
  long-term term, Eq. 12) to the module output, before the block's LayerScale / residual.

``model.blocks`` gets a pre-hook / hook pair too: ``forward_features()`` (features for the caller's own
head) runs the blocks without ``forward()``, and such a call is then one transaction of the memory, as a
call of the model is. With an ``attn_mask`` timm runs the blocks one by one; that call is not atomic,
but its aux losses still replace the last call's (:meth:`MemoryController.step`).

Within a frame attention stays as the host defines it (bidirectional, or the caller's ``attn_mask`` /
``is_causal``); every frame token sees every valid memory slot; memory holds earlier frames only.

Decisions:

* **Class and register tokens are written to memory** like patch tokens: the memory takes all n
  tokens of a frame. A past frame's class token is its summary, which later frames profit from most;
  excluding it would also have to exclude it from the ∞-former's read, which the classifier needs.
* **Positions**: timm ViTs add absolute position embeddings per frame (``_pos_embed``), so every frame
  restarts at its own grid positions, and memory vectors keep the embedding of the patch they were in
  (they are stored after it was added). Memory order is the only sign of time: no temporal position
  is added. A stream through an XL memory holding the prefix therefore equals *exactly* one pass of
  the ViT's blocks over the concatenated frames' tokens with a block-causal mask (tested); no warning
  is given, since this is the natural video reading of a ViT.
* **Padding**: patches are all real unless the caller passes ``attn_mask`` (NaFlex-style): a key that
  no query may attend to is padding, never written to memory, and gets no memory output.

Refused with a message: timm models other than the ``VisionTransformer`` family, blocks without a timm
``Attention`` (``attn_layer='diff'``, parallel blocks, RoPE attention), a model that is already
hooked, training with gradient checkpointing (its recomputation would read and write the memory
twice), and frames that are not (b, C, H, W) images of the ViT's ``img_size`` and ``in_chans``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from memory_plugins.controller import MemoryHook
from memory_plugins.interface import AttentionDims, HostAttention
from memory_plugins.splice import Handles, InnerCallBegin, InnerCallEnd, add_output, mix_heads

from . import Target
from .protocol import select

#: Default targets: the attention of every block (``blocks.<i>.attn``).
DEFAULT_TARGETS: dict[str, str] = {"VisionTransformer (and subclasses)": "blocks.<i>.attn"}


# -- finding the layers ----------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"timm adapter: model is a {type(model).__module__}.{type(model).__qualname__}; supported: timm's "
            "VisionTransformer family (timm.models.vision_transformer.VisionTransformer and its subclasses, e.g. "
            "timm.create_model('vit_tiny_patch16_224')). Other models can follow the MemoryAttention protocol "
            "(memory_plugins.MemoryAttention)."
        )


def _check_attention(name: str, block: nn.Module, attn: Any) -> None:
    """``attn`` must be timm's own ``Attention`` (its forward, whose input and mask we extend)."""
    if isinstance(attn, Attention) and type(attn).forward is Attention.forward:
        return
    found = "no 'attn' module" if attn is None else f"attn of type {type(attn).__module__}.{type(attn).__qualname__}"
    raise TypeError(
        f"timm adapter: block {name!r} ({type(block).__name__}) has {found}; allowed: "
        "timm.layers.Attention at block.attn (VisionTransformer(attn_layer='attn'), the default). Differential, "
        "RoPE and parallel-block attention are not supported."
    )


def _dims(attn: nn.Module) -> AttentionDims:
    return AttentionDims(embed_dim=int(attn.qkv.in_features), num_heads=int(attn.num_heads),
                         head_dim=int(attn.head_dim))


class _Projector:
    """The module's content projections, as bound methods (so that a deep copy projects with the copy)."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def _qkv(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        attn = self.attn
        return attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, b, h, n, d)

    def q(self, x: Tensor) -> Tensor:
        """``x`` (b, n, e) → content queries after the q norm (b, h, n, d)."""
        return self.attn.q_norm(self._qkv(x)[0])  # (b, h, n, d)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (b, m, e) → keys (after the k norm) and values, two (b, h, m, d)."""
        qkv = self._qkv(x)  # (3, b, h, m, d)
        return self.attn.k_norm(qkv[1]), qkv[2]


# -- masks ------------------------------------------------------------------------------------------------


def _as_4d(mask: Tensor) -> Tensor:
    """A mask SDPA broadcasts to (b, h, n, n), as (B, H, n, n) with B ∈ {1, b}, H ∈ {1, h}."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _visible(mask: Tensor) -> Tensor:
    """Bool (B, H, n, n): True where the host's mask (bool, or additive float) lets a query see a key."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min


def _valid(attn_mask: Tensor | None, is_causal: bool, b: int, n: int) -> Tensor | None:
    """(b, n) keys that some query may attend to (padding = seen by nobody), or None (all real)."""
    if attn_mask is None or is_causal:
        return None
    seen = _visible(_as_4d(attn_mask)).any(dim=-2).any(dim=1)  # (B, n)
    return None if bool(seen.all()) else seen.expand(b, n)


def _extended_mask(attn_mask: Tensor | None, is_causal: bool, keep: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """The mask over [memory (m) ; frame (n)] keys for [memory (m) ; frame (n)] queries: (b, H, m + n, m + n).

    Frame rows: memory slots where ``keep`` (b, m), then the host's own mask (or ``is_causal``, or all).
    Memory rows: each slot sees itself only (those rows are dropped; no row is fully masked).
    Bool unless the host's mask is an additive float one (then 0 / -inf, the host's values added)."""
    b, m = keep.shape
    device = keep.device
    if is_causal:
        own = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, n, n)
    elif attn_mask is None:
        own = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)  # (1, 1, n, n)
    else:
        own = _as_4d(attn_mask)  # (B, H, n, n)
    heads = own.shape[1]
    rows = torch.cat([torch.eye(m, dtype=torch.bool, device=device), torch.zeros(m, n, dtype=torch.bool,
                                                                                   device=device)], dim=1)  # (m, m + n)
    top = rows[None, None].expand(b, heads, m, m + n)  # (b, H, m, m + n)
    left = keep[:, None, None, :].expand(b, heads, n, m)  # (b, H, n, m)
    if own.dtype == torch.bool:
        bottom = torch.cat([left, own.expand(b, heads, n, n)], dim=-1)  # (b, H, n, m + n)
        return torch.cat([top, bottom], dim=2)  # (b, H, m + n, m + n)
    neg = torch.tensor(float("-inf"), dtype=own.dtype, device=device)
    zero = torch.zeros((), dtype=own.dtype, device=device)
    bottom = torch.cat([torch.where(left, zero, neg), own.expand(b, heads, n, n)], dim=-1)  # (b, H, n, m + n)
    return torch.cat([torch.where(top, zero, neg), bottom], dim=2)  # (b, H, m + n, m + n)


# -- the hooks --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One attention module: what its hooks need, and what passes from the pre- to the post-hook."""

    target: Target
    vit: nn.Module
    hook: MemoryHook | None = None
    prefix: int = 0  # memory rows prepended in the current call (dropped by the post-hook)
    valid: Tensor | None = None  # (b, n) of the current call
    head_read: Any = None  # the current call's read while it carries a head_output (for the norm pre-hook)


def _expected_tokens(vit: nn.Module) -> int | None:
    """Tokens per frame, or None where the ViT allows other counts (dynamic size / padding, patch dropout)."""
    pe = vit.patch_embed
    if getattr(vit, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False) or \
            not getattr(pe, "strict_img_size", True) or not isinstance(vit.patch_drop, nn.Identity):
        return None
    return int(pe.num_patches) + int(vit.num_prefix_tokens)


class _PreHook:
    """Forward pre-hook of an ``Attention``: one memory step; K/V sources prepended to its input."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        layer = self.layer
        layer.prefix, layer.valid, layer.head_read = 0, None, None
        memory = layer.hook
        if memory is None or not memory.enabled:
            return None
        vit = layer.vit
        if vit.training and getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise RuntimeError(
                "timm adapter: gradient checkpointing is on (set_grad_checkpointing(True)); its recomputation "
                "would read and write the memory twice. Call model.set_grad_checkpointing(False) to train with a memory."
            )
        x = args[0] if args else kwargs["x"]  # (b, n, e) attention input (after norm1)
        b, n, _ = x.shape
        expected = _expected_tokens(vit)
        if expected is not None and n != expected:
            raise ValueError(
                f"timm adapter: layer {layer.target.name!r} got a segment of {n} tokens; this ViT's frames have "
                f"{expected} (num_patches={vit.patch_embed.num_patches} + num_prefix_tokens={vit.num_prefix_tokens}). "
                "One segment is one frame through the whole ViT."
            )
        attn_mask, is_causal = kwargs.get("attn_mask"), bool(kwargs.get("is_causal", False))
        layer.valid = _valid(attn_mask, is_causal, b, n)  # (b, n) or None
        read = memory(x, None, layer.valid)
        if read is not None and read.head_output is not None:
            if not isinstance(getattr(module, "norm", None), nn.Module):
                raise NotImplementedError(
                    f"timm adapter: layer {layer.target.name!r} has no 'norm' step between its attention and its "
                    "output projection (an older timm?), where a per-head memory result (memory='knn') is mixed in.")
            layer.head_read = read
        if read is None or read.kv_source is None:
            return None
        source = read.kv_source.to(x.dtype)  # (b, m, e)
        m = source.shape[1]
        keep = read.kv_mask if read.kv_mask is not None else x.new_ones(b, m, dtype=torch.bool)  # (b, m)
        kwargs = {**kwargs, "attn_mask": _extended_mask(attn_mask, is_causal, keep.to(torch.bool), n, x.dtype),
                  "is_causal": False}  # (b, H, m + n, m + n)
        layer.prefix = m
        joined = torch.cat([source, x], dim=1)  # (b, m + n, e)
        if args:
            return (joined, *args[1:]), kwargs
        return args, {**kwargs, "x": joined}


class _HeadMix:
    """Forward pre-hook of an ``Attention``'s ``norm``: its input, the merged heads (b, m + n, h·d), with
    the read's per-head result mixed into the frame's n rows."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        layer = self.layer
        read, prefix = layer.head_read, layer.prefix
        layer.head_read = None
        if read is None:
            return None
        x = args[0]  # (b, m + n, h·d)
        h = layer.target.dims.num_heads
        frame = x[:, prefix:].unflatten(-1, (h, -1)).transpose(1, 2)  # (b, h, n, d)
        frame = mix_heads(frame, read, layer.valid).transpose(1, 2).flatten(-2)  # (b, n, h·d)
        return (torch.cat([x[:, :prefix], frame], dim=1), *args[1:])  # (b, m + n, h·d)


class _PostHook:
    """Forward hook of an ``Attention``: drop the memory rows, add the memory's output."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
        layer = self.layer
        memory = layer.hook
        read = memory.take_read() if memory is not None else None
        prefix, valid = layer.prefix, layer.valid
        layer.prefix, layer.valid, layer.head_read = 0, None, None
        if not isinstance(output, Tensor) or (prefix == 0 and (read is None or read.output is None)):
            return None  # (a failed forward calls this hook too, without an output)
        out = output[:, prefix:]  # (b, n, e)
        return add_output(out, read, valid)  # (b, n, e)


class _ImageCheck:
    """Forward pre-hook of the ViT: a segment is one batch of frames (b, C, H, W) of the ViT's size."""

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("x")
        pe = self.vit.patch_embed
        channels = int(pe.proj.in_channels) if hasattr(pe, "proj") else None
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            hint = " (a clip (b, T, C, H, W)? feed x[:, t] for t = 0 … T-1, one frame per call)" \
                if isinstance(x, Tensor) and x.dim() == 5 else ""
            raise ValueError(f"timm adapter: x must be one frame per call, a (batch, channels, height, width) "
                             f"image tensor; got {got}{hint}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"timm adapter: x has {x.shape[1]} channels; this ViT takes in_chans={channels}")
        size = tuple(int(s) for s in x.shape[-2:])
        allowed = tuple(int(s) for s in pe.img_size) if getattr(pe, "img_size", None) is not None else None
        if _expected_tokens(self.vit) is not None and allowed is not None and size != allowed:
            raise ValueError(
                f"timm adapter: x has image size {size}; this ViT takes img_size={allowed} (patch_size="
                f"{tuple(pe.patch_size)}, dynamic_img_size=False): every frame of a stream is one segment of "
                f"{_expected_tokens(self.vit)} tokens. Resize the frames, or build the ViT with dynamic_img_size=True."
            )


class TimmViTAdapter:
    """Memory hooks for the ``Attention`` of every block of a timm ``VisionTransformer``."""

    name = "timm"

    def find(self, model: nn.Module, targets: Sequence[str] | None) -> list[Target]:
        _check_model(model)
        names = {id(m): n for n, m in model.named_modules()}
        found: dict[str, _Layer] = {}
        for block in model.blocks:
            block_name = names[id(block)]
            attn = getattr(block, "attn", None)
            _check_attention(block_name, block, attn)
            name = names[id(attn)]
            if any(isinstance(h, _PreHook) for h in attn._forward_pre_hooks.values()):
                raise ValueError(f"layer {name!r} already has a memory hook: is this model wrapped already?")
            dims = _dims(attn)
            proj = _Projector(attn)
            found[name] = _Layer(Target(name, attn, dims, HostAttention(dims, proj.q, proj.kv)), model)
        chosen = select(list(found), targets, "timm ViT attention")
        self._layers = {n: found[n] for n in chosen}
        return [self._layers[n].target for n in chosen]

    def attach(self, model: nn.Module, targets: list[Target], hooks: list[MemoryHook]) -> Callable[[], None]:
        layers = [self._layers[t.name] for t in targets]
        handles = [model.register_forward_pre_hook(_ImageCheck(model), with_kwargs=True)]
        if hooks and isinstance(model.blocks, nn.Module):  # forward_features() runs them without forward()
            begin = InnerCallBegin(hooks[0].controller)
            handles += [model.blocks.register_forward_pre_hook(begin),
                        model.blocks.register_forward_hook(InnerCallEnd(begin), always_call=True)]
        for layer, memory in zip(layers, hooks):
            layer.hook = memory
            module = layer.target.module
            handles.append(module.register_forward_pre_hook(_PreHook(layer), with_kwargs=True))
            if isinstance(getattr(module, "norm", None), nn.Module):
                handles.append(module.norm.register_forward_pre_hook(_HeadMix(layer)))
            handles.append(module.register_forward_hook(_PostHook(layer), with_kwargs=True, always_call=True))
        return Handles(handles)  # once removed, no hook object refers to the layers any more


__all__ = ["DEFAULT_TARGETS", "TimmViTAdapter"]
