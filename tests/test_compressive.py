"""Compressive memory backend (Rae et al., 2019): compression, FIFO bookkeeping, reconstruction loss.

Notation: b batch, n segment length, m memory length, c compression rate, e model dim.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memory_plugins
from memory_plugins import AttentionDims, CompressiveConfig, CompressiveMemory, HostAttention
from memory_plugins.models.reference import Attention, ReferenceDecoder

from .conftest import DEVICE, make_generator


def make(e: int = 4, heads: int = 1, host: HostAttention | None = None, **options: object) -> CompressiveMemory:
    cfg = CompressiveConfig(**options)  # type: ignore[arg-type]
    return CompressiveMemory(cfg, host if host is not None else AttentionDims(e, heads, e // heads), nn.ModuleDict())


def write(mem: CompressiveMemory, state: dict, x: Tensor) -> tuple[dict, Tensor | None]:
    """One step of ``x``: the new state and the step's aux loss (the attention-reconstruction loss)."""
    read, state = mem.step(state, x, None, None)
    return state, read.aux_loss


def held(state: dict, key: str, valid_key: str) -> Tensor:
    """The valid vectors of ``key`` per sample (b, k, e): every sample holds as many here."""
    vec, valid = state[key], state[valid_key]
    return vec[valid].view(vec.shape[0], -1, vec.shape[-1])


