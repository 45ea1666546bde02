"""The random sticky sampler's generator lives in the memory state: uniform draws, distinct streams,
bit-exact save/restore, deterministic reruns, per-sample resets."""

from __future__ import annotations

import math

import pytest
import torch

import memory_plugins as mp
from memory_plugins.continuous.sticky import advance_rng, counter_uniforms, initial_rng, mix32
from memory_plugins.models.reference import ReferenceDecoder

from .conftest import DEVICE

OPTIONS = dict(n_basis=16, basis_widths=(0.05, 0.1), sticky=True, sticky_bins=8, sticky_sampling="random",
               zero_init_output=False)


def _ks(u: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance of the sample ``u`` (K,) from U(0, 1)."""
    u = u.double().sort().values  # (K,)
    k = u.numel()
    i = torch.arange(1, k + 1, dtype=torch.float64, device=u.device)  # (K,)
    return max((i / k - u).max().item(), (u - (i - 1) / k).max().item())


def test_counter_uniforms_look_uniform_and_streams_are_distinct() -> None:
    rng = initial_rng(0, 0, 64, DEVICE)  # (64, 2)
    assert rng[:, 0].unique().numel() == 64 and bool((rng[:, 1] == 0).all())  # a seed per sample
    draws = [counter_uniforms(rng, 128)]  # (64, 128)
    for _ in range(3):
        rng = advance_rng(rng, torch.ones(64, dtype=torch.bool, device=DEVICE))
        draws.append(counter_uniforms(rng, 128))
    u = torch.stack(draws)  # (4, 64, 128)
    assert bool(((u > 0) & (u < 1)).all())
    bound = 1.63 / math.sqrt(u.numel())  # KS critical value at α = 1%
    assert _ks(u.flatten()) < bound, _ks(u.flatten())
    for per_sample in u.permute(1, 0, 2).flatten(1):  # each sample's own stream is uniform too
        assert _ks(per_sample) < 1.63 / math.sqrt(per_sample.numel())
    # Consecutive draws are uncorrelated, and no two samples or counters repeat a draw.
    flat = u.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.02
    assert u.flatten().unique().numel() > 0.99 * u.numel()
    other_layer = counter_uniforms(initial_rng(0, 1, 64, DEVICE), 128)  # (64, 128)
    other_seed = counter_uniforms(initial_rng(7, 0, 64, DEVICE), 128)  # (64, 128)
    assert not torch.equal(other_layer, u[0]) and not torch.equal(other_seed, u[0])


def test_mix32_is_a_bijection_on_a_range_and_stays_in_32_bits() -> None:
    x = torch.arange(0, 1 << 16, dtype=torch.int64, device=DEVICE) * 65_537  # spread over [0, 2^32)
    h = mix32(x)
    assert h.unique().numel() == x.numel() and int(h.min()) >= 0 and int(h.max()) <= 0xFFFFFFFF


def _stream(model: mp.MemoryModel, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(t) for t in tokens]


def test_random_sticky_sampling_restores_bit_exactly_and_reruns_identically() -> None:
    torch.manual_seed(0)
    model = mp.wrap(ReferenceDecoder(vocab_size=32, dim=32, depth=2, heads=2), "continuous", **OPTIONS).eval()
    tokens = [torch.randint(0, 32, (3, 8)) for _ in range(8)]
    _stream(model, tokens[:4])
    saved = model.memory_state()
    rng = saved["layers"]["blocks.0.attn"]["rng"]
    assert rng.dtype == torch.int64 and rng.shape == (3, 2) and bool((rng[:, 1] > 0).all())  # drew already
    assert not torch.equal(rng[:, 0], saved["layers"]["blocks.1.attn"]["rng"][:, 0])  # layers: own streams
    torch.manual_seed(123)  # the global RNG plays no part
    first = _stream(model, tokens[4:])
    model.set_memory_state(saved)
    torch.manual_seed(456)
    again = _stream(model, tokens[4:])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # The sampler is live: other draws (another seed) give other outputs.
    reseeded = mp.wrap(ReferenceDecoder(vocab_size=32, dim=32, depth=2, heads=2), "continuous",
                       **{**OPTIONS, "sticky_seed": 5})
    reseeded.load_state_dict(model.state_dict())
    reseeded.eval()
    model.reset_memory()
    base = _stream(model, tokens)
    other = _stream(reseeded, tokens)
    assert all(torch.equal(a, b) for a, b in zip(base[:2], other[:2]))  # no sticky draw used before segment 2
    assert not torch.equal(base[-1], other[-1])


def test_reset_restarts_a_samples_stream_and_old_states_load() -> None:
    torch.manual_seed(0)
    model = mp.wrap(ReferenceDecoder(vocab_size=32, dim=32, depth=1, heads=2), "continuous", **OPTIONS).eval()
    tokens = [torch.randint(0, 32, (2, 8)) for _ in range(4)]
    _stream(model, tokens)
    before = model.memory_state()["layers"]["blocks.0.attn"]["rng"]
    model.reset_memory(torch.tensor([True, False]))
    after = model.memory_state()["layers"]["blocks.0.attn"]["rng"]
    fresh = initial_rng(0, 0, 2, DEVICE)
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], before[1])
    # A state saved before the generator existed (no "rng") loads, with fresh streams.
    old = model.memory_state()
    del old["layers"]["blocks.0.attn"]["rng"]
    model.set_memory_state(old)
    assert torch.equal(model.memory_state()["layers"]["blocks.0.attn"]["rng"], fresh)
    bad = model.memory_state()
    bad["layers"]["blocks.0.attn"]["rng"][0, 0] = -1
    with pytest.raises(ValueError, match=r"rng .* must hold values in \[0, 2\*\*32 - 1\]"):
        model.set_memory_state(bad)


def test_sticky_seed_is_checked() -> None:
    with pytest.raises(ValueError, match=r"sticky_seed must be an int in \[0, 4294967295\], got -1"):
        mp.ContinuousConfig(sticky_seed=-1)
