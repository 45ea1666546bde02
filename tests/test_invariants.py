"""Invariants every registered memory must keep, run for each name in ``list_memories()``.

A backend added to the registry gets all of these for free; it only has to add small options to
``SMALL_OPTIONS`` in conftest.py (sized so that its state is full after two 32-token segments).
``VARIANTS`` adds other implementations of a memory (the continuous read's Triton kernels, run in
Triton's interpreter on the CPU), which must keep the same invariants.
"""

from __future__ import annotations

import copy

import pytest
import torch

import memory_plugins as mp
from memory_plugins.models import ReferenceDecoder

from .conftest import SMALL_OPTIONS, needs_kernel_read

# every registered memory, and implementations of one that must keep the same invariants
VARIANTS = {"continuous-triton": ("continuous", {"read_impl": "triton"})}  # the read's Triton kernels
MEMORIES = mp.list_memories() + [pytest.param("continuous-triton", marks=needs_kernel_read)]
SEG = 32


def _memory(name: str) -> str:
    """The registered memory a test name stands for."""
    return VARIANTS[name][0] if name in VARIANTS else name


def _options(name: str) -> dict:
    memory, extra = VARIANTS.get(name, (name, {}))
    if memory not in SMALL_OPTIONS:
        pytest.fail(f"memory {memory!r} is registered but has no SMALL_OPTIONS entry in tests/conftest.py")
    return {**SMALL_OPTIONS[memory], **extra}


def _base(dim: int = 32, depth: int = 2) -> ReferenceDecoder:
    return ReferenceDecoder(vocab_size=37, dim=dim, depth=depth, heads=4)


def _wrapped(name: str, base: torch.nn.Module | None = None) -> mp.MemoryModel:
    """A wrapped model whose memory parameters are random (so that every memory path is active)."""
    wrapped = mp.wrap(base if base is not None else _base(), _memory(name), **_options(name))
    with torch.no_grad():
        for p in wrapped.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return wrapped.eval()


def _segments(b: int, k: int, seg: int = SEG) -> list[torch.Tensor]:
    return [torch.randint(0, 37, (b, seg)) for _ in range(k)]


@pytest.mark.parametrize("name", MEMORIES)
def test_memory_disabled_is_the_base_model_and_leaves_memory_untouched(name: str) -> None:
    base = _base().eval()
    reference = copy.deepcopy(base)
    wrapped = _wrapped(name, base)
    for seg in _segments(2, 3):
        wrapped(seg)
    before = wrapped.memory_state()["layers"]
    probe = torch.randint(0, 37, (2, SEG))
    with wrapped.memory_disabled():
        assert torch.equal(wrapped(probe), reference(probe))
    after = wrapped.memory_state()["layers"]
    assert all(torch.equal(before[l][k], after[l][k]) for l in before for k in before[l])
    assert not torch.equal(wrapped(probe), reference(probe))  # the memory is live again


@pytest.mark.parametrize("name", MEMORIES)
def test_fresh_memory_gives_the_base_models_logits(name: str) -> None:
    base = _base().eval()
    reference = copy.deepcopy(base)
    wrapped = mp.wrap(base, _memory(name), **_options(name)).eval()  # default init: memory starts empty
    probe = torch.randint(0, 37, (3, SEG))
    assert torch.equal(wrapped(probe), reference(probe))


@pytest.mark.parametrize("name", MEMORIES)
def test_per_sample_reset_leaves_the_other_samples_bit_identical(name: str) -> None:
    a = _wrapped(name)
    b = copy.deepcopy(a)
    for seg in _segments(4, 3):
        assert torch.equal(a(seg), b(seg))
    mask = torch.tensor([False, True, False, False])
    a.reset_memory(mask)
    for seg in _segments(4, 2):
        out_a, out_b = a(seg), b(seg)
        assert torch.equal(out_a[~mask], out_b[~mask])
        assert not torch.allclose(out_a[mask], out_b[mask])  # the reset sample did forget


@pytest.mark.parametrize("name", MEMORIES)
def test_state_size_is_constant_and_holds_no_graph(name: str) -> None:
    wrapped = _wrapped(name, _base(dim=16, depth=1)).train()
    sizes = []
    for step in range(1000 if name not in VARIANTS else 50):  # a variant changes the read, not the state
        wrapped(torch.randint(0, 37, (2, SEG)))
        sizes.append(wrapped.memory.state_size())
    assert sizes[1] > 0
    assert set(sizes[1:]) == {sizes[1]}, f"state grew: {sorted(set(sizes))}"
    for state in wrapped.memory.states:
        for key, tensor in state.items():
            assert tensor.grad_fn is None and not tensor.requires_grad, f"{key} keeps an autograd graph"
            assert torch.isfinite(tensor.float()).all(), f"{key} holds NaN/Inf"


@pytest.mark.parametrize("name", MEMORIES)
def test_save_and_restore_mid_stream_continues_identically(name: str) -> None:
    a = _wrapped(name)
    fresh = copy.deepcopy(a)  # same weights, taken before any memory exists
    for seg in _segments(2, 3):
        a(seg)
    saved = a.memory_state()
    later = _segments(2, 2)
    expected = [a(seg) for seg in later]
    fresh.set_memory_state(saved)
    assert all(torch.equal(fresh(seg), out) for seg, out in zip(later, expected))
    fresh.reset_memory()
    assert not torch.equal(fresh(later[0]), expected[0])  # without the saved state it differs


