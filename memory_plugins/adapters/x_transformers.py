"""Adapter for x-transformers decoders (``TransformerWrapper`` around a ``Decoder``).

Notation: b batch, n segment length (new tokens of this call), c cached tokens of the current segment,
m memory length, h heads, k kv heads, d head dim, e model dim, V vocabulary.

How it hooks in (no module is replaced, so ``state_dict`` keys and ``isinstance`` checks stay as
they were): every *self*-attention block of a causal ``AttentionLayers`` stack (chosen by the stack's
``layer_types``: ``'a'`` is self-attention, ``'c'`` cross-attention, which uses the same class) gets

* a forward pre-hook (``with_kwargs``) that calls the layer's memory hook with the block's attention
  input ``x`` (after the pre-norm and any token shift) and its content queries, then hands the memory's
  ``kv_source`` to x-transformers through the block's own ``mem`` argument, the very path its built-in
  Transformer-XL recurrence uses (the block projects the memory with its own K/V), and the per-sample
  ``kv_mask`` through the block's key mask (``context_mask`` over [memory ; cache ; segment]). With
  rotary positions it rebuilds ``rotary_pos_emb`` so that the memory sits at positions ``-m … -1``
  before the segment, exactly as x-transformers does for its native ``mems``; with ``rel_pos_bias`` /
  ALiBi / dynamic bias nothing is needed (the bias is built from the key length), but left padding is
  refused there: the bias's key indices are the batch's, so the pads would sit between a sample's
  memory and its tokens.
* a forward hook on the block's ``Attend`` that mixes the memory's per-head ``head_output`` (the kNN
  memory's gated retrieval) into the attention result (b, h, n, d), before head scaling, gates and the
  output projection;
* a forward hook that adds the memory's ``output`` (the ∞-former's long-term term) to the block's
  output, before the residual / LayerScale.

Inside an incremental-decoding call (the block receives a kv ``cache``) the memory is read but never
written: the cache already holds the current segment, the memory holds the segments before it.
:func:`generate` writes a segment once it is complete. x-transformers' own
``AutoregressiveWrapper.generate`` works inside ``with model.memory_frozen():`` (its first, uncached
call would otherwise write the prompt into the memory while the cache also holds it).

Refused, with a message: non-causal stacks (Encoder), stacks that run one attention module several
times per forward (weight tying / ``layers_execute_order`` repeats, also per call, or ``repeat_blocks``),
hyper-connection residual streams, ``add_value_residual``, q/k/v from different residuals, multi-latent
attention. Refused when a memory hands K/V sources:
polar positions, CoPE, data-dependent ALiBi, relative-projection bias, custom ``pos`` and native
``mems`` (none of them can place memory vectors before the segment). Warned about once: absolute
position embeddings (the memory keeps the positions of its own segment: not Transformer-XL).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import x_transformers.x_transformers as xt
from memory_plugins.controller import MemoryHook
from memory_plugins.interface import AttentionDims, HostAttention
from memory_plugins.splice import (Handles, InnerCallBegin, InnerCallEnd, add_output, first_valid, memory_key_mask,
                                   memory_positions, mix_heads, repeat_kv)

from . import Target
from .protocol import select

#: Default targets per architecture: every self-attention block of every causal stack.
DEFAULT_TARGETS: dict[str, str] = {
    "TransformerWrapper(Decoder)": "attn_layers.layers.<i>.1[.fn…]   (layer_types[i] == 'a')",
    "Decoder / AttentionLayers(causal=True)": "layers.<i>.1[.fn…]   (layer_types[i] == 'a')",
    "XTransformer": "decoder.net.attn_layers.layers.<i>.1   (self-attention only; cross-attention untouched)",
}


@dataclass
class _Layer:
    """Everything the hooks of one attention block need, and what passes from pre- to post-hook."""

    target: Target
    stack: nn.Module  # the AttentionLayers holding the block (rotary embedding lives there)
    wrapper: nn.Module | None  # the TransformerWrapper around the stack, if any (absolute positions)
    calls: "_StackCall"
    hook: MemoryHook | None = None
    head_read: Any = None  # this call's read while it carries a head_output (pre-hook → Attend hook)
    head_valid: Tensor | None = None  # (b, n) its queries' padding mask


@dataclass
class _StackCall:
    """What the stack's own forward was called with (set by a pre-hook on the AttentionLayers)."""

    user_pos: bool = False  # the caller passed pos=...: the stack's positions are not ours to rebuild
    warned: bool = False  # the absolute-positions warning was given for this stack


