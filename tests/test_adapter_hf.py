"""Hugging Face adapter: GPT-2 (LM head and bare), Llama, Qwen2, Mistral with every registered memory.

Tiny random configs only (no hub access). Notation: b batch, n segment length, V vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memory_plugins as mp

from .conftest import DEVICE, SMALL_OPTIONS

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memory_plugins.adapters import hf  # noqa: E402

MEMORIES = mp.list_memories()
V, N = 64, 8
KV_MEMORIES = [m for m in MEMORIES if m != "continuous"]  # memories that prepend K/V sources
TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
ROPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **TOKENS)  # fmt: skip



def _gpt2_config(attn: str = "sdpa") -> GPT2Config:
    return GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_implementation=attn, **TOKENS)


HOSTS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: GPT2LMHeadModel(_gpt2_config()),
    "gpt2-eager": lambda: GPT2LMHeadModel(_gpt2_config("eager")),
    "gpt2-bare": lambda: GPT2Model(_gpt2_config()),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**ROPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**ROPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**ROPE)),
}
ROTARY = ["llama", "qwen2", "mistral"]


# GPT-2 + XL / compressive warn about absolute positions; the one test that is about it checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:memory_plugins. this model has absolute position embeddings")


@pytest.fixture(autouse=True, scope="module")
def _quiet() -> Iterator[None]:
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # tiny configs make transformers chatty (token ids, ...)
    yield
    transformers.logging.set_verbosity(level)


def _host(name: str) -> nn.Module:
    return HOSTS[name]().eval()


def _out(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state  # (b, n, V or e)


def _wrapped(name: str, base: nn.Module, **overrides: Any) -> mp.MemoryModel:
    """Wrapped with random memory parameters (every memory path is live, zero-init outputs included)."""
    if name not in SMALL_OPTIONS:
        pytest.fail(f"memory {name!r} is registered but has no SMALL_OPTIONS entry in tests/conftest.py")
    wrapped = mp.wrap(base, name, **{**SMALL_OPTIONS[name], **overrides})
    with torch.no_grad():
        for p in wrapped.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return wrapped.eval()


def _state_close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    a, b = a["layers"], b["layers"]
    return a.keys() == b.keys() and all(
        (a[k] is None) == (b[k] is None)
        and (a[k] is None or (a[k].keys() == b[k].keys() and all(
            a[k][s].shape == b[k][s].shape and torch.allclose(a[k][s].float(), b[k][s].float(), atol=tol)
            for s in a[k])))
        for k in a
    )


def _max(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# -- identity: disabled, empty, and zero-initialised memories ---------------------------------------------------


@pytest.mark.parametrize("name", MEMORIES)
@pytest.mark.parametrize("host", list(HOSTS))
def test_disabled_or_empty_memory_gives_the_base_model(host: str, name: str) -> None:
    base = _host(host)
    reference = copy.deepcopy(base)
    wrapped = _wrapped(name, base)
    segs = torch.randint(2, V, (3, 2, N))
    with torch.no_grad():
        assert _max(_out(wrapped(segs[0])), _out(reference(segs[0]))) <= 1e-6  # first segment: empty memory
        for seg in segs[1:]:
            with wrapped.memory_disabled():
                assert _max(_out(wrapped(seg)), _out(reference(seg))) <= 1e-6
            live = _out(wrapped(seg))
    assert _max(live, _out(reference(segs[2]))) > 1e-4  # with random memory weights the memory is read


@pytest.mark.parametrize("host", list(HOSTS))
def test_zero_initialised_continuous_memory_gives_the_base_model_on_every_segment(host: str) -> None:
    if "continuous" not in MEMORIES:
        pytest.skip("no continuous memory registered")
    base = _host(host)
    reference = copy.deepcopy(base)
    wrapped = mp.wrap(base, "continuous", **{**SMALL_OPTIONS["continuous"], "stm_len": 0}).eval()
    with torch.no_grad():
        for seg in torch.randint(2, V, (4, 2, N)):
            assert _max(_out(wrapped(seg)), _out(reference(seg))) <= 1e-6
    assert wrapped.memory.state_size() > 0  # it was written all along


@pytest.mark.parametrize("host", ["gpt2", "llama"])
def test_output_memory_gets_the_modules_content_queries_and_adds_to_its_output(host: str, probe: str) -> None:
    base = _host(host)
    reference = copy.deepcopy(base)
    wrapped = mp.wrap(base, probe)
    seg = torch.randint(2, V, (2, N))
    modules = dict(reference.named_modules())
    with torch.no_grad():
        got = wrapped(seg).logits
        for name, backend in zip(wrapped.memory.names, wrapped.memory.layers):  # the same, by hand
            modules[name].register_forward_hook(
                lambda mod, args, kw, out, r=backend.r: (out[0] + torch.tanh(kw["hidden_states"] @ r), *out[1:])
                if "hidden_states" in kw else (out[0] + torch.tanh(args[0] @ r), *out[1:]),
                with_kwargs=True,
            )
        expected = reference(seg).logits
        for name, backend in zip(wrapped.memory.names, wrapped.memory.layers):
            x, q = backend.seen[0]
            module = modules[name]
            if host == "gpt2":  # the first third of c_attn, split into heads
                own = module.c_attn(x)[..., : x.shape[-1]]
            else:  # q_proj, before rotary
                own = module.q_proj(x)
            assert torch.allclose(q, own.view(*x.shape[:2], q.shape[1], -1).transpose(1, 2), atol=1e-6)
    assert _max(got, expected) <= 1e-5


# -- what XL means on each architecture ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ROTARY)
def test_xl_covering_the_prefix_equals_one_full_attention_pass(host: str) -> None:
    """Rotary: memory at positions -m … -1 before each segment, so the stream is the full causal pass."""
    base = _host(host)
    tokens = torch.randint(2, V, (2, 3 * N))
    with torch.no_grad():
        full = base(tokens).logits  # (b, 3n, V)
        wrapped = mp.wrap(base, "xl", mem_len=2 * N)
        streamed = torch.cat([wrapped(tokens[:, s : s + N]).logits for s in range(0, 3 * N, N)], dim=1)
    assert _max(streamed, full) <= 1e-5


@pytest.mark.parametrize("host", ["gpt2", "gpt2-eager", "gpt2-bare"])
def test_gpt2_xl_equals_the_base_model_with_positions_restarting_every_segment(host: str) -> None:
    """Absolute positions: segments keep positions 0..n-1 and memory vectors keep their own (documented)."""
    base = _host(host)
    tokens = torch.randint(2, V, (2, 3 * N))
    positions = torch.arange(N).repeat(3)[None]  # (1, 3n): 0..n-1, 0..n-1, 0..n-1
    with torch.no_grad():
        full = _out(base(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)))
        plain = _out(base(tokens))  # ordinary positions 0..3n-1: *not* what the memory gives
        wrapped = mp.wrap(base, "xl", mem_len=2 * N)
        with pytest.warns(UserWarning, match="absolute position embeddings"):
            streamed = torch.cat([_out(wrapped(tokens[:, s : s + N])) for s in range(0, 3 * N, N)], dim=1)
    assert _max(streamed, full) <= 1e-5
    assert _max(streamed[:, N:], plain[:, N:]) > 1e-3


@pytest.mark.parametrize("name", MEMORIES)
@pytest.mark.parametrize("host", ["gpt2", "llama"])
def test_per_sample_reset_is_respected_by_the_attention(host: str, name: str) -> None:
    a = _wrapped(name, _host(host))
    fresh = copy.deepcopy(a)  # the copy has its own memory (hooks are objects that deep-copy)
    segs = torch.randint(2, V, (4, 2, N))
    with torch.no_grad():
        for seg in segs[:3]:
            a(seg)
        kept = copy.deepcopy(a)
        a.reset_memory(torch.tensor([True, False]))
        out, out_kept, out_fresh = (_out(m(segs[3])) for m in (a, kept, fresh))
    assert _max(out[0], out_fresh[0]) <= 1e-5  # sample 0 sees an empty memory
    assert torch.equal(out[1], out_kept[1])  # sample 1 untouched
    assert _max(out[0], out_kept[0]) > 1e-4


# -- generate() ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEMORIES)
@pytest.mark.parametrize("host", ["gpt2", "llama"])
def test_generate_reads_the_memory_at_every_step_with_the_kv_cache(host: str, name: str) -> None:
    wrapped = _wrapped(name, _host(host))
    segs = torch.randint(2, V, (3, 2, N))
    with torch.no_grad():
        for seg in segs[:2]:
            wrapped(seg)
    before = wrapped.memory_state()
    prompt, steps = segs[2][:, :5], 6
    kwargs = dict(max_new_tokens=steps, do_sample=False, use_cache=True, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    out = wrapped.generate(prompt, **kwargs)
    assert _state_close(before, wrapped.memory_state(), tol=0.0)  # generate() reads, never writes
    # Reference: greedy decoding by uncached full forwards with the same (read-only) memory.
    seq, logits = prompt, []
    with torch.no_grad(), wrapped.memory_frozen():
        for _ in range(steps):
            logits.append(wrapped(seq, use_cache=False).logits[:, -1])  # (b, V)
            seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    assert max(_max(a, b) for a, b in zip(out.logits, logits)) <= 1e-5
    with wrapped.memory_disabled():
        plain = wrapped.generate(prompt, **kwargs)
    assert _max(plain.logits[0], out.logits[0]) > 1e-4  # the memory was read from the first step on
    # Asked to (write_memory=True), generate writes prompt + generated tokens afterwards, as one segment.
    twin = copy.deepcopy(wrapped)
    done = wrapped.generate(prompt, write_memory=True, **kwargs)
    with torch.no_grad():
        twin(done.sequences, use_cache=False)
    assert torch.equal(done.sequences, seq)
    assert _state_close(wrapped.memory_state(), twin.memory_state())


def _llama_with_history(name: str) -> tuple[mp.MemoryModel, Tensor, Tensor]:
    """A wrapped Llama whose memory holds one segment, and a prompt (2, 5) whose sample 1 is left-padded
    by 2 (as for batched generation), with its attention mask."""
    wrapped = _wrapped(name, _host("llama"))
    with torch.no_grad():
        wrapped(torch.randint(2, V, (2, N)))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    return wrapped, torch.randint(2, V, (2, 5)), mask


@pytest.mark.parametrize("name", MEMORIES)
def test_generate_writes_what_a_forward_with_the_padding_writes(name: str) -> None:
    """write_memory=True leaves the prompt's padding and what follows a finished row's EOS token out."""
    wrapped, prompt, mask = _llama_with_history(name)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    probe = copy.deepcopy(wrapped).generate(prompt, eos_token_id=None, **kwargs)
    eos = int(probe[0, 6])  # sample 0's second new token ends its row: two pads follow it
    twin = copy.deepcopy(wrapped)
    out = wrapped.generate(prompt, eos_token_id=eos, write_memory=True, **kwargs)
    valid = torch.ones(out.shape, dtype=torch.long)
    valid[:, :5] = mask
    for row in range(2):  # a reference of its own: every generated token up to and with the first EOS
        ends = (out[row, 5:] == eos).nonzero()
        if len(ends):
            valid[row, 5 + int(ends[0]) + 1 :] = 0
    assert valid[0, 7:].sum() == 0  # the test covers a finished row
    with torch.no_grad():
        twin(out, attention_mask=valid)
    assert _state_close(wrapped.memory_state(), twin.memory_state(), tol=0.0)


@pytest.mark.parametrize("name", MEMORIES)
def test_beams_and_several_sequences_read_their_own_samples_memory(name: str) -> None:
    wrapped = _wrapped(name, _host("llama"))
    with torch.no_grad():
        for seg in torch.randint(2, V, (2, 2, N)):
            wrapped(seg)
    before = wrapped.memory_state()
    prompt = torch.randint(2, V, (2, 5))
    kwargs = dict(max_new_tokens=1, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    one = wrapped.generate(prompt, do_sample=False, **kwargs)
    many = wrapped.generate(prompt, do_sample=True, num_return_sequences=3, **kwargs)
    assert _max(many.logits[0], one.logits[0].repeat_interleave(3, dim=0)) <= 1e-5  # rows 3i..3i+2: sample i
    beams = wrapped.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False, eos_token_id=None)
    assert beams.shape == (2, 8)
    assert _state_close(before, wrapped.memory_state(), tol=0.0)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        wrapped.generate(prompt, max_new_tokens=1, do_sample=True, num_return_sequences=2, write_memory=True)


@pytest.mark.parametrize("name", KV_MEMORIES)
def test_a_static_cache_reads_the_memory_at_the_same_positions_as_a_dynamic_one(name: str) -> None:
    wrapped, prompt, mask = _llama_with_history(name)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=1,
                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    dynamic = wrapped.generate(prompt, cache_implementation="dynamic", **kwargs)
    static = wrapped.generate(prompt, cache_implementation="static", **kwargs)
    assert max(_max(a, b) for a, b in zip(dynamic.logits, static.logits)) <= 1e-5
    with wrapped.memory_disabled():
        plain = wrapped.generate(prompt, cache_implementation="static", **kwargs)
    assert _max(plain.logits[-1], static.logits[-1]) > 1e-4  # the memory was read


@pytest.mark.parametrize("name", KV_MEMORIES)
def test_a_sliding_window_cache_keeps_the_memory_where_it_was(name: str) -> None:
    """Once Mistral's cache slides, it hands over fewer keys than tokens seen; the memory's rotary
    positions still count from the segment's first token."""
    base = MistralForCausalLM(MistralConfig(**{**ROPE, "sliding_window": 6})).eval()
    wrapped = _wrapped(name, base)
    with torch.no_grad():
        wrapped(torch.randint(2, V, (2, N)))
    prompt, steps = torch.randint(2, V, (2, 4)), 6
    out = wrapped.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None, output_logits=True,
                           return_dict_in_generate=True)  # fmt: skip
    seq, logits = prompt, []
    with torch.no_grad(), wrapped.memory_frozen():
        for _ in range(steps):  # uncached full forwards: the window applies as in the cache
            logits.append(wrapped(seq, use_cache=False).logits[:, -1])
            seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert max(_max(a, b) for a, b in zip(out.logits, logits)) <= 1e-5


