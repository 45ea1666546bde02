"""Adapter for Hugging Face ``transformers`` (≥ 5) decoders: GPT-2, Llama, Qwen2, Mistral.

Notation: b batch, n new tokens of this call, L keys the host already has (cached + new), m memory
length, h heads, k kv heads, d head dim, e model dim, V vocabulary.

How it hooks in: through transformers' own attention-function interface, never through Cache
internals. Each targeted attention module gets

* a *view* of the model config as ``module.config`` whose ``_attn_implementation`` names our function
  registered in ``ALL_ATTENTION_FUNCTIONS`` ("memory_plugins"); every other attribute reads (and
  writes) through to the model's own config object, which is untouched. The module therefore calls
  our function with its query / key / value states (after rotary and after the kv-cache update); the
  function reads the memory, prepends the memory's keys / values (projected with the module's own
  K/V weights; with rotary positions the memory sits at positions ``-m … -1`` before the segment),
  extends the mask with the memory's per-sample ``kv_mask`` and calls the model's real implementation
  (``sdpa`` or ``eager``, read from the model config at every call);
* a forward pre-hook that keeps the module's input ``x`` (the vectors its K/V projections see) for
  the function, and a forward hook that adds the memory's ``output`` (∞-former) to the module output.

The model itself gets a pre-hook / hook pair: a forward called *with* a kv cache (``generate()``,
or a user's own incremental decoding) reads the memory but does not write it, since the cache already
holds those tokens. The prefill call that builds the cache has none, so it writes like any segment:
a user's own incremental decoding runs it under ``memory_frozen()`` too, as ``MemoryModel.generate``
does (else the cached steps see the prompt twice, in the memory and in the cache), and writes the
finished segment afterwards with one forward. Where asked (:func:`include_memory_aux_loss`, or
``memory_aux_loss=True`` in the call), the memory's aux loss is added to ``output.loss``. The backbone
(``model.base_model``: GPT-2's ``transformer``, Llama's ``model``) gets the same pre-hook work when it is
called on its own (hidden states without the head): its mask and cache count, and the call is one
transaction of the memory (committed when it returns, nothing kept if it raises).

GPT-2 has absolute position embeddings. Decision: each segment keeps positions ``0 … n-1`` (so with an
empty or disabled memory the model is exactly the base model), and memory vectors keep the position
embedding they had in their own segment, because they are stored after it was added. A stream through
an XL memory that holds the whole prefix is therefore *exactly* the base model run on the
concatenated segments with ``position_ids`` restarting at 0 in every segment (tested); it is not the
base model on the plain concatenation. XL / compressive with GPT-2 are allowed with a one-time
warning; they need fine-tuning to be useful. Llama / Qwen2 / Mistral use rotary positions, and there
a stream through such an XL memory equals one full-attention pass (tested).

Refused with a message: other architectures (the error lists the supported ones and points to the
``MemoryAttention`` protocol), attention implementations other than ``sdpa`` / ``eager``
(flash / flex kernels cannot take the extended mask), a model that is already hooked, and training
with gradient checkpointing (its recomputation would read and write the memory twice). Mistral-style
sliding windows do not apply to the memory's keys (they are always visible).
"""

from __future__ import annotations

import fnmatch
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from memory_plugins.controller import MemoryHook
from memory_plugins.interface import AttentionDims, HostAttention
from memory_plugins.model import MEMORY_CONFIG, MEMORY_STATE, MEMORY_WEIGHTS, MemoryModel  # noqa: F401
from memory_plugins.splice import (Handles, InnerCallBegin, InnerCallEnd, add_output, first_valid, memory_positions,
                                   mix_heads, repeat_kv)

from . import Target
from .protocol import select

IMPLEMENTATION = "memory_plugins"  # our name in transformers' attention-function registry
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