def make_host(e: int, heads: int) -> tuple[Attention, HostAttention]:
    attn = Attention(e, heads, 10_000.0)
    return attn, HostAttention(AttentionDims(e, heads, e // heads), attn.project_q, attn.project_kv)


def indexed(b: int, start: int, n: int, e: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Vectors whose every entry is their global position in the stream, plus 10_000 × sample."""
    t = torch.arange(start, start + n, dtype=dtype)  # (n,)
    return (t[None, :, None] + 10_000 * torch.arange(b, dtype=dtype)[:, None, None]).expand(b, n, e).clone()  # (b, n, e)


def write_all(mem: CompressiveMemory, state: dict, xs: list[Tensor]) -> dict:
    for x in xs:
        state, _ = write(mem, state, x)
    return state


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("mem_len", 0, "an int >= 1"),
        ("cmem_len", 0, "an int >= 1"),
        ("compression_rate", 0, "an int >= 1"),
        ("compression_rate", 2.0, "an int >= 1"),
        ("compression", "avg", "['conv', 'mean', 'max']"),
        ("recon_weight", -0.1, "[0.0, inf)"),
    ],
)
def test_config_rejects_bad_values_naming_them(option: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as err:
        CompressiveConfig(**{option: value})  # type: ignore[arg-type]
    msg = str(err.value)
    assert f"CompressiveConfig.{option}" in msg and str(value) in msg and allowed in msg


# -- c = 1 with an identity compression is an XL cache of mem_len + cmem_len ---------------------
@pytest.mark.parametrize("compression", ["mean", "max"])
def test_rate_one_identity_equals_xl_with_both_lengths(compression: str) -> None:
    base = ReferenceDecoder(dim=32, heads=2, depth=2, vocab_size=50).eval()
    xl = memory_plugins.wrap(copy.deepcopy(base), "xl", mem_len=10)
    xl_short = memory_plugins.wrap(copy.deepcopy(base), "xl", mem_len=4)
    comp = memory_plugins.wrap(
        copy.deepcopy(base), "compressive", mem_len=4, cmem_len=6, compression=compression, compression_rate=1
    )
    tokens = torch.randint(0, 50, (2, 40))
    cuts = [0, 5, 8, 15, 19, 25, 30, 33, 40]  # uneven segments; the reset below empties sample 1
    differs_from_short = False
    with torch.no_grad():
        for i, (s, t) in enumerate(zip(cuts[:-1], cuts[1:])):
            if i == 4:
                for m in (xl, xl_short, comp):
                    m.reset_memory(torch.tensor([False, True]))
            a, b, short = xl(tokens[:, s:t]), comp(tokens[:, s:t]), xl_short(tokens[:, s:t])
            assert (a - b).abs().max().item() <= 1e-6, f"segment {i}"
            differs_from_short |= (short - b).abs().max().item() > 1e-3
            assert comp.memory_aux_loss().item() == 0.0  # nothing to train, nothing reported
    assert differs_from_short  # the compressed memory was actually read
    state = comp.memory_state()["layers"]
    assert all(s["cmem"].shape[1] == 6 and s["pending"].shape[1] == 0 for s in state.values())


# -- compression functions ----------------------------------------------------------------------
@pytest.mark.parametrize("c", [2, 3, 4, 5, 7, 12])
def test_mean_pool_of_constant_groups_is_exact(c: int) -> None:
    mem = make(e=5, compression="mean", compression_rate=c)
    const = torch.randn(2, 3, 1, 5)  # one constant vector per (sample, group)
    x = const.expand(2, 3, c, 5).reshape(2, 3 * c, 5)  # (b, g·c, e)
    valid = torch.ones(2, 3 * c, dtype=torch.bool)
    out, out_valid = mem.compress(x, valid)
    assert torch.equal(out, const[:, :, 0]) and bool(out_valid.all())
    # Through the FIFOs: a constant stream fills the compressed memory with that constant, exactly.
    mem = make(e=5, mem_len=3, cmem_len=4, compression="mean", compression_rate=c)
    v = torch.randn(2, 1, 5)
    state = write_all(mem, mem.init_state(2, DEVICE, torch.float32), [v.expand(2, 5, 5)] * (3 * c))
    assert state["cmem"].shape == (2, 4, 5) and torch.equal(state["cmem"], v.expand(2, 4, 5))


def test_pooling_skips_invalid_slots_of_a_mixed_group() -> None:
    x = torch.tensor([[[0.0], [0.0], [3.0], [5.0]]])  # (1, 4, 1): two reset slots, then data
    valid = torch.tensor([[False, False, True, True]])
    out, out_valid = make(e=1, compression="mean", compression_rate=4).compress(x, valid)
    assert out.item() == 4.0 and out_valid.item()
    out, _ = make(e=1, compression="max", compression_rate=4).compress(-x, valid)
    assert out.item() == -3.0  # the zeros of the reset slots do not win the max
    out, out_valid = make(e=1, compression="mean", compression_rate=2).compress(x, valid)
    assert out.flatten().tolist() == [0.0, 4.0] and out_valid.flatten().tolist() == [False, True]


def test_conv_compression_matches_its_formula() -> None:
    """(b, g·c, e) → (b, g, e): out[:, j] = bias + Σ_i W[:, :, i] · x[:, j·c + i] (tap i = i-th oldest)."""
    c, e = 3, 6
    mem = make(e=e, compression="conv", compression_rate=c)
    x = torch.randn(2, 4 * c, e)  # (b, g·c, e)
    out, out_valid = mem.compress(x, torch.ones(2, 4 * c, dtype=torch.bool))
    assert out.shape == (2, 4, e) and out_valid.shape == (2, 4)
    w, bias = mem.conv.weight, mem.conv.bias  # (e_out, e_in, c), (e_out,)
    expected = torch.einsum("oik,bgki->bgo", w, x.reshape(2, 4, c, e)) + bias  # (b, g, e)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tap", [0, 2])
def test_conv_keeps_oldest_to_newest_order_through_the_fifos(tap: int) -> None:
    """A hand-set conv that copies the tap-th vector of each group: the compressed memory must hold
    exactly the right stream positions, oldest first, and the pending vectors the ones after them."""
    c, e = 3, 4
    mem = make(e=e, mem_len=4, cmem_len=3, compression="conv", compression_rate=c).double()
    with torch.no_grad():
        mem.conv.weight.zero_()
        mem.conv.weight[:, :, tap] = torch.eye(e)
        mem.conv.bias.zero_()
    state = mem.init_state(2, DEVICE, torch.float64)
    state = write_all(mem, state, [indexed(2, 5 * i, 5, e) for i in range(6)])  # 30 vectors
    # 26 evicted: 8 groups (0–23) compressed, 24 and 25 pending; cmem keeps the newest 3 groups.
    off = 10_000 * torch.arange(2, dtype=torch.float64)[:, None, None]  # (b, 1, 1)
    groups = torch.tensor([15.0, 18.0, 21.0], dtype=torch.float64) + tap
    assert state["cmem"].shape == (2, 3, e) and torch.equal(state["cmem"], (groups[None, :, None] + off).expand(2, 3, e))
    assert torch.equal(held(state, "pending", "pending_valid"), indexed(2, 24, 2, e))
    assert torch.equal(state["mem"], indexed(2, 26, 4, e))
    read, _ = mem.step(state, indexed(2, 30, 5, e), None, None)
    assert torch.equal(read.kv_source[:, :3], state["cmem"]) and torch.equal(read.kv_source[:, 3:], state["mem"])
    assert read.kv_mask.shape == (2, 7) and bool(read.kv_mask.all())


# -- bookkeeping --------------------------------------------------------------------------------
def test_state_bounded_over_1000_writes_and_partial_groups_never_lost() -> None:
    """Count the vectors: with T written, mem holds min(T, m); of the E = T - |mem| evicted, E mod c wait
    in ``pending`` (exactly the newest evicted ones) and the newest groups sit in ``cmem``."""
    c, mem_len, cmem_len, e = 3, 5, 4, 2
    mem = make(e=e, mem_len=mem_len, cmem_len=cmem_len, compression="mean", compression_rate=c)
    state = mem.init_state(2, DEVICE, torch.float64)
    gen = make_generator(0)
    total = 0
    for _ in range(1000):
        n = int(torch.randint(1, 2 * mem_len + 2 * c, (1,), generator=gen))
        state, aux = write(mem, state, indexed(2, total, n, e))
        total += n
        assert aux is None
        m = min(total, mem_len)
        evicted = total - m
        p, groups = evicted % c, evicted // c
        k = min(groups, cmem_len)
        assert state["mem"].shape == (2, m, e) and torch.equal(state["mem"], indexed(2, total - m, m, e))
        assert state["pending"].shape[1] <= c - 1  # bounded, whatever was written
        assert torch.equal(held(state, "pending", "pending_valid"), indexed(2, evicted - p, p, e))
        assert state["cmem"].shape == (2, k, e)
        centres = c * torch.arange(groups - k, groups, dtype=torch.float64) + (c - 1) / 2  # mean of each group
        expected = centres[None, :, None] + 10_000 * torch.arange(2, dtype=torch.float64)[:, None, None]
        assert torch.equal(state["cmem"], expected.expand(2, k, e))
        assert all(bool(state[v].all()) for v in ("valid", "cmem_valid"))
    assert total > 5000 and sum(v.numel() for v in state.values()) <= 2 * (mem_len + cmem_len + c) * (e + 1)


def test_reset_is_per_sample_and_leaves_others_bit_identical() -> None:
    torch.manual_seed(0)
    _, host = make_host(8, 2)
    mem = make(host=host, mem_len=5, cmem_len=4, compression="conv", compression_rate=3)
    xs = [torch.randn(3, 4, 8) for _ in range(9)]
    state = write_all(mem, mem.init_state(3, DEVICE, torch.float32), xs[:4])
    assert state["mem"].shape[1] and state["cmem"].shape[1] and state["pending_valid"].any()  # all parts in use
    mask = torch.tensor([False, True, False])
    reset = mem.reset(state, mask)
    for key, value in state.items():
        assert torch.equal(reset[key][~mask], value[~mask]), key
        assert not reset[key][1].any(), key  # zeroed vectors, invalid slots
    # The others keep evolving exactly as if nobody had been reset; sample 1 holds exactly what a
    # fresh stream of it holds (its valid vectors, in order).
    after_reset, untouched = write_all(mem, reset, xs[4:]), write_all(mem, state, xs[4:])
    fresh = write_all(mem, mem.init_state(1, DEVICE, torch.float32), [x[1:2] for x in xs[4:]])
    for key in state:
        assert torch.equal(after_reset[key][~mask], untouched[key][~mask]), key
    for vec, val in (("mem", "valid"), ("cmem", "cmem_valid"), ("pending", "pending_valid")):
        torch.testing.assert_close(after_reset[vec][1][after_reset[val][1]], fresh[vec][0][fresh[val][0]])


def test_a_reset_sample_forms_its_groups_from_its_new_stream_only() -> None:
    mem = make(e=1, mem_len=2, cmem_len=4, compression="mean", compression_rate=4)
    state = mem.init_state(2, DEVICE, torch.float64)
    state = write_all(mem, state, [indexed(2, 0, 5, 1)])  # mem 3,4; pending 0,1,2
    state = mem.reset(state, torch.tensor([True, False]))
    state = write_all(mem, state, [indexed(2, 5, 4, 1)])  # sample 1 evicts 3,4,5,6 → group 0..3, pending 4,5,6
    assert state["cmem_valid"].tolist() == [[False], [True]]  # sample 0: 5, 6 wait (its stream restarted at 5)
    assert state["cmem"][:, 0, 0].tolist() == [0.0, 10_001.5]
    state = write_all(mem, state, [indexed(2, 9, 2, 1)])  # evicts 7, 8 → sample 0: group 5..8; sample 1: 4..7
    assert state["cmem_valid"][:, -1].tolist() == [True, True]
    assert state["cmem"][0, -1, 0].item() == 6.5 and state["cmem"][1, -1, 0].item() == 10_005.5
    assert state["pending"][1][state["pending_valid"][1]][:, 0].tolist() == [10_008.0]
    assert not state["pending_valid"][0].any()


def test_detached_state_has_no_graph_and_compressed_memory_is_always_detached() -> None:
    _, host = make_host(8, 2)
    for detach in (True, False):
        mem = make(host=host, mem_len=4, cmem_len=4, compression_rate=2, detach=detach)
        state = mem.init_state(2, DEVICE, torch.float32)
        xs = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(4)]
        state = write_all(mem, state, xs)
        for key, value in state.items():
            keeps_graph = not detach and key == "mem"
            assert (value.grad_fn is not None) == keeps_graph, (detach, key)


# -- attention-reconstruction loss --------------------------------------------------------------
def test_reconstruction_loss_value_weight_and_switches() -> None:
    torch.manual_seed(1)
    e, h, c = 8, 2, 2
    _, host = make_host(e, h)
    mem = make(host=host, mem_len=4, cmem_len=4, compression_rate=c, recon_weight=0.5)
    state = write_all(mem, mem.init_state(2, DEVICE, torch.float32), [torch.randn(2, 4, e)])
    old = state["mem"]  # all four are evicted by the next write of 4
    x = torch.randn(2, 4, e)
    _, aux = write(mem, state, x)
    with torch.no_grad():
        q = host.project_q(x)  # (b, h, n, d)
        k, v = host.project_kv(old)
        kc, vc = host.project_kv(mem.compress(old, torch.ones(2, 4, dtype=torch.bool))[0])
        expected = F.mse_loss(F.scaled_dot_product_attention(q, kc, vc), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(aux, 0.5 * expected)
    assert write(make(host=host, mem_len=4, compression_rate=c, recon_weight=0.0), state, x)[1] is None
    assert write(make(host=host, mem_len=4, compression_rate=c, compression="max"), state, x)[1] is None
    assert write(mem.eval(), state, x)[1] is None  # a training signal: not computed in eval()
    mem.train()
    # A sample whose compressed vectors were all reset does not count: the loss is that of the others.
    reset = mem.reset(state, torch.tensor([False, True]))
    alone = {key: value[:1] for key, value in state.items()}
    torch.testing.assert_close(write(mem, reset, x)[1], write(mem, alone, x[:1])[1])


def test_training_on_reconstruction_loss_lowers_it_and_never_touches_the_host() -> None:
    torch.manual_seed(0)
    e, h, c, n = 16, 2, 4, 8
    attn, host = make_host(e, h)
    # detach=False: the evicted vectors still carry their graph, so the stop-gradient is the backend's.
    mem = make(host=host, mem_len=n, cmem_len=8, compression_rate=c, detach=False)
    opt = torch.optim.Adam(mem.parameters(), lr=1e-2)

    def loss_on(prev: Tensor, x: Tensor) -> Tensor:
        state = write_all(mem, mem.init_state(prev.shape[0], prev.device, prev.dtype), [prev])
        _, aux = write(mem, state, x)  # evicts all of prev: two groups of c
        return aux

    held_out = (torch.randn(8, n, e), torch.randn(8, n, e))
    with torch.no_grad():
        before = loss_on(*held_out).item()
    for _ in range(60):
        prev, x = torch.randn(8, n, e, requires_grad=True), torch.randn(8, n, e, requires_grad=True)
        opt.zero_grad()
        loss = loss_on(prev, x)
        loss.backward()
        assert prev.grad is None and x.grad is None  # stop-gradient into the inputs
        assert all(p.grad is None for p in attn.parameters())  # ... and into the host
        assert mem.conv.weight.grad is not None and mem.conv.weight.grad.abs().sum() > 0
        opt.step()
    with torch.no_grad():
        after = loss_on(*held_out).item()
    assert after < 0.5 * before, (before, after)


def test_through_wrap_task_loss_skips_the_compressor_and_recon_loss_skips_the_host() -> None:
    model = memory_plugins.wrap(
        ReferenceDecoder(dim=32, heads=2, depth=2, vocab_size=50), "compressive", mem_len=6, cmem_len=4,
        compression_rate=2,
    )
    tokens = torch.randint(0, 50, (2, 24))
    for s in range(0, 24, 6):
        logits = model(tokens[:, s : s + 6])
    logits.logsumexp(-1).mean().backward()  # a task loss on the last segment, which read the cmem
    assert all(p.grad is None for p in model.memory.parameters())
    assert all(p.grad is not None for p in model.model.parameters())
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :6])
    aux = model.memory_aux_loss()
    assert aux.item() > 0
    aux.backward()
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.memory.parameters())


def test_float64_end_to_end() -> None:
    model = memory_plugins.wrap(
        ReferenceDecoder(dim=16, heads=2, depth=1, vocab_size=20).double(), "compressive", mem_len=4, cmem_len=2,
    )
    for _ in range(4):
        out = model(torch.randint(0, 20, (2, 5)))
    state = model.memory_state()["layers"]["blocks.0.attn"]
    assert out.dtype == torch.float64 and all(v.dtype in (torch.float64, torch.bool) for v in state.values())
    assert state["cmem"].shape == (2, 2, 16) and not state["pending_valid"].any()  # 16 evicted = 4 groups
    aux = model.memory_aux_loss()
    assert aux.item() > 0 and torch.isfinite(aux)  # (the controller sums aux losses in float32)