@pytest.mark.parametrize("name", MEMORIES)
def test_an_attention_mask_passed_by_position_keeps_the_padding_out(name: str) -> None:
    by_keyword = _wrapped(name, _host("llama"))
    by_position, unmasked = copy.deepcopy(by_keyword), copy.deepcopy(by_keyword)
    seg = torch.randint(2, V, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        by_keyword(seg, attention_mask=mask)
        by_position(seg, mask)
        unmasked(seg)
    assert _state_close(by_keyword.memory_state(), by_position.memory_state(), tol=0.0)
    assert not _state_close(by_keyword.memory_state(), unmasked.memory_state())


@pytest.mark.parametrize("host", ["gpt2", "llama", "qwen2", "mistral"])
def test_state_dict_loads_back_where_the_base_keys_start_with_model(host: str) -> None:
    """LlamaForCausalLM's own keys start with ``model.`` (``model.embed_tokens.weight``), the level the
    wrapper strips: loading must still put every base key back into the base model (Trainer's resume and
    load_best_model_at_end go through load_state_dict)."""
    source, target = _wrapped("continuous", _host(host)), _wrapped("continuous", _host(host))
    saved = source.state_dict()
    assert any(not torch.equal(saved[k], v) for k, v in target.state_dict().items())
    target.load_state_dict(saved)  # strict: no key missing or unexpected
    assert all(torch.equal(saved[k], v) for k, v in target.state_dict().items())
    fresh = _wrapped("continuous", _host(host))
    result = fresh.load_state_dict(source.model.state_dict(), strict=False)  # the base model's own state dict
    assert not result.unexpected_keys and result.missing_keys and all(k.startswith("memory.") for k in result.missing_keys)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), source.model.state_dict().values()))