# -- per-architecture table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture's attention looks to us."""

    attention: str  # class name of its self-attention module
    targets: str  # default targets (glob over module names; all self-attention layers)
    positions: str  # "absolute" (added to the embeddings) or "rotary" (applied to q / k)
    projections: str  # "fused_conv1d" (GPT-2 c_attn) or "separate_linear" (q_proj / k_proj / v_proj)


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("GPT2Attention", "*h.*.attn", "absolute", "fused_conv1d"),
    "llama": ArchSpec("LlamaAttention", "*layers.*.self_attn", "rotary", "separate_linear"),
    "qwen2": ArchSpec("Qwen2Attention", "*layers.*.self_attn", "rotary", "separate_linear"),
    "mistral": ArchSpec("MistralAttention", "*layers.*.self_attn", "rotary", "separate_linear"),
}
#: model_type → default target glob (all self-attention modules; cross-attention is never a target)
DEFAULT_TARGETS: dict[str, str] = {name: spec.targets for name, spec in ARCHITECTURES.items()}


def _split_heads(t: Tensor, d: int) -> Tensor:
    b, n, _ = t.shape
    return t.view(b, n, -1, d).transpose(1, 2)  # (b, heads, n, d)


class _Projections:
    """Content projections of one attention module: q per query head, k / v per kv head."""

    def __init__(self, module: nn.Module, spec: ArchSpec, dims: AttentionDims) -> None:
        self.module, self.spec, self.dims = module, spec, dims

    def q(self, x: Tensor) -> Tensor:
        """``x`` (b, n, e) → (b, h, n, d), no rotary."""
        m, d = self.module, self.dims.head_dim
        if self.spec.projections == "fused_conv1d":
            e = self.dims.embed_dim
            out = torch.addmm(m.c_attn.bias[:e], x.reshape(-1, x.shape[-1]), m.c_attn.weight[:, :e])  # (b·n, e)
            return _split_heads(out.view(*x.shape[:-1], e), d)
        return _split_heads(m.q_proj(x), d)

    def kv_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (b, m, e) → keys and values per kv head, two (b, k, m, d), no rotary."""
        m, d = self.module, self.dims.head_dim
        if self.spec.projections == "fused_conv1d":
            e = self.dims.embed_dim
            out = torch.addmm(m.c_attn.bias[e:], x.reshape(-1, x.shape[-1]), m.c_attn.weight[:, e:])  # (b·m, 2e)
            k, v = out.view(*x.shape[:-1], 2 * e).split(e, dim=-1)
            return _split_heads(k, d), _split_heads(v, d)
        return _split_heads(m.k_proj(x), d), _split_heads(m.v_proj(x), d)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values per *query* head, two (b, h, m, d) (kv head i serves query heads i·r … i·r+r-1)."""
        k, v = self.kv_heads(x)  # (b, k, m, d)
        return repeat_kv(k, self.dims.num_heads), repeat_kv(v, self.dims.num_heads)  # (b, h, m, d)


def _rotate_half(t: Tensor) -> Tensor:
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([-t2, t1], dim=-1)


# -- the per-model and per-layer bindings ------------------------------------------------------------------


@dataclass
class _ModelBinding:
    """State shared by all layers of one hooked model."""

    config: Any  # the model's own config (attention implementation is read from it at every call)
    spec: ArchSpec
    rotary: nn.Module | None  # the model's rotary embedding (rotary architectures)
    incremental: bool = False  # the current forward was called with a kv cache: read only
    attention_mask: Tensor | None = None  # the current forward's 2-D padding mask (b, L), if any
    cached: Any = None  # tokens in the current forward's kv cache before it (int or 0-d tensor), if it has one
    key_mask: Tensor | None = None  # (b, slots) real tokens among a static cache's slots, from a 4-D mask
    aux_in_loss: bool = False  # add the memory aux loss to output.loss (include_memory_aux_loss)
    aux_this_call: bool = False  # memory_aux_loss=True in the current call
    warned: bool = False


