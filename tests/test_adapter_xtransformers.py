"""x-transformers adapter: exact against x-transformers' own XL recurrence, every memory, generation.

Notation: b batch, n segment length, m memory length, V vocabulary. Models are tiny (dim 32, depth 2).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import Tensor, nn

import memory_plugins as mp

from .conftest import DEVICE, SMALL_OPTIONS

xt = pytest.importorskip("x_transformers")
from x_transformers import Decoder, Encoder, TransformerWrapper  # noqa: E402

from memory_plugins.adapters.x_transformers import _Projector, generate  # noqa: E402

MEMORIES = mp.list_memories()
V, N = 53, 8  # vocabulary, segment length
POSITIONS = {
    "rel_pos_bias": dict(rel_pos_bias=True),
    "rotary": dict(rotary_pos_emb=True),
    "rotary_xpos": dict(rotary_xpos=True),
    "alibi": dict(alibi_pos_bias=True),
}



def _net(max_mem_len: int = 0, abs_pos: bool = False, **layers: object) -> TransformerWrapper:
    with torch.device("cpu"):  # x-transformers' ALiBi uses the legacy torch.Tensor(list), CPU-only at construction
        net = TransformerWrapper(
            num_tokens=V, max_seq_len=4 * N, max_mem_len=max_mem_len, use_abs_pos_emb=abs_pos,
            attn_layers=Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, verbose=False, **layers),
        )  # fmt: skip
    return net.to(DEVICE).eval()


def _options(name: str) -> dict:
    if name not in SMALL_OPTIONS:
        pytest.fail(f"memory {name!r} is registered but has no SMALL_OPTIONS entry in tests/conftest.py")
    return SMALL_OPTIONS[name]


def _wrapped(name: str, net: nn.Module) -> mp.MemoryModel:
    """Wrapped with random memory parameters, so that every memory path (incl. zero-init outputs) is live."""
    wrapped = mp.wrap(net, name, **_options(name))
    with torch.no_grad():
        for p in wrapped.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return wrapped.eval()


def _state_close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    a, b = a["layers"], b["layers"]
    return a.keys() == b.keys() and all(
        (a[k] is None) == (b[k] is None)
        and (a[k] is None or (a[k].keys() == b[k].keys() and all(
            a[k][s].shape == b[k][s].shape and torch.allclose(a[k][s].float(), b[k][s].float(), atol=tol)
            for s in a[k])))
        for k in a
    )


# -- the key test: x-transformers' own Transformer-XL path --------------------------------------------------


# Unpadded only: x-transformers' native mems store padded positions too (masked by mem_mask), while our
# memories never store padding (tests/test_padding.py checks a padded batch against unpadded streams).
@pytest.mark.parametrize("padded", [False])
@pytest.mark.parametrize("positions", list(POSITIONS))
def test_xl_equals_native_max_mem_len_and_mems(positions: str, padded: bool) -> None:
    M = 12  # not a multiple of N: the memory is partly filled, then slides
    native = _net(max_mem_len=M, **POSITIONS[positions])
    ours = mp.wrap(copy.deepcopy(native), "xl", mem_len=M)
    tokens = torch.randint(0, V, (2, 5 * N))
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, -3:] = not padded  # sample 1 pads its last 3 positions of every segment
    mems = None
    with torch.no_grad():
        for s in range(0, tokens.shape[1], N):
            expected, mems = native(tokens[:, s : s + N], mask=mask, mems=mems, return_mems=True)
            got = ours(tokens[:, s : s + N], mask=mask)
            assert (got - expected).abs().max().item() <= 1e-5
    assert s > 0 and not torch.allclose(got, native(tokens[:, s : s + N], mask=mask), atol=1e-3)  # memory mattered


def test_rotary_memory_sits_at_negative_positions() -> None:
    """XL covering the whole prefix equals one full causal pass (rotary: memory at -m … -1)."""
    net = _net(rotary_pos_emb=True)
    tokens = torch.randint(0, V, (2, 3 * N))
    with torch.no_grad():
        full = net(tokens)
        ours = mp.wrap(net, "xl", mem_len=3 * N)
        streamed = torch.cat([ours(tokens[:, s : s + N]) for s in range(0, 3 * N, N)], dim=1)
    assert (streamed - full).abs().max().item() <= 1e-5


# -- targets -----------------------------------------------------------------------------------------------


def test_targets_are_the_self_attention_blocks_by_layer_type() -> None:
    net = TransformerWrapper(
        num_tokens=V, max_seq_len=4 * N, use_abs_pos_emb=False,
        attn_layers=Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, cross_attend=True, rel_pos_bias=True,
                            shift_tokens=1, use_layerscale=True, layerscale_init_value=0.5, verbose=False),
    ).eval()  # fmt: skip
    keys = list(net.state_dict())
    kinds = [type(m) for m in net.modules()]
    spare = copy.deepcopy(net)
    context = torch.randn(2, 5, 32)
    tokens = torch.randint(0, V, (2, N))
    with torch.no_grad():
        base = net(tokens, context=context)
        wrapped = mp.wrap(net, "xl", mem_len=N)
        # layer types ('a', 'c', 'f') * 2: self-attention at 0 and 3, inside ShiftTokens and LayerScale
        assert wrapped.memory.names == ["attn_layers.layers.0.1.fn.fn", "attn_layers.layers.3.1.fn.fn"]
        assert all(net.attn_layers.layer_types[int(n.split(".")[2])] == "a" for n in wrapped.memory.names)
        assert torch.equal(wrapped(tokens, context=context), base)  # empty memory: the base model
        second = wrapped(tokens, context=context)
    assert not torch.allclose(second, base, atol=1e-4)  # the memory is read
    assert [k for k in wrapped.state_dict() if not k.startswith("memory.")] == keys
    assert [type(m) for m in net.modules()] == kinds  # nothing replaced
    only_first = mp.wrap(spare, "xl", mem_len=N, targets=["*layers.0.*"])
    assert only_first.memory.names == ["attn_layers.layers.0.1.fn.fn"]
    # Encoder-decoder: the decoder's self-attention only (the encoder is not causal, cross-attention is 'c').
    encdec = xt.XTransformer(dim=32, enc_num_tokens=V, enc_depth=1, enc_heads=2, enc_max_seq_len=N,
                             dec_num_tokens=V, dec_depth=2, dec_heads=2, dec_max_seq_len=N,
                             dec_rotary_pos_emb=True, enc_rotary_pos_emb=True).eval()  # fmt: skip
    assert mp.wrap(encdec, "xl", mem_len=N).memory.names == [
        "decoder.net.attn_layers.layers.0.1", "decoder.net.attn_layers.layers.3.1"
    ]


# -- every backend: queries, outputs, masks ------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_output_memory_gets_the_blocks_own_queries_and_adds_to_its_output(probe: str, kv_heads: int) -> None:
    net = _net(rel_pos_bias=True, attn_kv_heads=kv_heads, attn_qk_norm=kv_heads == 1)
    reference = copy.deepcopy(net)
    attend_inputs: list[tuple[Tensor, ...]] = []
    for layer_type, (_, block, _) in zip(net.attn_layers.layer_types, net.attn_layers.layers):
        if layer_type == "a":
            block.attend.register_forward_pre_hook(lambda mod, args: attend_inputs.append(args[:3]))
    wrapped = mp.wrap(net, probe)
    tokens = torch.randint(0, V, (2, N))
    with torch.no_grad():
        got = wrapped(tokens)
        # Reference: the same block with tanh(x R) added to its output by hand.
        for backend, (_, block, _) in zip(wrapped.memory.layers, reference.attn_layers.layers[::2]):
            r = backend.r
            block.register_forward_hook(lambda mod, args, out, r=r: (out[0] + torch.tanh(args[0] @ r), *out[1:]))
        expected = reference(tokens)
    assert (got - expected).abs().max().item() <= 1e-5
    modules = dict(wrapped.model.named_modules())
    for i, backend in enumerate(wrapped.memory.layers):
        x, q = backend.seen[0]
        q_block, k_block, v_block = attend_inputs[i]  # what the block's attention really used
        assert torch.allclose(q, q_block, atol=1e-6)
        k, v = _Projector(modules[wrapped.memory.names[i]]).kv(x)  # what compressive's recon loss uses
        r = 2 // k_block.shape[1]
        assert torch.allclose(k, k_block.repeat(1, r, 1, 1), atol=1e-6)
        assert torch.allclose(v, v_block.repeat(1, r, 1, 1), atol=1e-6)


@pytest.mark.parametrize("name", MEMORIES)
def test_per_sample_reset_is_respected_by_the_block(name: str) -> None:
    a = _wrapped(name, _net(rotary_pos_emb=True))
    fresh = copy.deepcopy(a)
    segs = [torch.randint(0, V, (2, N)) for _ in range(4)]
    with torch.no_grad():
        for seg in segs[:3]:
            a(seg)
        kept = copy.deepcopy(a)
        a.reset_memory(torch.tensor([True, False]))
        out, out_kept, out_fresh = a(segs[3]), kept(segs[3]), fresh(segs[3])
    assert (out[0] - out_fresh[0]).abs().max().item() <= 1e-5  # sample 0 sees an empty memory
    assert torch.equal(out[1], out_kept[1])  # sample 1 untouched
    assert (out[0] - out_kept[0]).abs().max().item() > 1e-4  # and the memory did matter for sample 0


@pytest.mark.parametrize("name", MEMORIES)
def test_memory_disabled_is_the_base_model(name: str) -> None:
    net = _net(rel_pos_bias=True)
    reference = copy.deepcopy(net)
    wrapped = _wrapped(name, net)
    segs = [torch.randint(0, V, (2, N)) for _ in range(3)]
    with torch.no_grad():
        for seg in segs[:2]:
            wrapped(seg)
        with wrapped.memory_disabled():
            assert torch.equal(wrapped(segs[2]), reference(segs[2]))
        assert not torch.allclose(wrapped(segs[2]), reference(segs[2]), atol=1e-4)


def test_training_step_reaches_base_and_memory_parameters() -> None:
    wrapped = mp.wrap(_net(rotary_pos_emb=True), "compressive", **SMALL_OPTIONS["compressive"]).train()
    runner = mp.SegmentRunner(wrapped, segment_len=N)
    out = runner(torch.randint(0, V, (2, 6 * N + 1)), backward=True)
    assert out.aux_loss.item() > 0  # the reconstruction loss ran through the block's project_q / project_kv
    to_q = wrapped.model.attn_layers.layers[0][1].to_q.weight
    assert to_q.grad is not None and to_q.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.memory.parameters())


# -- generation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["rel_pos_bias", "rotary"])
@pytest.mark.parametrize("name", MEMORIES)
def test_incremental_decoding_equals_the_uncached_forward(name: str, positions: str) -> None:
    wrapped = _wrapped(name, _net(**POSITIONS[positions]))
    tokens = torch.randint(0, V, (2, 4 * N))
    with torch.no_grad():
        for s in range(0, 3 * N, N):
            wrapped(tokens[:, s : s + N])
        seg = tokens[:, 3 * N :]
        before = wrapped.memory_state()
        with wrapped.memory_frozen():
            full = wrapped(seg)  # (b, n, V)
            cache, steps = None, []
            for t in range(1, N + 1):
                logits, cache = wrapped(seg[:, :t], cache=cache, return_intermediates=True)
                steps.append(logits[:, -1])
        with wrapped.memory_disabled():
            plain = wrapped(seg)
    assert (torch.stack(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert _state_close(before, wrapped.memory_state(), tol=0.0)  # read at every step, never written
    assert not torch.allclose(full, plain, atol=1e-4)  # and the memory was read


@pytest.mark.parametrize("name", MEMORIES)
def test_generate_writes_segments_at_boundaries(name: str) -> None:
    wrapped = _wrapped(name, _net(rotary_pos_emb=True))
    twin = copy.deepcopy(wrapped)
    prompt = torch.randint(0, V, (2, N + 3))  # one full segment + 3 tokens of the next
    before = wrapped.memory_state()
    unasked = generate(wrapped, prompt, 2 * N, segment_len=N)  # ends 3 tokens into the fourth segment
    assert _state_close(before, wrapped.memory_state(), tol=0.0)  # not asked to write: memory as it was
    new = generate(wrapped, prompt, 2 * N, segment_len=N, write_memory=True)
    uncached = generate(copy.deepcopy(twin), prompt, 2 * N, segment_len=N, cache_kv=False, write_memory=True)
    assert torch.equal(new, uncached) and torch.equal(new, unasked)
    # The memory now holds exactly the three complete segments, as if streamed segment by segment.
    stream = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        for s in range(0, 3 * N, N):
            last = twin(stream[:, s : s + N])  # (b, n, V)
        # greedy reference for the open segment: uncached forward, memory read-only
        with twin.memory_frozen():
            logits = twin(stream[:, 3 * N : -1])  # (b, 2, V)
    assert _state_close(wrapped.memory_state(), twin.memory_state())
    assert torch.equal(last[:, -1].argmax(-1), stream[:, 3 * N])  # first token after the boundary
    assert torch.equal(logits.argmax(-1), stream[:, -2:])


def test_generate_with_autoregressive_wrapper_inside_memory_frozen() -> None:
    from x_transformers import AutoregressiveWrapper

    wrapped = _wrapped("xl", _net(rotary_pos_emb=True))
    with torch.no_grad():
        wrapped(torch.randint(0, V, (2, N)))
    prompt = torch.randint(0, V, (2, 3))
    ours = generate(copy.deepcopy(wrapped), prompt, 4, segment_len=N)
    with wrapped.memory_frozen():
        theirs = AutoregressiveWrapper(wrapped).generate(prompt, 4, temperature=0.0, cache_kv=True)
    assert torch.equal(ours, theirs)


# -- refusals and warnings -----------------------------------------------------------------------------------


def test_absolute_positions_warn_once_but_match_native() -> None:
    native = _net(max_mem_len=N, abs_pos=True, alibi_pos_bias=True)
    ours = mp.wrap(copy.deepcopy(native), "xl", mem_len=N)
    tokens = torch.randint(0, V, (2, 2 * N))
    with torch.no_grad():
        _, mems = native(tokens[:, :N], return_mems=True)
        ours(tokens[:, :N])
        with pytest.warns(UserWarning, match="absolute position embeddings"):
            got = ours(tokens[:, N:])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours(tokens[:, N:])  # warned once per stack
    assert (got - native(tokens[:, N:], mems=mems)).abs().max().item() <= 1e-5


def test_refused_configurations_say_why() -> None:
    enc = TransformerWrapper(num_tokens=V, max_seq_len=N, attn_layers=Encoder(dim=32, depth=1, heads=2))
    with pytest.raises(TypeError, match="causal"):
        mp.wrap(enc, "xl", mem_len=N)
    with pytest.raises(ValueError, match="more than once"):
        mp.wrap(_net(rel_pos_bias=True, weight_tie_layers=True), "xl", mem_len=N)
    polar = mp.wrap(_net(polar_pos_emb=True), "xl", mem_len=N)
    with torch.no_grad():
        polar(torch.randint(0, V, (1, N)))  # empty memory: nothing to place yet
        with pytest.raises(NotImplementedError, match="polar"):
            polar(torch.randint(0, V, (1, N)))
    custom = mp.wrap(_net(rotary_pos_emb=True), "xl", mem_len=N)
    with torch.no_grad():
        custom(torch.randint(0, V, (1, N)))
        with pytest.raises(NotImplementedError, match="custom positions"):
            custom(torch.randint(0, V, (1, N)), pos=torch.arange(N))
    with pytest.raises(TypeError, match="MemoryAttention"):
        mp.wrap(nn.Sequential(nn.Linear(4, 4)), "xl")
    with pytest.raises(ValueError, match="add_value_residual"):
        mp.wrap(_net(rotary_pos_emb=True, add_value_residual=True), "xl", mem_len=N)
    repeated = mp.wrap(_net(rotary_pos_emb=True), "xl", mem_len=N)
    with torch.no_grad(), pytest.raises(ValueError, match=r"more than once.*\(0, 1, 0, 1\)"):
        repeated(torch.randint(0, V, (1, N)), layers_execute_order=(0, 1, 0, 1))  # the memory stays as it was
    assert repeated.memory.states == [None, None]


@pytest.mark.parametrize("positions", ["alibi", "rel_pos_bias"])
def test_left_padding_with_a_relative_bias_is_refused_and_right_padding_streams_as_alone(positions: str) -> None:
    """The bias is built from the batch's key indices: a left-padded sample would see its memory as many
    positions away as it has pads. Refused (nothing written); right padding is exact."""
    wrapped = _wrapped("xl", _net(**POSITIONS[positions]))
    tokens = torch.randint(0, V, (2, 2 * N))
    left = torch.ones(2, N, dtype=torch.bool)
    left[1, :3] = False
    with torch.no_grad():
        wrapped(tokens[:, :N])
        before = wrapped.memory_state()
        with pytest.raises(NotImplementedError, match="left padding"):
            wrapped(tokens[:, N:], mask=left)
        assert _state_close(before, wrapped.memory_state(), tol=0.0)
        right = left.flip(-1)
        alone = copy.deepcopy(wrapped)
        alone.set_memory_state({**before, "layers": {k: {n: t[1:] for n, t in st.items()}
                                                     for k, st in before["layers"].items()}})
        padded = wrapped(tokens[:, N:], mask=right)
        single = alone(tokens[1:, N:][:, right[1]])
    assert (padded[1][right[1]] - single[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", MEMORIES)
def test_left_padding_by_seq_start_pos_stays_out_of_the_memory_and_keeps_rotary_positions(name: str) -> None:
    """x-transformers' seq_start_pos masks the pads as keys but counts them in rotary positions: the memory
    takes the mask as padding and sits just before the first real token."""
    wrapped = _wrapped(name, _net(rotary_pos_emb=True))
    tokens = torch.randint(0, V, (2, 2 * N))
    with torch.no_grad():
        wrapped(tokens[:, :N])
        by_start, by_mask = copy.deepcopy(wrapped), copy.deepcopy(wrapped)
        mask = torch.ones(2, N, dtype=torch.bool)
        mask[1, :3] = False
        a = by_start(tokens[:, N:], seq_start_pos=torch.tensor([0, 3]))
        b = by_mask(tokens[:, N:], mask=mask)
    assert (a[1, 3:] - b[1, 3:]).abs().max().item() <= 1e-5 and (a[0] - b[0]).abs().max().item() <= 1e-5
    assert _state_close(by_start.memory_state(), by_mask.memory_state())


# -- wrap / unwrap -------------------------------------------------------------------------------------------


def _hooks(model: nn.Module) -> list:
    return [
        (n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
         dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks_always_called))
        for n, m in model.named_modules()
    ]  # fmt: skip


def test_unwrap_restores_the_original_object_and_double_wrap_is_refused() -> None:
    net = _net(rotary_pos_emb=True)
    reference = copy.deepcopy(net)
    before = _hooks(net)
    wrapped = mp.wrap(net, "xl", mem_len=N)
    with pytest.raises(ValueError, match="already"):
        mp.wrap(wrapped, "xl")
    with pytest.raises(ValueError, match="already has a memory hook"):
        mp.wrap(net, "xl")
    tokens = torch.randint(0, V, (2, N))
    with torch.no_grad():
        wrapped(tokens)
        assert wrapped.unwrap() is net
        assert _hooks(net) == before
        assert torch.equal(net(tokens), reference(tokens))
        assert torch.equal(mp.wrap(net, "xl", mem_len=N)(tokens), reference(tokens))  # wrappable again


def test_deep_copy_of_a_wrapped_model_is_independent() -> None:
    wrapped = _wrapped("xl", _net(rotary_pos_emb=True))
    segs = torch.randint(0, V, (3, 2, N))
    with torch.no_grad():
        wrapped(segs[0])
        twin = copy.deepcopy(wrapped)  # hooks are objects, so the copy hooks its own blocks and memory
        assert torch.equal(twin(segs[1]), wrapped(segs[1]))
        twin(segs[2])
        assert not _state_close(twin.memory_state(), wrapped.memory_state())
        twin.unwrap()  # removes the twin's hooks only
        assert not torch.allclose(wrapped(segs[2]), twin.model(segs[2]), atol=1e-4)


def test_importing_memory_plugins_imports_no_host_library() -> None:
    """In a fresh interpreter: importing the package and listing the adapters loads no host library."""
    code = (
        "import sys, memory_plugins, memory_plugins.adapters as a; "
        "a.list_adapters(); "
        "print(','.join(m for m in ('x_transformers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"host libraries imported: {done.stdout.strip()}"