# -- training: labels, loss, aux loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEMORIES)
def test_labels_give_the_loss_and_the_aux_loss_is_added_when_asked(name: str) -> None:
    wrapped = _wrapped(name, _host("gpt2")).train()
    wrapped.model.config.resid_pdrop = wrapped.model.config.embd_pdrop = 0.0
    for m in wrapped.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    segs = torch.randint(2, V, (4, 2, N))
    for seg in segs[:3]:
        out = wrapped(seg, labels=seg)
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), seg[:, 1:].reshape(-1))
        assert abs(out.loss.item() - ce.item()) <= 1e-5  # plain Trainer-style loss: the task loss only
    out = wrapped(segs[3], labels=segs[3], memory_aux_loss=True)
    aux = wrapped.memory_aux_loss()
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), segs[3][:, 1:].reshape(-1))
    assert abs(out.loss.item() - (ce + aux).item()) <= 1e-5
    if name not in ("xl", "knn"):  # the memories without an aux loss
        assert aux.item() > 0  # compressive reconstruction / continuous KL are live
    hf.include_memory_aux_loss(wrapped)
    again = wrapped(segs[3], labels=segs[3])
    assert abs(again.loss.item() - (F.cross_entropy(again.logits[:, :-1].reshape(-1, V), segs[3][:, 1:].reshape(-1))
                                    + wrapped.memory_aux_loss()).item()) <= 1e-5  # fmt: skip
    again.loss.backward()
    assert wrapped.model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