@pytest.mark.parametrize("name", MEMORIES)
def test_moving_the_model_takes_the_stream_state_along(name: str) -> None:
    """``.to(device)`` moves the state with the weights; ``.to(dtype)`` converts it to the dtypes a fresh
    stream of the converted model would have, and the stream goes on (bf16 included)."""
    a = _wrapped(name)
    for seg in _segments(2, 2):
        a(seg)
    keys = {(l, k) for l, s in a.memory_state()["layers"].items() for k in s}
    for dtype in (torch.float64, torch.bfloat16):
        twin = _wrapped(name).to(dtype)
        twin(_segments(2, 1)[0])
        fresh = {(l, k): v.dtype for l, s in twin.memory_state()["layers"].items() for k, v in s.items()}
        a.to(dtype)
        assert {(l, k): v.dtype for l, s in a.memory_state()["layers"].items() for k, v in s.items()} == fresh
        out = a(_segments(2, 1)[0])  # the stream continues in the new dtype
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
    a.to("meta")  # a device other than the test's, available on every machine
    moved = a.memory_state()["layers"]
    assert {(l, k) for l, s in moved.items() for k in s} == keys
    assert all(v.device.type == "meta" for s in moved.values() for v in s.values())


@pytest.mark.parametrize("name", MEMORIES)
def test_unwrap_returns_the_original_model_untouched(name: str) -> None:
    base = _base().eval()
    reference = copy.deepcopy(base)
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in base.modules()]
    wrapped = _wrapped(name, base)
    for seg in _segments(2, 2):
        wrapped(seg)
    original = wrapped.unwrap()
    assert original is base
    probe = torch.randint(0, 37, (2, SEG))
    assert torch.equal(original(probe), reference(probe))
    sd, ref = original.state_dict(), reference.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in base.modules()] == hooks_before
    assert all(getattr(m, "memory_hook", None) is None for m in base.modules())
    with pytest.raises(RuntimeError, match="already unwrapped"):
        wrapped.unwrap()


@pytest.mark.parametrize("name", MEMORIES)
def test_a_deep_copy_is_an_independent_wrapped_model(name: str) -> None:
    a = _wrapped(name).train()
    a(torch.randint(0, 37, (2, SEG)))
    b = copy.deepcopy(a)
    probe = torch.randint(0, 37, (2, SEG))
    assert torch.equal(a(probe), b(probe))
    b_base = b.unwrap()
    assert all(getattr(m, "memory_hook", None) is None for m in b_base.modules())
    assert all(getattr(m, "memory_hook", "none") is not None for m in a.model.modules() if hasattr(m, "memory_hook"))
    a.reset_memory()
    assert a.memory.states[0] is None and b.memory.states[0] is not None


@pytest.mark.parametrize("name", MEMORIES)
def test_state_dict_keeps_base_keys_and_round_trips(name: str) -> None:
    base = _base()
    base_keys = list(base.state_dict())
    wrapped = _wrapped(name, base)
    sd = wrapped.state_dict()
    assert [k for k in sd if not k.startswith("memory.")] == base_keys
    assert all(k.startswith("memory.") for k in sd if k not in base_keys)
    other = mp.wrap(_base(), _memory(name), **_options(name)).eval()
    result = other.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    probe = _segments(2, 2)
    assert all(torch.equal(wrapped(s), other(s)) for s in probe)
    # The base checkpoint alone loads into the wrapped model, reporting only the memory keys missing.
    partial = mp.wrap(_base(), _memory(name), **_options(name)).load_state_dict(base.state_dict(), strict=False)
    assert all(k.startswith("memory.") for k in partial.missing_keys) and not partial.unexpected_keys


@pytest.mark.parametrize("name", MEMORIES)
def test_batch_size_change_without_reset_is_an_error(name: str) -> None:
    wrapped = _wrapped(name)
    wrapped(torch.randint(0, 37, (3, SEG)))
    with pytest.raises(ValueError, match="batch size changed from 3 to 2"):
        wrapped(torch.randint(0, 37, (2, SEG)))
    wrapped.reset_memory()
    wrapped(torch.randint(0, 37, (2, SEG)))  # fine after a full reset
    assert wrapped.memory.states[0] is not None and next(iter(wrapped.memory.states[0].values())).shape[0] == 2


@pytest.mark.parametrize("name", MEMORIES)
def test_no_leak_from_the_future(name: str) -> None:
    a = _wrapped(name)
    for seg in _segments(2, 3):
        a(seg)
    b = copy.deepcopy(a)
    seg = torch.randint(0, 37, (2, SEG))
    changed = seg.clone()
    i = SEG // 2
    changed[:, i + 1 :] = (changed[:, i + 1 :] + 1) % 37
    out, out_changed = a(seg), b(changed)
    assert torch.allclose(out[:, : i + 1], out_changed[:, : i + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, i + 1 :], out_changed[:, i + 1 :])


@pytest.mark.parametrize("name", MEMORIES)
def test_memory_changes_what_the_model_predicts(name: str) -> None:
    """The memory is not a no-op: the same segment after two different histories gives different logits."""
    a = _wrapped(name)
    b = copy.deepcopy(a)
    for seg_a, seg_b in zip(_segments(2, 3), _segments(2, 3)):
        a(seg_a), b(seg_b)
    probe = torch.randint(0, 37, (2, SEG))
    assert (a(probe) - b(probe)).abs().max().item() > 1e-4
    assert torch.isfinite(a.memory_aux_loss())