class _StackPreHook:
    """Forward pre-hook of a stack: note whether the caller chose the positions."""

    def __init__(self, calls: _StackCall, name: str) -> None:
        self.calls, self.name = calls, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.calls.user_pos = kwargs.get("pos") is not None
        order, blocks = kwargs.get("layers_execute_order"), kwargs.get("repeat_blocks")
        if blocks is not None and order is None:  # x-transformers' own resolution of the per-call repeats
            order = xt.resolve_repeat_blocks_to_layer_execute_order(
                blocks, len(module.layer_types) // module.len_default_block, module.len_default_block)
        if order is not None:
            _check_order(self.name, tuple(order), "this call's layers_execute_order / repeat_blocks")


# -- finding the blocks ----------------------------------------------------------------------------------


def _stacks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, AttentionLayers, TransformerWrapper or None)`` for every causal stack in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    wrappers = {id(m.attn_layers): m for m in model.modules() if isinstance(m, xt.TransformerWrapper)}
    stacks = [(names[id(m)], m, wrappers.get(id(m))) for m in model.modules() if isinstance(m, xt.AttentionLayers)]
    causal = [s for s in stacks if s[1].causal]
    if not causal:
        kinds = sorted({type(s[1]).__name__ for s in stacks}) or ["no AttentionLayers at all"]
        raise TypeError(
            f"x-transformers adapter: {type(model).__name__} has no causal attention stack ({kinds}). A memory "
            "carries a causal stream from segment to segment, so only Decoder stacks (TransformerWrapper with "
            "attn_layers=Decoder(...)) are supported; other models can follow the MemoryAttention protocol "
            "(memory_plugins.MemoryAttention; example: memory_plugins/models/reference.py)."
        )
    return causal


def _attention_in(block: nn.Module) -> nn.Module:
    """The ``Attention`` inside a layer that may be wrapped in ShiftTokens / LayerScale / Scale."""
    for m in block.modules():
        if isinstance(m, xt.Attention):
            return m
    raise TypeError(f"x-transformers adapter: no Attention module inside {type(block).__name__}")


def _check_order(name: str, order: tuple[int, ...], where: str) -> None:
    if len(set(order)) != len(order):
        raise ValueError(
            f"x-transformers adapter: stack {name or '<root>'!r} executes some layers more than once per forward "
            f"({where}: {order}). A memory belongs to one attention call per segment, so repeated layers are "
            "not supported."
        )


def _check_stack(name: str, stack: nn.Module) -> None:
    _check_order(name, tuple(stack.layers_execute_order), "layers_execute_order, e.g. weight_tie_layers=True")
    if getattr(stack, "add_value_residual", False):
        raise ValueError(
            f"x-transformers adapter: stack {name or '<root>'!r} uses add_value_residual=True: every layer mixes in "
            "the first layer's values, which have no entries for the memory's keys (x-transformers' own mems fail "
            "there too). Build the Decoder without it."
        )
    if getattr(stack, "num_residual_streams", 1) > 1:
        raise ValueError(
            f"x-transformers adapter: stack {name or '<root>'!r} uses {stack.num_residual_streams} residual streams "
            "(hyper-connections fold them into the batch), which a per-sample memory cannot follow."
        )


def _check_attention(name: str, attn: nn.Module) -> None:
    if attn.qkv_receive_diff_residuals:
        raise ValueError(f"x-transformers adapter: {name!r} takes q/k/v from different residuals; not supported")
    if attn.use_latent_kv:
        raise ValueError(f"x-transformers adapter: {name!r} uses multi-latent attention (use_latent_kv); not supported")


