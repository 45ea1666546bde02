"""torch.compile of wrapped models in training mode: equal to eager, and a bounded number of compiles.

Every registered memory on every host (reference decoder, x-transformers, HF GPT-2; Llama marked slow),
over enough segments that each memory fills, evicts, compresses or updates its long-term memory. The
tests compile with the ``aot_eager`` backend (Dynamo's capture and AOT autograd, which is where
compiled training breaks; no C++ codegen, so they stay fast on 2 CPU cores); one slow test runs
inductor. Notation: b batch, n segment length, V vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

import memory_plugins as mp
from memory_plugins.models.reference import ReferenceDecoder

from .conftest import SMALL_OPTIONS, make_generator

MEMORIES = mp.list_memories()
V, B, N = 48, 2, 8
SEGMENTS = 6  # SMALL_OPTIONS fill in ≤ 3 segments of N; then evict, compress and update the LTM
WARM = 3  # segments after which no memory may compile again (fixed state shapes)
MAX_COMPILES = 4  # compiled frames per model over the whole run (first segments' shapes, one-off buffer builds)
TOL = 1e-4


def _reference() -> nn.Module:
    return ReferenceDecoder(vocab_size=V, dim=32, depth=1, heads=2)


def _x_transformers() -> nn.Module:
    xt = pytest.importorskip("x_transformers")
    return xt.TransformerWrapper(num_tokens=V, max_seq_len=4 * N, use_abs_pos_emb=False, attn_layers=xt.Decoder(
        dim=32, depth=1, heads=2, attn_dim_head=16, rotary_pos_emb=True, verbose=False))


def _hf(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        transformers.logging.set_verbosity_error()
        tokens = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
        if kind == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=V, n_positions=4 * N, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, **tokens))  # no dropout: training mode, eager and compiled must agree
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4 * N, **tokens))
    return make


HOSTS: dict[str, Callable[[], nn.Module]] = {
    "reference": _reference, "x_transformers": _x_transformers, "gpt2": _hf("gpt2"), "llama": _hf("llama")}


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out  # (b, n, V)


def _pair(host: str, name: str, overrides: dict | None = None) -> tuple[mp.MemoryModel, mp.MemoryModel]:
    """An eager wrapped model (random memory parameters: every path live) and an identical copy."""
    if name not in SMALL_OPTIONS:
        pytest.fail(f"memory {name!r} is registered but has no SMALL_OPTIONS entry in tests/conftest.py")
    torch.manual_seed(0)
    eager = mp.wrap(HOSTS[host](), name, **{**SMALL_OPTIONS[name], **(overrides or {})})
    with torch.no_grad():
        for p in eager.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    eager.train()
    return eager, copy.deepcopy(eager)


def _pad(x: Tensor, length: int) -> Tensor:
    """``x`` (b, m, …) with ``length - m`` zero (False) slots prepended along dim 1."""
    return torch.cat([x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:]), x], dim=1)


def _state_diff(a: dict, b: dict) -> float:
    """Largest difference between two memory states. A FIFO may be held at its capacity (compiled) or at
    its fill (eager): the shorter one is compared left-padded with invalid zero slots (the same FIFO)."""
    worst = 0.0
    for layer, sa in a["layers"].items():
        sb = b["layers"][layer]
        assert set(sa) == set(sb), layer
        for key in sa:
            x, y = sa[key], sb[key]
            if x.dim() >= 2 and x.shape[1] != y.shape[1]:
                length = max(x.shape[1], y.shape[1])
                x, y = _pad(x, length), _pad(y, length)
            assert x.shape == y.shape, (layer, key, x.shape, y.shape)
            worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
    return worst


def _segment(model: nn.Module, wrapped: mp.MemoryModel, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """One training segment: logits and loss (next-token CE + the memory's aux loss), backward done."""
    out = _logits(model(tokens) if mask is None else model(tokens, mask=mask))  # (b, n, V)
    loss = F.cross_entropy(out[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()) + wrapped.memory_aux_loss()
    loss.backward()
    return out.detach(), loss.detach()


def _compare(host: str, name: str, backend: str = "aot_eager", masks: list[Tensor | None] | None = None,
             overrides: dict | None = None) -> list[int]:
    """Train eager and compiled side by side; assert they agree; return the compiled frames after each segment."""
    eager, twin = _pair(host, name, overrides)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(twin, backend=backend)
    frames = []
    gen = make_generator(1)
    for s in range(SEGMENTS):
        tokens = torch.randint(2, V, (B, N), generator=gen)  # (b, n)
        mask = masks[s] if masks else None
        out_e, loss_e = _segment(eager, eager, tokens, mask)
        out_c, loss_c = _segment(compiled, twin, tokens, mask)
        frames.append(counters["frames"]["ok"])
        where = f"{host}/{name} segment {s}"
        assert (out_e - out_c).abs().max().item() <= TOL, where
        assert abs(loss_e.item() - loss_c.item()) <= TOL, where
        for (pname, pe), pc in zip(eager.named_parameters(), twin.parameters()):
            ge = torch.zeros_like(pe) if pe.grad is None else pe.grad
            gc = torch.zeros_like(pc) if pc.grad is None else pc.grad
            assert (ge - gc).abs().max().item() <= TOL, f"{where}: gradient of {pname}"
        eager.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        assert _state_diff(eager.memory_state(), twin.memory_state()) <= TOL, f"{where}: memory state"
    return frames


def _check_compiles(frames: list[int], where: str) -> None:
    assert frames[-1] <= MAX_COMPILES, f"{where}: {frames[-1]} compiled frames (per segment: {frames})"
    assert frames[-1] == frames[WARM - 1], f"{where}: recompiled after the memory filled (per segment: {frames})"


@pytest.mark.parametrize("name", MEMORIES)
def test_compiled_training_equals_eager_on_the_reference_decoder(name: str) -> None:
    frames = _compare("reference", name)
    _check_compiles(frames, f"reference/{name}")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("host", ["x_transformers", "gpt2"])
@pytest.mark.parametrize("name", MEMORIES)
def test_compiled_training_equals_eager_on_every_host(host: str, name: str) -> None:
    _check_compiles(_compare(host, name), f"{host}/{name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", MEMORIES)
def test_compiled_training_equals_eager_on_llama(name: str) -> None:
    _check_compiles(_compare("llama", name), f"llama/{name}")


LINEAR = {"sticky": False, "stm_len": 0}  # the continuous memory's other update: linear spacing, T B_old


def test_padded_segments_compile_and_equal_eager() -> None:
    """Left padding gives each sample its own count of valid vectors: the continuous update's per-sample
    fit (the false branch of its torch.cond, solved in the graph), the compaction of every FIFO."""
    masks: list[Tensor | None] = []
    for s in range(SEGMENTS):
        mask = torch.ones(B, N, dtype=torch.bool)  # (b, n)
        mask[0, : (s % 3) * 2] = False  # sample 0: 0, 2 or 4 padded positions
        masks.append(mask)
    for name, overrides in [(name, None) for name in MEMORIES] + [("continuous", LINEAR)]:
        frames = _compare("reference", name, masks=masks, overrides=overrides)
        assert frames[-1] <= MAX_COMPILES + 1, f"{name} {overrides}: {frames}"
        assert sum(counters["graph_break"].values()) == 0, (name, overrides, dict(counters["graph_break"]))


def test_linear_spacing_compiles_without_graph_breaks() -> None:
    """The continuous memory without sticky memories or STM (its update is B ← T B + G_newᵀ X̃)."""
    _check_compiles(_compare("reference", "continuous", overrides=LINEAR), "reference/continuous linear")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.slow
def test_inductor_training_equals_eager() -> None:
    """The default backend (C++ codegen on CPU) on the memory with the most code."""
    _check_compiles(_compare("reference", "continuous", backend="inductor"), "reference/continuous inductor")