@dataclass
class _LayerBinding:
    """One attention module: its projections, hook, and what passes between the hooks of one call."""

    name: str
    module: nn.Module
    model: _ModelBinding
    proj: _Projections
    hook: MemoryHook | None = None
    x: Tensor | None = None  # (b, n, e) input of the current call

    # -- the attention function ------------------------------------------------------------------
    def base_function(self, module: nn.Module) -> Callable[..., tuple[Tensor, Any]]:
        name = self.model.config._attn_implementation
        if name == "eager":
            if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's own eager variant
                return lambda mod, q, k, v, mask, **kw: mod._upcast_and_reordered_attn(q, k, v, mask)
            return sys.modules[type(module).__module__].eager_attention_forward
        if name not in BASE_IMPLEMENTATIONS:
            raise ValueError(_implementation_error(name))
        return ALL_ATTENTION_FUNCTIONS[name]

    def attend(
        self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, **kwargs: Any
    ) -> tuple[Tensor, Any]:
        """``query`` (b, h, n, d), ``key`` / ``value`` (b, k, L, d): the module's states after rotary and cache."""
        base = self.base_function(module)
        memory, x = self.hook, self.x
        if memory is None or x is None or not memory.enabled:
            return base(module, query, key, value, mask, **kwargs)
        rotary = self.model.spec.positions == "rotary"
        b, _, n, _ = query.shape
        length = key.shape[2]  # L
        padding = self.model.attention_mask  # (b, L) or None
        valid = padding[:, -n:].to(torch.bool) if padding is not None and padding.shape[-1] >= n else None  # (b, n)
        # content queries: the module's own (absolute positions), else projected if the memory needs them
        read = memory(x, None if rotary else query, valid, write=not self.model.incremental)
        if read is None or read.kv_source is None:
            return _mix(base(module, query, key, value, mask, **kwargs), read, valid)
        self._warn_absolute()
        source = read.kv_source.to(key.dtype)  # (b, m, e)
        m = source.shape[1]
        km, vm = self.proj.kv_heads(source)  # (b, k, m, d)
        if rotary:  # the 2-D mask spans every token so far (cached + this call's), whatever keys the cache hands over
            if padding is not None and padding.shape[-1] >= n:
                own = padding.to(torch.bool)  # (b, T)
                cached = own.shape[-1] - n
            else:  # the cache's own count; a static cache's slots hold the tokens in order (key_mask: left padding)
                own = self.model.key_mask.to(km.device) if self.model.key_mask is not None else None  # (b, slots)
                cached = self.model.cached if self.model.cached is not None else length - n
            km = self._rotate_memory(km, kwargs.get("position_ids"), n, cached, own)
        key = torch.cat([km.to(key.dtype), key], dim=2)  # (b, k, m + L, d)
        value = torch.cat([vm.to(value.dtype), value], dim=2)  # (b, k, m + L, d)
        keep = read.kv_mask if read.kv_mask is not None else key.new_ones(b, m, dtype=torch.bool)  # (b, m)
        eager = self.model.config._attn_implementation == "eager"
        mask = _extend_mask(mask, keep, n, length, query.dtype, float_mask=eager)  # (b, 1, n, m + L)
        return _mix(base(module, query, key, value, mask, **kwargs), read, valid)

    def _rotate_memory(self, km: Tensor, position_ids: Tensor | None, n: int, c: Any,
                       own: Tensor | None) -> Tensor:
        """Rotary for memory keys ``km`` (b, k, m, d) at the m positions just before the segment's first
        real token (``own`` (b, c + n): which of the tokens so far, the c cached before this call and
        its n, are real; left padding shifts it)."""
        b, _, m, _ = km.shape
        first = first_valid(own, b, km.device)  # (b,) index of the first real key among the L
        if position_ids is None:  # positions count from the segment's first key (cached ones included)
            start = first - c  # (b,)
        else:
            pos_ids = position_ids.to(km.device).long().expand(b, -1)  # (b, n) positions of this call's keys
            at = (first - c).clamp(0, n - 1)[:, None]  # (b, 1) the first real key among them, if it is one
            start = torch.where(first >= c, pos_ids.gather(1, at)[:, 0], pos_ids[:, 0] - (c - first))  # (b,)
        pos = memory_positions(m, start)  # (b, m)
        cos, sin = self.model.rotary(km, pos)  # (b, m, d) each
        cos, sin = cos[:, None].to(km.dtype), sin[:, None].to(km.dtype)  # (b, 1, m, d)
        return km * cos + _rotate_half(km) * sin  # (b, k, m, d)

    def _warn_absolute(self) -> None:
        if self.model.spec.positions != "absolute" or self.model.warned or torch.compiler.is_compiling():
            return  # (a warning inside a compiled graph would break it at every call)
        self.model.warned = True
        warnings.warn(
            "memory_plugins: this model has absolute position embeddings; every segment keeps positions 0..n-1 "
            "and memory vectors keep the positions of the segment they were written in, so XL / compressive "
            "memories are not an exact Transformer-XL here (the stream equals the base model on the "
            "concatenated segments with positions restarting at 0 in each). Fine-tune before relying on it.",
            UserWarning,
            stacklevel=3,
        )