# -- save / load -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEMORIES)
@pytest.mark.parametrize("host", ["gpt2", "llama"])
def test_memory_weights_and_state_round_trip_beside_save_pretrained(host: str, name: str, tmp_path: Any) -> None:
    wrapped = _wrapped(name, _host(host))
    segs = torch.randint(2, V, (3, 2, N))
    with torch.no_grad():
        for seg in segs[:2]:
            wrapped(seg)
    hf.save_pretrained(wrapped, tmp_path, save_memory_state=True)
    cls = type(wrapped.model)
    base, info = cls.from_pretrained(tmp_path, output_loading_info=True)  # the base checkpoint is unchanged
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(p.cpu(), q.cpu()) for p, q in zip(base.parameters(), wrapped.model.parameters()))
    loaded = hf.from_pretrained(cls, tmp_path).to(DEVICE).eval()  # from_pretrained loads where HF puts the model
    assert loaded.memory.names == wrapped.memory.names
    for (k, p), (k2, q) in zip(wrapped.memory.state_dict().items(), loaded.memory.state_dict().items()):
        assert k == k2 and torch.equal(p, q)
    assert _state_close(wrapped.memory_state(), loaded.memory_state(), tol=0.0)
    with torch.no_grad():
        assert _max(_out(loaded(segs[2])), _out(wrapped(segs[2]))) <= 1e-6


