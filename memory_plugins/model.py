"""``wrap()``: give any supported transformer a memory in one line, and take it away again.

The wrapped model keeps the host's forward signature; every call is one segment of a stream and the
memory carries over to the next call. A call either completes and commits the new memory of every
layer at once, or fails and leaves the memory as it was. Parameters of the base model keep their
``state_dict`` names; memory parameters live under the ``memory.`` prefix.
"""

from __future__ import annotations

import inspect
import json
import types
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import MemoryConfig
from .controller import MemoryController, MemoryHook
from .registry import create_backend, create_config, get_spec
from .splice import call_failed

MEMORY_WEIGHTS = "memory.safetensors"
MEMORY_CONFIG = "memory_config.json"
MEMORY_STATE = "memory_state.safetensors"

_MEMORY_PREFIX = "memory."
_BASE_PREFIX = "model."


class MemoryModel(nn.Module):
    """A host model with a memory spliced into its attention layers (build it with :func:`wrap`)."""

    def __init__(self, model: nn.Module, memory: MemoryController, config: MemoryConfig, adapter: str,
                 remove_hooks: Callable[[], None]) -> None:
        super().__init__()
        self.model = model
        self.memory = memory
        self.memory_config = config
        self.adapter_name = adapter
        self._remove_hooks = remove_hooks
        self._pre_hook = model.register_forward_pre_hook(_BeginForward(memory))
        self._post_hook = model.register_forward_hook(_CommitForward(memory), always_call=True)
        # Base-model keys stay as they were: strip / restore the "model." level around state_dict().
        self._hooks = [
            self.register_state_dict_post_hook(_strip_base_prefix),
            self.register_load_state_dict_pre_hook(_add_base_prefix),
            self.register_load_state_dict_post_hook(_strip_incompatible),
        ]
        _show_base_signature(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Through the wrapper the commit waits for the base model's call to return, forward hooks that
        # the user put on the base model after wrap() included (a direct call of the base model, as its
        # own generate() makes, commits in the base model's forward hook).
        self.memory.commit_deferred = True
        try:
            out = self.model(*args, **kwargs)
        except BaseException:  # KeyboardInterrupt too: the failed segment leaves no trace
            self.memory.abort()
            raise
        finally:
            self.memory.commit_deferred = False
        self.memory.commit()
        return out

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("forward", None)  # rebuilt by __setstate__ (a bound method would pickle as the class's)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _show_base_signature(self)

    def _replicate_for_data_parallel(self) -> "MemoryModel":
        replica = super()._replicate_for_data_parallel()  # copies __dict__: forward would call the original
        _show_base_signature(replica)
        return replica

    def __getattr__(self, name: str) -> Any:
        # Fall back to the base model for everything we do not define (config, generate, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "memory"):
                raise
            return getattr(self.model, name)

    # -- user-facing memory API -----------------------------------------------------------------
    def reset_memory(self, mask: Tensor | None = None) -> None:
        """Empty the memory: of every sample (``mask=None``, batch size may then change) or of the
        samples where the bool ``mask`` (b,) is True, leaving the others bit-identical."""
        self.memory.reset(mask)

    @contextmanager
    def memory_disabled(self) -> Iterator[None]:
        """Inside, the model behaves exactly as the base model and the memory is left untouched."""
        with self.memory.disabled():
            yield

    @contextmanager
    def memory_frozen(self) -> Iterator[None]:
        """Inside, the memory is read but not written (evaluation of a fixed memory, generation steps)."""
        with self.memory.frozen():
            yield

    def memory_aux_loss(self) -> Tensor:
        """Weighted sum of the memories' auxiliary losses (KL, attention reconstruction) of the last forward."""
        return self.memory.aux_loss()

    def memory_state(self) -> dict[str, Any]:
        """A detached copy of the memory state, for saving or resuming a stream:
        ``{"format", "memory", "fingerprint", "layers": {layer name: {key: tensor} or None}}``."""
        return self.memory.get_state()

    def set_memory_state(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore a state from :meth:`memory_state` (this model's or one with the same memory options).

        Every layer, key, shape, dtype, batch size and value is checked first (a clear error names the
        layer, key, expected and found); floating tensors are converted to this model's dtype and
        device. ``strict=False`` accepts a state saved under other options of the same memory."""
        self.memory.set_state(state, strict=strict)

    def detach_memory(self) -> None:
        """Cut the autograd graph through the memory (for truncated BPTT with ``detach=False``)."""
        self.memory.detach()

    # -- generation, saving and loading -----------------------------------------------------------
    @torch.no_grad()
    def generate(self, *args: Any, write_memory: bool = False, **kwargs: Any) -> Any:
        """The base model's ``generate()`` with the memory read at every step and never written, unless
        ``write_memory``: then the prompt and the generated tokens are written afterwards as one
        segment (one forward), so that the next call continues the stream. The same rule holds with
        ``use_cache=False``, where the base model re-reads the growing prefix at every step.

        Beam search and several sequences per prompt (``num_beams``, ``num_return_sequences``) read,
        in every row of a sample, that sample's memory. What is written is what a forward would
        write: the prompt's padding (``attention_mask``) and the padding after a finished sequence's
        end-of-sequence token stay out of the memory."""
        if not hasattr(self.model, "generate"):
            raise AttributeError(
                f"{type(self.model).__name__} has no generate(); for segment-wise sampling use "
                "memory_plugins.generation.generate(model, prompt, max_new_tokens, segment_len=...)")
        if write_memory and (kwargs.get("num_return_sequences") or 1) > 1:
            raise ValueError(f"generate(write_memory=True) writes one sequence per sample, got num_return_sequences="
                             f"{kwargs['num_return_sequences']}: generate them without write_memory, then write the "
                             "chosen one with a forward")
        self.memory.expand_for_generation = True  # rows of the same sample (beams, sequences) read its memory
        try:
            with self.memory_frozen():
                out = self.model.generate(*args, **kwargs)
        finally:
            self.memory.expand_for_generation = False
            self.memory.expanded = {}
        if write_memory:
            sequences = out if isinstance(out, Tensor) else out.sequences  # (b, t + T)
            mask = self._generated_mask(sequences, args, kwargs)  # (b, t + T) or None
            if mask is None:
                self(sequences)
            else:
                self(sequences, attention_mask=mask)
        return out

    def _generated_mask(self, sequences: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
        """The valid tokens of ``generate``'s ``sequences`` (b, t + T) for writing them: the prompt's
        ``attention_mask``, then every generated token up to and with the first end-of-sequence token
        (later ones are the padding of a finished row). None where the base forward takes no
        ``attention_mask`` or nothing is padded."""
        if "attention_mask" not in inspect.signature(self.model.forward).parameters:
            return None
        prompt = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if prompt is None or prompt.shape[1] > sequences.shape[1]:
            return None
        t = prompt.shape[1]
        given = kwargs.get("attention_mask")
        head = given.to(device=sequences.device, dtype=torch.bool) if given is not None else \
            torch.ones(sequences.shape[0], t, dtype=torch.bool, device=sequences.device)  # (b, t)
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        new = sequences[:, t:]  # (b, T)
        tail = torch.ones_like(new, dtype=torch.bool)  # (b, T)
        if eos is not None:
            ends = torch.isin(new, torch.as_tensor(eos, device=new.device).reshape(-1))  # (b, T)
            tail = ends.cumsum(dim=1) - ends.to(torch.long) == 0  # (b, T) up to and with the first end
        mask = torch.cat([head, tail], dim=1)  # (b, t + T)
        return None if bool(mask.all()) else mask.to(torch.long)

    def save_pretrained(self, directory: str | Path, *, save_memory_state: bool = False, **kwargs: Any) -> None:
        """Save the base model (its own ``save_pretrained`` if it has one, else ``model.pt``) and,
        beside it, the memory's weights (``memory.safetensors``) and config (``memory_config.json``);
        ``save_memory_state`` also saves the current stream's state (``memory_state.safetensors``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(directory, **kwargs)
        else:
            torch.save(self.model.state_dict(), directory / "model.pt")
        _save_tensors({k: v.detach() for k, v in self.memory.state_dict().items()}, directory / MEMORY_WEIGHTS)
        config = self.memory_config
        meta = {"memory": type(config).name, "options": asdict(config), "targets": list(self.memory.names),
                "adapter": self.adapter_name}
        (directory / MEMORY_CONFIG).write_text(json.dumps(meta, indent=2))
        if save_memory_state:
            _write_state_file(self, directory / MEMORY_STATE)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "MemoryModel":
        """Wrap ``model`` (the base model, already loaded from ``directory``) with the memory saved by
        :meth:`save_pretrained`: its config, weights and, if saved, stream state."""
        directory = Path(directory)
        path = directory / MEMORY_CONFIG
        if not path.exists():
            raise FileNotFoundError(f"from_pretrained: no {MEMORY_CONFIG} in {directory}; was it saved by "
                                    "MemoryModel.save_pretrained?")
        meta = json.loads(path.read_text())
        fields = get_spec(meta["memory"]).config_cls.option_names()
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["options"].items() if k in fields}
        wrapped = wrap(model, meta["memory"], targets=meta["targets"], **options)
        p = next(model.parameters(), None)
        _read_memory_files(wrapped, directory, p.device if p is not None else torch.device("cpu"))
        return wrapped

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the original model object, as it was before :func:`wrap`."""
        self._remove_hooks()
        self._pre_hook.remove()
        self._post_hook.remove()
        for h in self._hooks:
            h.remove()
        self._remove_hooks = _already_unwrapped
        return self.model


def _show_base_signature(wrapped: MemoryModel) -> None:
    """Make ``inspect.signature(wrapped.forward)`` the base model's forward signature, which is what
    ``transformers.Trainer`` reads to keep the dataset columns the model accepts.

    A bound method's signature is its function's, shared by every instance; so each wrapped model gets,
    in its own ``__dict__``, ``forward`` bound to a copy of :meth:`MemoryModel.forward` carrying the
    base's signature. The copy shares the code object, so it runs the same forward and torch.compile's
    guard on a patched forward (its ``__code__``) is the same for every wrapped model. A base whose
    signature cannot be read keeps ``(*args, **kwargs)``.
    """
    try:
        base = inspect.signature(wrapped.model.forward)
    except (TypeError, ValueError):
        return
    template = MemoryModel.forward
    fn = types.FunctionType(template.__code__, template.__globals__, template.__name__)
    fn.__qualname__, fn.__module__, fn.__doc__ = template.__qualname__, template.__module__, wrapped.model.forward.__doc__
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)  # dropped again by the binding
    fn.__signature__ = base.replace(parameters=[this, *base.parameters.values()])
    object.__setattr__(wrapped, "forward", types.MethodType(fn, wrapped))


def _already_unwrapped() -> None:
    raise RuntimeError("this MemoryModel was already unwrapped")


class _BeginForward:
    """Pre-hook on the base model. An object, not a closure: ``copy.deepcopy`` of a wrapped model then
    gives the copy's base model a hook on the copy's controller (a closure would keep the original's)."""

    def __init__(self, memory: MemoryController) -> None:
        self.memory = memory

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.memory.begin()


class _CommitForward:
    """Forward hook on the base model (``always_call``): the forward returned, so every layer's new state
    is committed; it raised, so nothing it staged is kept."""

    def __init__(self, memory: MemoryController) -> None:
        self.memory = memory

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.memory.commit_deferred:  # called through the wrapper, which commits (or aborts) after every hook
            return
        if call_failed(output):
            self.memory.abort()
        else:
            self.memory.commit()


def _write_state_file(model: MemoryModel, path: Path) -> None:
    """``model``'s stream state as safetensors: one tensor per ``"layer|key"``, the fingerprint as metadata
    (``save_pretrained``'s ``memory_state.safetensors``, and each process's file in a Trainer checkpoint)."""
    state = model.memory_state()
    flat = {f"{layer}|{key}": t for layer, s in state["layers"].items() if s is not None for key, t in s.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_tensors(flat, path, {"fingerprint": state["fingerprint"]})


def _read_memory_files(model: MemoryModel, directory: Path, device: torch.device,
                       state_file: str | None = MEMORY_STATE) -> None:
    """The memory weights and, if saved, the stream state (``state_file``; None: the weights only) in
    ``directory`` onto ``device``: what ``save_pretrained`` wrote (and, in a Trainer checkpoint of
    several processes, each process's own state file)."""
    model.memory.load_state_dict(_load_tensors(directory / MEMORY_WEIGHTS, device), strict=True)
    if state_file is not None and (directory / state_file).exists():
        _read_state_file(model, directory / state_file, device)


def _read_state_file(model: MemoryModel, path: Path, device: torch.device) -> None:
    """Set ``model``'s stream state from a file :func:`_write_state_file` wrote (validated by
    ``set_memory_state``, which names an unknown layer or key)."""
    layers: dict[str, dict[str, Tensor] | None] = dict.fromkeys(model.memory.names)
    for flat, t in _load_tensors(path, device).items():
        layer, key = flat.rsplit("|", 1)
        layers[layer] = {**(layers.get(layer) or {}), key: t}
    model.set_memory_state({**model.memory_state(), "layers": layers})


def _save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors when installed (the ``hf`` extra), else torch.save to the same name."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, path)
        return
    save_file(tensors, str(path), metadata=metadata)


def _load_tensors(path: Path, device: torch.device) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        return torch.load(path, map_location=device, weights_only=True)
    try:
        return load_file(str(path), device=str(device))
    except Exception:  # written by torch.save where safetensors was missing
        return torch.load(path, map_location=device, weights_only=True)


def _strip_base_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    base = prefix + _BASE_PREFIX
    for key in [k for k in state_dict if k.startswith(base)]:
        state_dict[prefix + key[len(base):]] = state_dict.pop(key)


def _add_base_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Give the base model's keys back their ``model.`` level before loading. A key is the base model's
    when the base model has it: its own keys may start with ``model.`` too (``LlamaForCausalLM``'s
    ``model.embed_tokens.weight``), so the prefix alone cannot tell. Keys that already carry the level
    (a state dict saved without the strip) stay; others that are not the memory's get it, so that
    ``load_state_dict`` reports them under their own names."""
    module._load_prefix = prefix
    base_keys = set(module.model.state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rel = key[len(prefix):]
        if rel in base_keys or not (rel.startswith(_MEMORY_PREFIX) or rel.startswith(_BASE_PREFIX)
                                    and rel[len(_BASE_PREFIX):] in base_keys):
            state_dict[prefix + _BASE_PREFIX + rel] = state_dict.pop(key)


def _strip_incompatible(module: nn.Module, incompatible: Any) -> None:
    base = getattr(module, "_load_prefix", "") + _BASE_PREFIX
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k.replace(base, base[: -len(_BASE_PREFIX)], 1) if k.startswith(base) else k for k in keys]


def wrap(
    model: nn.Module,
    memory: str | MemoryConfig = "xl",
    *,
    targets: Sequence[str] | None = None,
    **options: Any,
) -> MemoryModel:
    """Give ``model`` a memory in every attention layer (or those matching the glob ``targets``).

    ``memory`` is a registered name (see :func:`list_memories`) or a config object; ``options`` are
    that memory's config fields, e.g. ``wrap(model, "xl", mem_len=1024)`` or
    ``wrap(model, "continuous", n_basis=512)``.
    """
    from memory_plugins.adapters import find_adapter  # the adapter registry; host libraries load lazily

    if isinstance(model, MemoryModel):
        raise ValueError("this model is already wrapped: call unwrap() first, or wrap the original model")
    config = create_config(memory, **options)
    adapter = find_adapter(model)
    found = adapter.find(model, targets)
    if not found:
        raise ValueError(f"adapter {adapter.name!r} found no attention layer to extend in {type(model).__name__}")
    shared = nn.ModuleDict()
    backends = [create_backend(config, t.host, shared) for t in found]
    controller = MemoryController(backends, [t.name for t in found], shared, config)
    p = next(model.parameters(), None)
    if p is not None:
        controller.to(device=p.device)
        if p.is_floating_point():
            controller.to(dtype=p.dtype)
    hooks = [MemoryHook(controller, i, t.name, t.host) for i, t in enumerate(found)]
    remove = adapter.attach(model, found, hooks)
    return MemoryModel(model, controller, config, adapter.name, remove)