def _mix(result: tuple[Tensor, Any], read: Any, valid: Tensor | None) -> tuple[Tensor, Any]:
    """The attention function's ``(out (b, n, h, d), weights)`` with the read's per-head result mixed in
    (before the module's output projection, which follows the attention function)."""
    if read is None or read.head_output is None:
        return result
    out, weights = result
    out = mix_heads(out.transpose(1, 2), read, valid).transpose(1, 2)  # (b, n, h, d)
    return out.contiguous(), weights


def _extend_mask(
    mask: Tensor | None, keep: Tensor, n: int, length: int, dtype: torch.dtype, *, float_mask: bool
) -> Tensor:
    """The host's mask over its L keys, extended to [memory (m) ; L keys]: (b or 1, 1, n, m + L).

    ``mask`` is None (causal over the L keys, the last n of which are the queries), bool (True = attend)
    or additive float; the result has the same kind (an additive float one when ``float_mask``).
    """
    b, m = keep.shape
    device = keep.device
    if mask is None:
        query_pos = torch.arange(length - n, length, device=device)  # (n,) the queries are the last n keys
        mask = (torch.arange(length, device=device)[None, :] <= query_pos[:, None])[None, None]  # (1, 1, n, L)
        if float_mask:
            mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask[..., :length] if mask.shape[-1] > length else mask  # (B, 1, n, L); static caches pad right
    if mask.dtype == torch.bool:
        head = keep[:, None, None, :].expand(b, 1, n, m)  # (b, 1, n, m)
    else:
        head = torch.zeros((), dtype=mask.dtype, device=device).masked_fill(
            ~keep[:, None, None, :], torch.finfo(mask.dtype).min
        ).expand(b, 1, n, m)  # (b, 1, n, m)
    return torch.cat([head, mask.expand(b, mask.shape[1], n, mask.shape[-1])], dim=-1)  # (b, 1, n, m + L)


def _memory_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Any]:
    """The function registered as ``"memory_plugins"``; reached only through a hooked module's config view."""
    binding = getattr(module.config, "memory_binding", None)
    if binding is None:
        raise RuntimeError(
            f"attn_implementation={IMPLEMENTATION!r} is set by memory_plugins.wrap() on the attention modules it "
            "hooks; do not select it yourself (use 'sdpa' or 'eager' and wrap the model)."
        )
    return binding.attend(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _memory_attention)


class _ConfigView:
    """``module.config`` of a hooked attention module: the model config, but dispatching to us.

    Reads and writes go through to the model's config object (so ``set_attn_implementation`` and any
    later change still apply); only ``_attn_implementation`` answers our registered name.
    """

    def __init__(self, base: Any, binding: _LayerBinding) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "memory_binding", binding)

    @property
    def _attn_implementation(self) -> str:
        return IMPLEMENTATION

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)

    def __repr__(self) -> str:
        return f"ConfigView({object.__getattribute__(self, '_base')!r})"