# -- wrap / unwrap / refusals ------------------------------------------------------------------------------------


def _hooks(model: nn.Module) -> list:
    return [
        (n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
         dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks_always_called), m.__dict__.get("config"))
        for n, m in model.named_modules()
    ]  # fmt: skip


@pytest.mark.parametrize("host", ["gpt2", "llama"])
def test_unwrap_restores_the_original_object_and_double_wrap_is_refused(host: str) -> None:
    base = _host(host)
    reference = copy.deepcopy(base)
    before = _hooks(base)
    keys = list(base.state_dict())
    wrapped = mp.wrap(base, "xl", mem_len=N)
    assert [k for k in wrapped.state_dict() if not k.startswith("memory.")] == keys
    assert base.config._attn_implementation == "sdpa"  # the model's config is untouched
    with pytest.raises(ValueError, match="already"):
        mp.wrap(wrapped, "xl")
    with pytest.raises(ValueError, match="already has a memory hook"):
        mp.wrap(base, "xl")
    seg = torch.randint(2, V, (2, N))
    with torch.no_grad():
        wrapped(seg)
        assert wrapped.unwrap() is base
        assert _hooks(base) == before
        assert torch.equal(_out(base(seg)), _out(reference(seg)))


def test_deep_copy_of_a_wrapped_model_is_independent() -> None:
    wrapped = _wrapped("xl", _host("llama"))
    segs = torch.randint(2, V, (3, 2, N))
    with torch.no_grad():
        wrapped(segs[0])
        twin = copy.deepcopy(wrapped)
        assert torch.equal(_out(twin(segs[1])), _out(wrapped(segs[1])))
        twin(segs[2])  # only the twin advances
        assert not _state_close(twin.memory_state(), wrapped.memory_state())
        twin.unwrap()  # removes the twin's hooks only
        assert _max(_out(wrapped(segs[2])), _out(twin.model(segs[2]))) > 1e-4