def _dims(attn: nn.Module) -> AttentionDims:
    e = attn.to_latent_q.in_features if attn.use_latent_q else attn.to_q.in_features
    h = int(attn.heads)
    return AttentionDims(embed_dim=int(e), num_heads=h, head_dim=int(attn.to_q.out_features // h))


# -- content projections ---------------------------------------------------------------------------------


class _Projector:
    """The block's content projections, as bound methods (so that a deep copy projects with the copy)."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def q(self, x: Tensor) -> Tensor:
        """``x`` (b, n, e) → the block's content queries (b, h, n, d): no rotary, no bias."""
        attn = self.attn
        x = attn.to_latent_q(x) if attn.use_latent_q else x
        q = attn.split_q_heads(attn.to_q(x))  # (b, h, n, d)
        if attn.qk_norm:
            q = xt.l2norm(q, groups=attn.qk_norm_groups) * attn.qk_norm_q_scale
        return attn.q_rmsnorm(q) if attn.q_rmsnorm is not None else q  # (b, h, n, d)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (b, m, e) → the block's content keys and values, one per *query* head: two (b, h, m, d)."""
        attn = self.attn
        k = attn.split_k_heads(attn.to_k(x))  # (b, k, m, d)
        v = attn.split_v_heads(attn.to_v(x))  # (b, k, m, d)
        if attn.qk_norm:
            k = xt.l2norm(k, groups=attn.qk_norm_groups) * attn.qk_norm_k_scale
        k = attn.k_rmsnorm(k) if attn.k_rmsnorm is not None else k
        v = attn.value_rmsnorm(v) if attn.value_rmsnorm is not None else v
        # grouped kv heads: x-transformers' Attend repeats them as (r k)
        return repeat_kv(k, attn.heads, "tile"), repeat_kv(v, attn.heads, "tile")  # (b, h, m, d)


# -- the hooks ---------------------------------------------------------------------------------------------


def _refuse_kv(layer: _Layer, kwargs: dict[str, Any]) -> None:
    """Raise if this configuration cannot place memory vectors before the segment; warn for abs. positions."""
    attn, stack, name = layer.target.module, layer.stack, layer.target.name
    problems = []
    if getattr(stack, "polar_pos_emb", None) is not None:
        problems.append("polar positions (polar_pos_emb)")
    if getattr(attn, "data_dependent_alibi", None) is not None:
        problems.append("data-dependent ALiBi")
    if getattr(attn, "rel_proj_pos_bias", None) is not None:
        problems.append("relative-projection positional bias")
    if getattr(attn.attend, "cope", None) is not None:
        problems.append("CoPE")
    if layer.calls.user_pos:
        problems.append("custom positions (pos=...)")
    if kwargs.get("mem") is not None:
        problems.append("x-transformers' own mems= at the same time")
    if problems:
        raise NotImplementedError(
            f"x-transformers adapter: layer {name!r}: this memory prepends key/value vectors, which cannot be "
            f"combined with {', '.join(problems)}. Use rotary or relative-bias positions, or a memory without "
            "K/V sources (memory='continuous' with stm_len=0)."
        )
    wrapper = layer.wrapper
    if not layer.calls.warned and wrapper is not None and not isinstance(wrapper.pos_emb, xt.always):
        layer.calls.warned = True
        warnings.warn(
            f"x-transformers adapter: {type(wrapper).__name__} adds absolute position embeddings "
            f"({type(wrapper.pos_emb).__name__}); memory vectors keep the positions of the segment they were "
            "written in while every segment restarts at position 0, so this is not an exact Transformer-XL "
            "(like x-transformers' own mems with absolute positions). Use rotary_pos_emb=True or "
            "rel_pos_bias=True (and use_abs_pos_emb=False with ALiBi) for the exact recurrence.",
            UserWarning,
            stacklevel=4,
        )


def _valid(kwargs: dict[str, Any], n: int) -> Tensor | None:
    """A block's real tokens among its n new ones (b, n): its padding ``mask``, else the self-attention key
    mask x-transformers builds from ``seq_start_pos`` (left padding), else None."""
    pad = kwargs.get("mask")
    if pad is None:
        pad = kwargs.get("context_mask")
    return pad[:, -n:].to(torch.bool) if pad is not None and pad.shape[-1] >= n else None


class _PreHook:
    """Forward pre-hook of a block: one memory step, its K/V sources handed to the block's ``mem`` argument."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        layer = self.layer
        memory = layer.hook
        if memory is None or not memory.enabled or kwargs.get("context") is not None:
            return None
        x = args[0] if args else kwargs["x"]  # (b, n, e) attention input (after pre-norm / token shift)
        b, n, _ = x.shape
        cache = kwargs.get("cache")
        c = cache.cached_kv[0].shape[-2] if cache is not None else 0
        valid = _valid(kwargs, n)  # (b, n) or None
        pad = kwargs.get("mask")  # (b, n) or (b, c + n) padding mask of the tokens, or None
        # Incremental decoding: the cache holds the current segment, so the memory is only read.
        read = memory(x, None, valid, write=cache is None)
        if read is not None and read.head_output is not None:
            if layer.target.module.laser:
                raise NotImplementedError(
                    f"x-transformers adapter: layer {layer.target.name!r} uses laser attention (exp values, log "
                    "output), into which a per-head memory result (memory='knn') cannot be mixed; build the Decoder with attn_laser=False.")
            layer.head_read, layer.head_valid = read, valid
        if read is None or read.kv_source is None:
            return None
        _refuse_kv(layer, kwargs)
        source = read.kv_source.to(x.dtype)  # (b, m, e)
        m = source.shape[1]
        # The key mask over [memory ; cache ; segment] goes in as the block's self-attention kv mask
        # (its mem_mask would be padded to m + n only, missing the cached keys).
        own = kwargs.get("context_mask")  # (b, c + n) from seq_start_pos, or None
        if own is None and pad is not None and pad.shape[-1] == c + n:
            own = pad
        kwargs["mem"], kwargs["mem_mask"] = source, None
        kwargs["context_mask"] = memory_key_mask(read.kv_mask, own, b, m, c + n, x.device)  # (b, m + c + n)
        rotary = layer.stack.rotary_pos_emb
        if own is not None and layer.stack.rel_pos is not None and bool((first_valid(own, b, x.device) > 0).any()):
            raise NotImplementedError(
                f"x-transformers adapter: layer {layer.target.name!r}: left padding with a relative position bias "
                f"({type(layer.stack.rel_pos).__name__}): the bias is built from key indices shared by the batch, "
                "so a left-padded sample would see the memory as many positions further away as it has pads. "
                "Pad on the right, or use rotary positions (rotary_pos_emb=True), with a memory that prepends keys.")
        if rotary is not None and kwargs.get("rotary_pos_emb") is not None:
            # memory just before the first real token (x-transformers' rotary positions count the pads too,
            # seq_start_pos or not)
            start = first_valid(own, b, x.device) if own is not None else \
                torch.zeros(b, dtype=torch.long, device=x.device)  # (b,)
            own_pos = torch.arange(c + n, device=x.device).expand(b, c + n)  # (b, c + n)
            kwargs["rotary_pos_emb"] = rotary(torch.cat([memory_positions(m, start), own_pos], dim=1))  # (b, m + c + n)
        return args, kwargs


class _AttendHook:
    """Forward hook of a block's ``Attend``: mix the memory's per-head result into ``out`` (b, h, n, d)."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        layer = self.layer
        read, valid = layer.head_read, layer.head_valid
        layer.head_read = layer.head_valid = None
        if read is None:
            return None
        out, intermediates = output
        return mix_heads(out, read, valid), intermediates  # (b, h, n, d)


class _PostHook:
    """Forward hook of a block: add the memory's output to the block's output."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        memory = self.layer.hook
        self.layer.head_read = self.layer.head_valid = None  # also after a failed forward
        read = memory.take_read() if memory is not None else None
        if read is None or read.output is None:
            return None
        out = output[0] if isinstance(output, tuple) else output  # (b, n, e)
        valid = _valid(kwargs, out.shape[1]) if kwargs.get("cache") is None else None
        out = add_output(out, read, valid)  # the block zeroes padded positions; so do we
        return (out, *output[1:]) if isinstance(output, tuple) else out


# -- the adapter ---------------------------------------------------------------------------------------------


def _is_hooked(module: nn.Module) -> bool:
    return any(isinstance(h, _PreHook) for h in module._forward_pre_hooks.values())


class _Unhook:
    """Forgets the layers' hooks (a cleanup of :class:`Handles`; an object so that deep copies work)."""

    def __init__(self, layers: list[_Layer]) -> None:
        self.layers = layers

    def __call__(self) -> None:
        for layer in self.layers:
            layer.hook = None


class XTransformersAdapter:
    """Memory hooks for every self-attention block of x-transformers' causal stacks."""

    name = "x_transformers"

    def find(self, model: nn.Module, targets: Sequence[str] | None) -> list[Target]:
        found: dict[str, _Layer] = {}
        self._stacks: list[tuple[str, nn.Module, _StackCall]] = []
        for stack_name, stack, wrapper in _stacks(model):
            _check_stack(stack_name, stack)
            calls = _StackCall()
            self._stacks.append((stack_name, stack, calls))
            prefix = f"{stack_name}." if stack_name else ""
            names = {id(m): n for n, m in stack.named_modules()}
            for i, kind in enumerate(stack.layer_types):
                if kind != "a":
                    continue
                attn = _attention_in(stack.layers[i][1])
                name = prefix + names[id(attn)]
                _check_attention(name, attn)
                if _is_hooked(attn):
                    raise ValueError(f"layer {name!r} already has a memory hook: is this model wrapped already?")
                dims = _dims(attn)
                proj = _Projector(attn)
                target = Target(name, attn, dims, HostAttention(dims, proj.q, proj.kv))
                found[name] = _Layer(target, stack, wrapper, calls)
        chosen = select(list(found), targets, "x-transformers self-attention")
        self._layers = {n: found[n] for n in chosen}
        return [self._layers[n].target for n in chosen]

    def attach(self, model: nn.Module, targets: list[Target], hooks: list[MemoryHook]) -> Callable[[], None]:
        layers = [self._layers[t.name] for t in targets]
        used = {id(layer.calls) for layer in layers}
        handles = []
        for stack_name, stack, calls in self._stacks:
            if id(calls) in used:  # a stack called on its own (embeddings in, hidden states out) is one transaction
                begin = InnerCallBegin(hooks[0].controller)
                handles += [stack.register_forward_pre_hook(_StackPreHook(calls, stack_name), with_kwargs=True),
                            stack.register_forward_pre_hook(begin),
                            stack.register_forward_hook(InnerCallEnd(begin), always_call=True)]
        for layer, memory in zip(layers, hooks):
            layer.hook = memory
            module = layer.target.module
            handles.append(module.register_forward_pre_hook(_PreHook(layer), with_kwargs=True))
            handles.append(module.attend.register_forward_hook(_AttendHook(layer)))
            handles.append(module.register_forward_hook(_PostHook(layer), with_kwargs=True, always_call=True))
        return Handles(handles, [_Unhook(layers)])


# -- generation ----------------------------------------------------------------------------------------------


def _logits(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _cached_step(model: nn.Module, current: Tensor, cache: Any) -> tuple[Tensor, Any]:
    """Logits (b, V) after ``current`` (b, c) with x-transformers' kv cache; the updated cache."""
    logits, inter = model(current, cache=cache, return_intermediates=True)  # (b, 1 or c, V)
    return logits[:, -1], inter


def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, *, segment_len: int, cache_kv: bool = True,
             **options: Any) -> Tensor:
    """:func:`memory_plugins.generation.generate` for a wrapped x-transformers model, decoding the current
    segment with x-transformers' kv cache (``cache_kv``). ``options``: ``temperature``, ``filter_logits``,
    ``write_memory`` (the memory is left as it was unless it is True)."""
    from memory_plugins.generation import generate as segment_generate

    return segment_generate(model, prompt, max_new_tokens, segment_len=segment_len,
                            cached_step=_cached_step if cache_kv else None, logits_fn=_logits, **options)


__all__ = ["DEFAULT_TARGETS", "XTransformersAdapter", "generate"]