# -- hooks (objects, not closures: a deep copy of a wrapped model then hooks the copy's own state) -----------


class _LayerPreHook:
    """Keeps the attention module's input ``x`` (b, n, e) for the attention function."""

    def __init__(self, binding: _LayerBinding) -> None:
        self.binding = binding

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.binding.x = args[0] if args else kwargs.get("hidden_states")  # (b, n, e)


class _LayerPostHook:
    """Adds the memory's ``output`` (b, n, e) to the attention module's output."""

    def __init__(self, binding: _LayerBinding) -> None:
        self.binding = binding

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        binding = self.binding
        binding.x = None
        read = binding.hook.take_read() if binding.hook is not None else None
        if read is None or read.output is None:
            return None
        return (add_output(output[0], read), *output[1:])


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, under either of transformers' names for it."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), name, None), property):
            return bool(getattr(model, name))
    return False


def _positional_names(model: nn.Module) -> tuple[str, ...]:
    """The names of ``model.forward``'s positional parameters, in order (read once, at wrap time)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds)


def _refuse_checkpointing(module: nn.Module) -> None:
    if module.training and _checkpointing(module):
        raise NotImplementedError(
            "memory_plugins: gradient checkpointing re-runs the attention layers during backward, which would "
            "read and write the memory a second time; disable it (activation_checkpointing_disable()) while a "
            "memory is attached (or train with shorter segments instead)."
        )


def _capture(shared: _ModelBinding, names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> None:
    """What the layers of this call need from its arguments: whether it has a kv cache (read only), the
    cache's count, and the padding mask (2-D; or a static cache's key mask from a 4-D one)."""
    given = {**dict(zip(names, args)), **kwargs}  # by name: model(ids, mask) passes the mask by position
    cache = given.get("cache", given.get("past_key_values"))
    shared.incremental = cache is not None
    # a static or sliding-window cache hands the layers another number of keys than it has seen tokens
    cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else None
    shared.cached = cached.clone() if isinstance(cached, Tensor) else cached  # a static cache's count moves on
    mask = given.get("attention_mask")
    shared.attention_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    shared.key_mask = None
    if isinstance(mask, Tensor) and mask.dim() == 4 and cache is not None:  # generate() with a static cache
        row = mask[:, 0, -1, :]  # (b, slots) what the newest query may see: every real token so far
        shared.key_mask = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _forget_call(shared: _ModelBinding) -> None:
    shared.incremental = False
    shared.attention_mask, shared.cached, shared.key_mask = None, None, None


class _ModelPreHook:
    """A call with a kv cache reads the memory without writing it; ``memory_aux_loss=True`` is ours."""

    def __init__(self, shared: _ModelBinding, names: tuple[str, ...]) -> None:
        self.shared, self.names = shared, names

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        _refuse_checkpointing(module)
        _capture(self.shared, self.names, args, kwargs)
        self.shared.aux_this_call = bool(kwargs.pop("memory_aux_loss", False))
        return args, kwargs


class _ModelPostHook:
    """Adds the memory's aux loss to ``output.loss`` where asked."""

    def __init__(self, shared: _ModelBinding, hooks: list[MemoryHook]) -> None:
        self.shared, self.hooks = shared, hooks

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        shared = self.shared
        add = shared.aux_in_loss or shared.aux_this_call
        _forget_call(shared)
        shared.aux_this_call = False
        if not add or not self.hooks or output is None:
            return None
        aux = self.hooks[0].controller.aux_loss()
        if isinstance(output, tuple):  # return_dict=False: the loss, if any, comes first
            if output and isinstance(output[0], Tensor) and output[0].dim() == 0:
                return (output[0] + aux.to(output[0]), *output[1:])
            return None
        if getattr(output, "loss", None) is not None:
            output.loss = output.loss + aux.to(output.loss)
        return output