def test_unsupported_models_and_attention_kernels_are_refused_with_a_pointer() -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))  # fmt: skip
    with pytest.raises(TypeError, match=r"gpt2.*llama.*MemoryAttention"):
        mp.wrap(bert, "xl")
    llama = _host("llama")
    try:
        llama.set_attn_implementation("flex_attention")
    except (ValueError, ImportError) as err:  # pragma: no cover - depends on the installed torch
        pytest.skip(f"flex attention unavailable: {err}")
    with pytest.raises(ValueError, match="sdpa"):
        mp.wrap(llama, "xl")


def test_gradient_checkpointing_is_refused_in_training() -> None:
    model = _host("gpt2")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    wrapped = mp.wrap(model, "xl", mem_len=N).train()
    seg = torch.randint(2, V, (2, N))
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        wrapped(seg, labels=seg)
    with torch.no_grad():
        wrapped.eval()(seg)  # evaluation does not recompute: fine


def test_gpt2_cross_attention_is_not_a_target() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       add_cross_attention=True, **TOKENS)).eval()  # fmt: skip
    wrapped = mp.wrap(model, "xl", mem_len=N)
    assert wrapped.memory.names == ["transformer.h.0.attn", "transformer.h.1.attn"]
    context = torch.randn(2, 5, 32)
    seg = torch.randint(2, V, (2, N))
    with torch.no_grad():
        first = wrapped(seg, encoder_hidden_states=context).logits
        with wrapped.memory_disabled():
            assert torch.equal(wrapped(seg, encoder_hidden_states=context).logits, first)


@pytest.mark.parametrize("name", MEMORIES)
@pytest.mark.parametrize("host", ["gpt2", "llama"])
def test_the_backbone_called_on_its_own_keeps_the_padding_out_and_writes_as_the_model_does(host: str, name: str) -> None:
    """``wrapped.model.base_model(ids, attention_mask=...)`` (hidden states without the LM head) is a segment
    like a call of the model: the same memory afterwards, padding left out."""
    through_model = _wrapped(name, _host(host))
    through_backbone, unmasked = copy.deepcopy(through_model), copy.deepcopy(through_model)
    segs = torch.randint(2, V, (2, 2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :3] = 0  # left padding in sample 1
    with torch.no_grad():
        for seg in segs:  # the second segment reads what the first wrote
            expected = through_model(seg, attention_mask=mask, output_hidden_states=True).hidden_states[-1]  # (b, n, e)
            hidden = through_backbone.model.base_model(seg, attention_mask=mask).last_hidden_state  # (b, n, e)
            unmasked.model.base_model(seg)
    assert torch.equal(hidden[mask.bool()], expected[mask.bool()])
    assert _state_close(through_backbone.memory_state(), through_model.memory_state(), tol=0.0)
    assert not _state_close(through_backbone.memory_state(), unmasked.memory_state())


@pytest.mark.parametrize("name", MEMORIES)
def test_a_backbone_call_that_fails_changes_no_memory(name: str) -> None:
    """The backbone called on its own is one transaction: a failure in its last layer keeps nothing that its
    first layers staged, and the next call runs as if the failed one never happened."""
    wrapped = _wrapped(name, _host("llama"))
    backbone = wrapped.model.base_model
    seg = torch.randint(2, V, (2, N))
    with torch.no_grad():
        backbone(seg)
        before = copy.deepcopy(wrapped.memory_state())
        handle = backbone.layers[-1].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            backbone(torch.randint(2, V, (2, N)))
        handle.remove()
        assert _state_close(wrapped.memory_state(), before, tol=0.0)
        reference = copy.deepcopy(wrapped)
        backbone(seg)
        reference.model.base_model(seg)
    assert _state_close(wrapped.memory_state(), reference.memory_state(), tol=0.0)
