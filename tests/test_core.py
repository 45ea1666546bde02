"""Core 0.2 guarantees, for every host × registered memory: padding never enters a memory, a segment
commits atomically, resets clear NaN, restored states are checked, generation never writes unasked.

Notation: b batch, n segment length, V vocabulary. Hosts are tiny random models (no hub access).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

import memory_plugins as mp
from memory_plugins.models import ReferenceDecoder

from .conftest import SMALL_OPTIONS, make_generator, states_equal

MEMORIES = mp.list_memories()
V, N = 37, 8


@dataclass
class Host:
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, Tensor, Tensor | None], Tensor]  # (model, tokens (b, n), valid (b, n)) -> (b, n, V)
    attention: Callable[[nn.Module], nn.Module]  # the first targeted attention module of the base model


def _reference() -> Host:
    return Host(
        build=lambda: ReferenceDecoder(vocab_size=V, dim=32, depth=2, heads=4),
        run=lambda model, tokens, valid: model(tokens, mask=valid),
        attention=lambda base: base.blocks[1].attn,
    )


def _xtransformers() -> Host:
    xt = pytest.importorskip("x_transformers")

    def build() -> nn.Module:
        return xt.TransformerWrapper(num_tokens=V, max_seq_len=64, use_abs_pos_emb=False,
                                     attn_layers=xt.Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, rotary_pos_emb=True))

    return Host(build, lambda model, tokens, valid: model(tokens, mask=valid),
                lambda base: base.attn_layers.layers[2][1])


def _hf(kind: str) -> Host:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    tokens = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)

    def build() -> nn.Module:
        if kind == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_implementation="sdpa", **tokens))
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", **tokens))

    def run(model: nn.Module, tok: Tensor, valid: Tensor | None) -> Tensor:
        if valid is None:
            return model(tok, use_cache=False).logits
        kwargs: dict[str, Any] = {"attention_mask": valid.long(), "use_cache": False}
        if kind == "gpt2":  # absolute positions: real tokens count from 0, as without padding
            kwargs["position_ids"] = (valid.long().cumsum(1) - 1).clamp(min=0)
        return model(tok, **kwargs).logits

    def attention(base: nn.Module) -> nn.Module:
        return base.transformer.h[1].attn if kind == "gpt2" else base.model.layers[1].self_attn

    return Host(build, run, attention)


HOSTS: dict[str, Callable[[], Host]] = {
    "reference": _reference, "x_transformers": _xtransformers, "hf-gpt2": lambda: _hf("gpt2"),
    "hf-llama": lambda: _hf("llama"),
}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # absolute-position warnings of GPT-2


def _wrapped(memory: str, host: Host, seed: int = 0) -> mp.MemoryModel:
    torch.manual_seed(seed)
    wrapped = mp.wrap(host.build(), memory, **SMALL_OPTIONS[memory])
    with torch.no_grad():  # random memory parameters: every memory path is live
        for p in wrapped.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return wrapped.eval()


def _padded_stream(side: str, segments: int, seed: int) -> tuple[Tensor, Tensor]:
    """Tokens (2, S·n) and valid (2, S·n): sample 0 unpadded, sample 1 with 0–5 pads per segment on ``side``
    (one segment wholly padded)."""
    gen = make_generator(seed)  # on the test device, where the default device puts every tensor
    tokens = torch.randint(2, V, (2, segments * N), generator=gen)
    valid = torch.ones(2, segments * N, dtype=torch.bool)
    for s in range(segments):
        pads = N if s == 2 else int(torch.randint(0, 6, (1,), generator=gen))
        cut = slice(s * N, s * N + pads) if side == "left" else slice((s + 1) * N - pads, (s + 1) * N)
        valid[1, cut] = False
    return tokens, valid


def _segments(x: Tensor) -> list[Tensor]:
    return [x[:, s : s + N] for s in range(0, x.shape[1], N)]


# -- padding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("host_name", list(HOSTS))
def test_padding_never_enters_a_memory(host_name: str, memory: str, side: str) -> None:
    """The ids at padded positions change no output at a real position, in that segment or any later one;
    and the padded batch equals each sample streamed alone without its padding."""
    host = HOSTS[host_name]()
    model = _wrapped(memory, host)
    other = copy.deepcopy(model)
    tokens, valid = _padded_stream(side, 6, seed=1)
    noise = torch.randint(2, V, tokens.shape)
    outs = []
    with torch.no_grad():
        for tok, val, nz in zip(_segments(tokens), _segments(valid), _segments(noise)):
            a = host.run(model, tok, val)
            b = host.run(other, torch.where(val, tok, nz), val)  # other ids at the padded positions only
            assert (a - b)[val].abs().max().item() <= 1e-6 if val.any() else True
            outs.append(a)
        for i in range(2):  # each sample alone, its real tokens only, in segments of whatever length is left
            alone = _wrapped(memory, host)
            for tok, val, out in zip(_segments(tokens), _segments(valid), outs):
                real = tok[i][val[i]][None]  # (1, k)
                if real.shape[1] == 0:
                    continue
                ref = host.run(alone, real, None)  # (1, k, V)
                torch.testing.assert_close(out[i][val[i]], ref[0], atol=2e-5, rtol=1e-4)


# -- transactions ------------------------------------------------------------------------------------
class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("host_name", list(HOSTS))
def test_a_failed_forward_changes_nothing_and_a_retry_equals_a_clean_run(host_name: str, memory: str,
                                                                      error: type[BaseException]) -> None:
    host = HOSTS[host_name]()
    model = _wrapped(memory, host)
    clean = copy.deepcopy(model)
    segs = _segments(torch.randint(2, V, (2, 5 * N)))
    with torch.no_grad():
        for seg in segs[:3]:
            assert torch.equal(host.run(model, seg, None), host.run(clean, seg, None))
        before = model.memory_state()

        def boom(*args: Any, **kwargs: Any) -> None:
            raise error("interrupted inside the second memory layer")

        handle = host.attention(model.model).register_forward_pre_hook(boom)  # after layer 0 has stepped
        with pytest.raises(error):
            host.run(model, segs[3], None)
        handle.remove()
        assert states_equal(before, model.memory_state())
        assert not model.memory.reads and not model.memory.staged  # no stale read survives the failure
        for seg in segs[3:]:  # the retry and what follows equal the run that never failed
            assert torch.equal(host.run(model, seg, None), host.run(clean, seg, None))


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("memory", MEMORIES)
def test_a_hook_put_on_the_base_model_after_wrapping_that_fails_changes_nothing(memory: str,
                                                                               error: type[BaseException]) -> None:
    """The segment commits when the wrapper's call returns, not in a hook of the base model that runs
    before hooks put there later."""
    host = _reference()
    model = _wrapped(memory, host)
    clean = copy.deepcopy(model)
    segs = _segments(torch.randint(2, V, (2, 4 * N)))
    with torch.no_grad():
        for seg in segs[:2]:
            model(seg), clean(seg)
        before = model.memory_state()

        def boom(*args: Any) -> None:
            raise error("interrupted after the base model's forward returned")

        handle = model.model.register_forward_hook(boom)
        with pytest.raises(error):
            model(segs[2])
        handle.remove()
        assert states_equal(before, model.memory_state())
        for seg in segs[2:]:  # the retry equals the run that never failed
            assert torch.equal(model(seg), clean(seg))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_of_memory_layers_is_refused_and_changes_nothing(reentrant: bool) -> None:
    """Recomputing a block in backward would run its memory layer again, after the segment has advanced
    the memory: a clear error, raised before anything is read or written."""
    checkpoint = pytest.importorskip("torch.utils.checkpoint").checkpoint
    model = _wrapped("xl", _reference()).train()
    for block in model.model.blocks:
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=reentrant, **k))(block.forward)
    seg = torch.randint(2, V, (2, N))
    out = model(seg)
    after_forward = model.memory_state()
    with pytest.raises(NotImplementedError, match="activation checkpointing"):
        out.float().pow(2).mean().backward()
    assert states_equal(after_forward, model.memory_state())


@pytest.mark.parametrize("memory", MEMORIES)
def test_an_empty_segment_is_the_base_models_and_leaves_the_stream_as_it_was(memory: str) -> None:
    host = _reference()  # (transformers' own mask code refuses a length-0 input)
    model = _wrapped(memory, host).train()  # training: the aux losses run too
    clean = copy.deepcopy(model)
    segs = _segments(torch.randint(2, V, (2, 3 * N)))
    with torch.no_grad():
        model(segs[0]), clean(segs[0])
        before = model.memory_state()
        empty = host.run(model, segs[1][:, :0], None)
        assert empty.shape[:2] == (2, 0)
        assert states_equal(before, model.memory_state())
        for seg in segs[1:]:
            assert torch.equal(host.run(model, seg, None), host.run(clean, seg, None))


# -- state hygiene -----------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", MEMORIES)
def test_reset_clears_nan_and_a_reset_sample_equals_a_fresh_stream(memory: str) -> None:
    host = _reference()
    model = _wrapped(memory, host)
    segs = _segments(torch.randint(2, V, (3, 4 * N)))
    with torch.no_grad():
        for seg in segs[:2]:
            model(seg)
        for state in model.memory.states:  # poison sample 1 everywhere
            for key, value in state.items():
                if value.is_floating_point():
                    value[1] = float("nan")
        model.reset_memory(torch.tensor([False, True, False]))
        fresh = _wrapped(memory, host)
        for seg in segs[2:]:
            out = model(seg)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[1], fresh(seg[1:2])[0], atol=1e-5, rtol=1e-4)


def _filled(memory: str, **options: Any) -> mp.MemoryModel:
    torch.manual_seed(0)
    model = mp.wrap(ReferenceDecoder(vocab_size=V, dim=32, depth=2, heads=4), memory,
                    **{**SMALL_OPTIONS[memory], **options}).eval()
    with torch.no_grad():
        for seg in _segments(torch.randint(2, V, (2, 3 * N))):
            model(seg)
    return model


@pytest.mark.parametrize("memory", MEMORIES)
def test_set_memory_state_refuses_what_does_not_fit_and_names_it(memory: str) -> None:
    model = _filled(memory)
    good = model.memory_state()
    layer = next(iter(good["layers"]))
    key = next(iter(good["layers"][layer]))

    def edited(fn: Callable[[dict], None]) -> dict:
        state = copy.deepcopy(good)
        fn(state)
        return state

    cases = {
        "missing key": (edited(lambda s: s["layers"][layer].pop(key)), rf"layer '{layer}'.*keys"),
        "wrong shape": (edited(lambda s: s["layers"][layer].__setitem__(key, torch.zeros(2, 3, 5, 7, 1))),
                        rf"layer '{layer}', key '{key}'"),
        "batch of one tensor": (edited(lambda s: s["layers"][layer].__setitem__(key, s["layers"][layer][key][:1])),
                                rf"layer '{layer}'"),
        "NaN": (edited(lambda s: [v.fill_(float("nan")) for v in s["layers"][layer].values() if v.is_floating_point()
                                  and v.numel()]), "NaN"),
        "missing layer": (edited(lambda s: s["layers"].pop(layer)), "do not match"),
        "other memory": (edited(lambda s: s.__setitem__("memory", "other")), "is of memory 'other'"),
        "other options": (edited(lambda s: s.__setitem__("fingerprint", "0" * 16)), "other options"),
    }
    before = model.memory_state()
    for name, (state, message) in cases.items():
        if name == "NaN" and not any(v.is_floating_point() and v.numel() for v in good["layers"][layer].values()):
            continue
        with pytest.raises(ValueError, match=message):
            model.set_memory_state(state)
        assert states_equal(before, model.memory_state()), name  # a refused state changes nothing
    model.set_memory_state(edited(lambda s: s.__setitem__("fingerprint", "0" * 16)), strict=False)


def test_a_state_of_other_options_is_refused_with_the_reason() -> None:
    small, large = _filled("continuous", n_basis=16), _filled("continuous", n_basis=32)
    with pytest.raises(ValueError, match="other options"):
        large.set_memory_state(small.memory_state())
    with pytest.raises(ValueError, match="expected size 32 in dim 1"):
        large.set_memory_state(small.memory_state(), strict=False)
    with pytest.raises(ValueError, match="is of memory 'continuous'"):
        _filled("xl").set_memory_state(small.memory_state())


@pytest.mark.parametrize("memory, option, value", [
    ("continuous", "kl_weight", 1e-2), ("continuous", "read_impl", "dense"), ("continuous", "kl_reduction", "mean"),
    ("compressive", "recon_weight", 0.5), ("knn", "top_k", 1)])
def test_a_state_resumes_strictly_under_an_option_that_cannot_change_it(memory: str, option: str, value: Any) -> None:
    """A loss weight or the read's implementation does not make a stream another one: the state loads with
    strict=True, and so does one saved before such options left the fingerprint (its older hash)."""
    from memory_plugins.controller import config_fingerprint

    saved = _filled(memory).memory_state()
    other = _filled(memory, **{option: value})
    assert other.memory.fingerprint == saved["fingerprint"]
    other.set_memory_state(saved)  # strict
    older = config_fingerprint(_filled(memory).memory.config, legacy=True)  # what the saving model wrote before
    assert older != saved["fingerprint"]
    _filled(memory).set_memory_state({**saved, "fingerprint": older})
    with pytest.raises(ValueError, match="other options"):  # the older hash counted the option: another value is refused
        other.set_memory_state({**saved, "fingerprint": older})


@pytest.mark.parametrize("memory", MEMORIES)
def test_a_float32_state_restored_into_a_bf16_model_works(memory: str) -> None:
    model = _filled(memory)
    state = model.memory_state()
    seg = torch.randint(2, V, (2, N))
    with torch.no_grad():
        expected = model(seg)
        low = copy.deepcopy(model).to(torch.bfloat16)
        low.reset_memory()
        low.set_memory_state(state)
        out = low(seg)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - expected).abs().max() <= 0.1 * expected.abs().max()


def test_a_0_1_read_write_backend_still_works_with_a_deprecation_warning() -> None:
    from dataclasses import dataclass as _dc
    from typing import ClassVar

    @_dc
    class LegacyConfig(mp.MemoryConfig):
        name: ClassVar[str] = "_legacy"

    class Legacy(nn.Module):
        def __init__(self, config: Any, dims: Any, shared: nn.ModuleDict) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
            return {"last": torch.zeros(batch_size, 1, 32, device=device, dtype=dtype)}

        def read(self, state: dict, x: Tensor, q: Tensor | None) -> mp.MemoryRead:
            return mp.MemoryRead(output=self.scale * state["last"].expand_as(x))

        def write(self, state: dict, x: Tensor, host: Any, read: Any) -> tuple[dict, None]:
            return {"last": x[:, -1:].detach()}, None

        def reset(self, state: dict, mask: Tensor) -> dict:
            return {"last": torch.where(mask[:, None, None], 0.0, state["last"])}

    mp.register_memory("_legacy", LegacyConfig, Legacy)
    try:
        plain = ReferenceDecoder(vocab_size=V, dim=32, depth=2, heads=4)
        base = copy.deepcopy(plain)
        with pytest.warns(DeprecationWarning, match="read\\(\\)/write\\(\\)"):
            model = mp.wrap(plain, "_legacy")
        seg = torch.randint(2, V, (2, N))
        with torch.no_grad():
            first = model(seg)
            with model.memory_disabled():
                assert torch.equal(first, base(seg))  # nothing written yet: the base model
            assert not torch.equal(model(seg), base(seg))  # the first segment was written and is read
    finally:
        mp.unregister_memory("_legacy")


# -- generation and saving ---------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_hf_generate_never_writes_the_memory_unless_asked(use_cache: bool) -> None:
    host = _hf("gpt2")
    model = _wrapped("xl", host)
    with torch.no_grad():
        model(torch.randint(2, V, (2, N)))
    before = model.memory_state()
    prompt = torch.randint(2, V, (2, 4))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=1)
    assert states_equal(before, model.memory_state())
    model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=1, write_memory=True)
    held = model.memory_state()["layers"]["transformer.h.0.attn"]["mem"].shape[1]
    assert held == min(N + out.shape[1], SMALL_OPTIONS["xl"]["mem_len"])  # the sequence, written once


@pytest.mark.parametrize("memory", MEMORIES)
def test_segment_wise_generation_restores_the_memory_whatever_it_holds(memory: str) -> None:
    """generation.generate writes the prompt's complete segments and puts the memory back afterwards, also
    a memory that took in a NaN (which set_memory_state refuses); the other samples are unaffected."""
    from memory_plugins.generation import generate

    model = _wrapped(memory, _reference())
    with torch.no_grad():
        model(torch.randint(2, V, (2, N)))
    for state in model.memory.states:  # sample 1's memory took in a NaN
        for value in state.values():
            if value.is_floating_point() and value.shape[1:].numel():
                value[1].view(-1)[0] = float("nan")
    before = model.memory_state()
    clean = _wrapped(memory, _reference())
    clean.set_memory_state({**before, "layers": {k: {n: t[:1] for n, t in s.items()}
                                                 for k, s in before["layers"].items()}})  # sample 0 alone
    prompt = torch.randint(2, V, (2, N + 3))
    out = generate(model, prompt, 2 * N, segment_len=N)
    after = model.memory_state()
    for layer, state in before["layers"].items():
        for key, value in state.items():
            torch.testing.assert_close(after["layers"][layer][key], value, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out[:1], generate(clean, prompt[:1], 2 * N, segment_len=N))


@pytest.mark.parametrize("host_name", ["reference", "hf-gpt2"])
def test_save_pretrained_on_the_wrapped_model_includes_the_memory(host_name: str, tmp_path: Any) -> None:
    host = HOSTS[host_name]()
    model = _wrapped("continuous", host)
    seg = torch.randint(2, V, (2, N))
    with torch.no_grad():
        host.run(model, seg, None)
    model.save_pretrained(tmp_path, save_memory_state=True)
    base = host.build()
    if host_name == "reference":
        base.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    else:
        base = type(base).from_pretrained(tmp_path)
    loaded = mp.MemoryModel.from_pretrained(base.eval(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(host.run(loaded, seg, None), host.run(model, seg, None))


_INNER: dict[str, Callable[[nn.Module], nn.Module]] = {  # a module that runs every memory layer, callable alone
    "x_transformers": lambda base: base.attn_layers,
    "hf-gpt2": lambda base: base.base_model,
    "hf-llama": lambda base: base.base_model,
}


def _inner_input(host_name: str, base: nn.Module, tokens: Tensor) -> Tensor:
    """What the inner module takes: token embeddings (x-transformers' layers), else the ids (HF backbones)."""
    return base.token_emb(tokens) if host_name == "x_transformers" else tokens  # (b, n, e) or (b, n)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("host_name", list(_INNER))
def test_an_inner_call_on_its_own_is_one_transaction(host_name: str, memory: str) -> None:
    """The layer stack / backbone called without the model around it (hidden states for one's own head):
    a failure in its second memory layer keeps nothing its first one staged; a call that returns commits
    every layer; and the aux losses are those of the last call only."""
    host = HOSTS[host_name]()
    model = _wrapped(memory, host).train()
    inner = _INNER[host_name](model.model)
    segs = _segments(torch.randint(2, V, (2, 3 * N)))
    inner(_inner_input(host_name, model.model, segs[0]))
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # the same dropout draws (GPT-2 trains with dropout) in both calls
    inner(_inner_input(host_name, model.model, segs[1]))
    torch.manual_seed(1)
    host.run(reference, segs[1], None)  # the model around it, on the same segment
    torch.testing.assert_close(model.memory_aux_loss(), reference.memory_aux_loss())  # replaced, not piled up
    before = copy.deepcopy(model.memory_state())
    assert all(state is not None for state in before["layers"].values())  # every layer was written

    def boom(*args: Any, **kwargs: Any) -> None:
        raise _Boom("inside the second memory layer")

    handle = host.attention(model.model).register_forward_pre_hook(boom)
    with pytest.raises(_Boom):
        inner(_inner_input(host_name, model.model, segs[2]))
    handle.remove()
    assert states_equal(before, model.memory_state())
    assert not model.memory.in_forward and not model.memory.staged