class _BackbonePreHook(InnerCallBegin):
    """The backbone (``model.base_model``, e.g. GPT-2's ``transformer``) called on its own, as for hidden
    states: one transaction of the memory (:class:`InnerCallBegin`), and its own arguments give the
    mask and cache. Inside the model's own call it does nothing (the model's hooks did it)."""

    def __init__(self, shared: _ModelBinding, names: tuple[str, ...], controller: Any) -> None:
        super().__init__(controller)
        self.shared, self.names = shared, names

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:  # type: ignore[override]
        if self.controller.enter_inner(self):  # on its own, not inside the model's call
            _refuse_checkpointing(module)
            _capture(self.shared, self.names, args, kwargs)


class _BackbonePostHook(InnerCallEnd):
    """Ends a backbone call made on its own: commits (nothing kept if it raised). Its arguments are
    forgotten in any case: every memory layer of the call has run."""

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        _forget_call(self.begin.shared)  # type: ignore[attr-defined]
        super().__call__(module, args, *rest)


class _Restore:
    """Gives the modules their config back and forgets the hooks (a cleanup of :class:`Handles`)."""

    def __init__(self, bindings: list[_LayerBinding], configs: list[Any]) -> None:
        self.bindings, self.configs = bindings, configs

    def __call__(self) -> None:
        for binding, config in zip(self.bindings, self.configs):
            binding.module.config = config
            binding.hook, binding.x = None, None


# -- the adapter -----------------------------------------------------------------------------------------------


def _implementation_error(name: str) -> str:
    return (
        f"memory_plugins' Hugging Face adapter runs on attn_implementation 'sdpa' or 'eager', not {name!r}: "
        "flash / flex kernels cannot take the memory's extended mask. Load the model with "
        "attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) before wrap()."
    )


def _unsupported(model: nn.Module, model_type: Any) -> TypeError:
    return TypeError(
        f"memory_plugins' Hugging Face adapter supports model types {sorted(ARCHITECTURES)}; "
        f"{type(model).__name__} has model_type={model_type!r}. For another decoder, make its attention modules "
        "follow the MemoryAttention protocol (memory_plugins.MemoryAttention; example: "
        "memory_plugins/models/reference.py), or add its entry to ARCHITECTURES in adapters/hf.py."
    )


def _rotary_of(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.split(".")[-1] == "rotary_emb":
            return module
    raise TypeError(f"memory_plugins: no rotary_emb module found in {type(model).__name__}")


class HFAdapter:
    """Memory through transformers' attention-function interface (see the module docstring)."""

    name = "hf"

    def find(self, model: nn.Module, targets: Sequence[str] | None) -> list[Target]:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise _unsupported(model, model_type)
        spec = ARCHITECTURES[model_type]
        if config._attn_implementation not in BASE_IMPLEMENTATIONS:
            raise ValueError(_implementation_error(config._attn_implementation))
        shared = _ModelBinding(config, spec, _rotary_of(model) if spec.positions == "rotary" else None)
        modules = {
            n: m
            for n, m in model.named_modules()
            if type(m).__name__ == spec.attention and not getattr(m, "is_cross_attention", False)
        }
        if not modules:
            raise _unsupported(model, model_type)
        defaults = [n for n in modules if fnmatch.fnmatchcase(n, spec.targets)] or list(modules)
        names = list(modules) if targets is not None else defaults
        self._bindings: dict[str, _LayerBinding] = {}
        self._shared = shared
        found = []
        for name in select(names, targets, f"{model_type} self-attention"):
            module = modules[name]
            if isinstance(module.__dict__.get("config"), _ConfigView):
                raise ValueError(f"layer {name!r} already has a memory hook: is this model wrapped already?")
            cfg = module.config
            heads = int(cfg.num_attention_heads)
            head_dim = int(getattr(module, "head_dim", cfg.hidden_size // heads))
            dims = AttentionDims(embed_dim=int(cfg.hidden_size), num_heads=heads, head_dim=head_dim)
            proj = _Projections(module, spec, dims)
            self._bindings[name] = _LayerBinding(name, module, shared, proj)
            found.append(Target(name, module, dims, HostAttention(dims, proj.q, proj.kv)))
        return found

    def attach(self, model: nn.Module, targets: list[Target], hooks: list[MemoryHook]) -> Callable[[], None]:
        shared = self._shared
        bindings = [self._bindings[t.name] for t in targets]
        handles = [
            model.register_forward_pre_hook(_ModelPreHook(shared, _positional_names(model)), with_kwargs=True),
            model.register_forward_hook(_ModelPostHook(shared, hooks), with_kwargs=True, always_call=True),
        ]
        backbone = getattr(model, "base_model", model)  # GPT-2's transformer, Llama's model; a bare one is model
        if backbone is not model and isinstance(backbone, nn.Module) and hooks:
            begin = _BackbonePreHook(shared, _positional_names(backbone), hooks[0].controller)
            handles += [backbone.register_forward_pre_hook(begin, with_kwargs=True),
                        backbone.register_forward_hook(_BackbonePostHook(begin), always_call=True)]
        configs = []
        for binding, memory in zip(bindings, hooks):
            binding.hook = memory
            module = binding.module
            configs.append(module.config)
            module.config = _ConfigView(module.config, binding)
            handles.append(module.register_forward_pre_hook(_LayerPreHook(binding), with_kwargs=True))
            handles.append(module.register_forward_hook(_LayerPostHook(binding), always_call=True))
        return Handles(handles, [_Restore(bindings, configs)])


# -- user helpers ------------------------------------------------------------------------------------------------


def _base_of(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "memory") or getattr(model, "adapter_name", None) != "hf":
        raise TypeError("expected a Hugging Face model wrapped by memory_plugins.wrap()")
    return base


def include_memory_aux_loss(model: nn.Module, enabled: bool = True) -> None:
    """Make every forward of the wrapped ``model`` return ``loss = task loss + memory aux loss``.

    For Trainer-style training, where the loss is read from ``output.loss``. A single call can ask
    for it with ``model(..., labels=..., memory_aux_loss=True)`` instead.
    """
    base = _base_of(model)
    for hook in base._forward_pre_hooks.values():
        if isinstance(hook, _ModelPreHook):
            hook.shared.aux_in_loss = bool(enabled)
            return
    raise RuntimeError("include_memory_aux_loss: this model's memory hooks are gone (was it unwrapped?)")


def generate(model: nn.Module, input_ids: Tensor, *, write_memory: bool = False, **kwargs: Any) -> Any:
    """``model.generate(input_ids, write_memory=..., **kwargs)``: kept for 0.1 code; see
    :meth:`memory_plugins.MemoryModel.generate`. The memory is read at every step and written only when
    ``write_memory`` (0.1 wrote by default)."""
    _base_of(model)
    return model.generate(input_ids, write_memory=write_memory, **kwargs)


def save_pretrained(model: nn.Module, directory: str | Path, *, save_memory_state: bool = False, **kwargs: Any) -> None:
    """``model.save_pretrained(directory, ...)``: kept for 0.1 code (the wrapped model saves its memory itself)."""
    _base_of(model)
    model.save_pretrained(directory, save_memory_state=save_memory_state, **kwargs)


def from_pretrained(model_class: Any, directory: str | Path, **kwargs: Any) -> nn.Module:
    """Load ``model_class.from_pretrained(directory, **kwargs)`` and wrap it with the memory saved beside
    it (config, weights and, if saved, stream state)."""
    return MemoryModel.from_pretrained(model_class.from_pretrained(directory, **kwargs), directory)


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_TARGETS",
    "HFAdapter",
    "from_pretrained",
    "generate",
    "include_memory_aux_loss",
    "save_pretrained",
]
