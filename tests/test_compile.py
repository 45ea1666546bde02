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
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._inductor.utils import is_cudagraph_unsafe_fx_node
from functorch.compile import make_boxed_func

import memory_plugins as mp
from memory_plugins.continuous.basis import BasisCache
from memory_plugins.models.reference import ReferenceDecoder

from .conftest import SMALL_OPTIONS, make_generator, needs_kernel_read

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


def _check_and_clear_gradients(eager: nn.Module, twin: nn.Module, where: str) -> None:
    """Every parameter's gradient equal in both models (None counts as zero) within TOL; then cleared."""
    for (pname, pe), pc in zip(eager.named_parameters(), twin.parameters()):
        ge = torch.zeros_like(pe) if pe.grad is None else pe.grad
        gc = torch.zeros_like(pc) if pc.grad is None else pc.grad
        assert (ge - gc).abs().max().item() <= TOL, f"{where}: gradient of {pname}"
    eager.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)


def _recording(graphs: list[torch.fx.GraphModule]) -> Callable[..., Any]:
    """``aot_eager`` that also appends every forward and backward graph it runs to ``graphs``."""
    def keep(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _check_cuda_graph_safe(graphs: list[torch.fx.GraphModule], layers: int, where: str) -> None:
    """What ``mode="reduce-overhead"`` needs of a step's graphs: no control-flow operator (inductor gives
    up CUDA graphs for a whole graph with a ``torch.cond``) and no other node that CUDA graphs cannot
    hold (host syncs such as ``.item()``; inductor's own test) than the library's operators, which it
    runs between captured parts; and every graph that commits the memory copies the state out of the
    graph (``memory_plugins::copy_out``, once per layer), since a replay overwrites the graph's outputs."""
    commits = 0
    for gm in graphs:
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        flow = [str(n.target) for n in calls if isinstance(n.target, torch._ops.HigherOrderOperator)]
        assert not flow, f"{where}: control flow in a compiled graph: {flow}"
        unsafe = {str(n.target) for n in calls if is_cudagraph_unsafe_fx_node(n)}
        foreign = sorted(t for t in unsafe if not t.startswith("memory_plugins."))
        assert not foreign, f"{where}: operators CUDA graphs cannot capture: {foreign}"
        copies = sum(1 for n in calls if str(n.target) == "memory_plugins.copy_out.default")
        assert copies in (0, layers), f"{where}: {copies} state copies in a graph of a {layers}-layer model"
        commits += copies > 0
    assert commits >= 2, f"{where}: {commits} graphs commit the memory (segment 0's and the steady state's expected)"


def _compare(host: str, name: str, backend: str | None = None, masks: list[Tensor | None] | None = None,
             overrides: dict | None = None, graphs: list[torch.fx.GraphModule] | None = None,
             ) -> tuple[list[int], mp.MemoryModel]:
    """Train eager and compiled side by side; assert they agree; return the compiled frames after each
    segment and the compiled model's wrapped module. The default backend is ``aot_eager`` that keeps
    the graphs (in ``graphs`` if given): they are checked as well."""
    eager, twin = _pair(host, name, overrides)
    torch._dynamo.reset()
    counters.clear()
    graphs = [] if graphs is None else graphs
    compiled = torch.compile(twin, backend=backend or _recording(graphs))
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
        _check_and_clear_gradients(eager, twin, where)
        assert _state_diff(eager.memory_state(), twin.memory_state()) <= TOL, f"{where}: memory state"
    if backend is None:
        _check_cuda_graph_safe(graphs, len(twin.memory.names), f"{host}/{name}")
    return frames, twin


def _check_compiles(frames: list[int], where: str) -> None:
    assert frames[-1] <= MAX_COMPILES, f"{where}: {frames[-1]} compiled frames (per segment: {frames})"
    assert frames[-1] == frames[WARM - 1], f"{where}: recompiled after the memory filled (per segment: {frames})"


@pytest.mark.parametrize("name", MEMORIES)
def test_compiled_training_equals_eager_on_the_reference_decoder(name: str) -> None:
    frames, _ = _compare("reference", name)
    _check_compiles(frames, f"reference/{name}")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("host", ["x_transformers", "gpt2"])
@pytest.mark.parametrize("name", MEMORIES)
def test_compiled_training_equals_eager_on_every_host(host: str, name: str) -> None:
    _check_compiles(_compare(host, name)[0], f"{host}/{name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", MEMORIES)
def test_compiled_training_equals_eager_on_llama(name: str) -> None:
    _check_compiles(_compare("llama", name)[0], f"llama/{name}")


LINEAR = {"sticky": False, "stm_len": 0}  # the continuous memory's other update: linear spacing, T B_old


def test_padded_segments_compile_and_equal_eager() -> None:
    """Left padding gives each sample its own count of valid vectors: the continuous update's per-sample
    fit (its fit operator, which the graph calls, takes the model's cached per-count matrices, as eager
    code does), the compaction of every FIFO."""
    masks: list[Tensor | None] = []
    for s in range(SEGMENTS):
        mask = torch.ones(B, N, dtype=torch.bool)  # (b, n)
        mask[0, : (s % 3) * 2] = False  # sample 0: 0, 2 or 4 padded positions
        masks.append(mask)
    for name, overrides in [(name, None) for name in MEMORIES] + [("continuous", LINEAR)]:
        frames, twin = _compare("reference", name, masks=masks, overrides=overrides)
        assert frames[-1] <= MAX_COMPILES + 1, f"{name} {overrides}: {frames}"
        if name == "continuous":  # the counts 4 and 6 of the padded segments were fitted from the cache
            cached = {k for c in twin.memory.shared.values() if isinstance(c, BasisCache) for k in c.matrices}
            assert {k for k in cached if k.endswith(("_4_float32", "_6_float32"))}, (overrides, sorted(cached))
        assert sum(counters["graph_break"].values()) == 0, (name, overrides, dict(counters["graph_break"]))


def test_linear_spacing_compiles_without_graph_breaks() -> None:
    """The continuous memory without sticky memories or STM (its update is B ← T B + G_newᵀ X̃)."""
    _check_compiles(_compare("reference", "continuous", overrides=LINEAR)[0], "reference/continuous linear")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@needs_kernel_read
def test_the_triton_read_is_an_operator_of_the_graph() -> None:
    """``read_impl="triton"``: the read's kernels are called by the compiled graphs, forward and backward,
    without a graph break, as operators that CUDA graphs capture (not split out like the fit)."""
    graphs: list[torch.fx.GraphModule] = []
    frames, _ = _compare("reference", "continuous", overrides={"read_impl": "triton"}, graphs=graphs)
    _check_compiles(frames, "reference/continuous triton")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    calls = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    reads = {str(n.target) for n in calls if str(n.target).startswith("memory_plugins.gauss_read")}
    assert reads == {"memory_plugins.gauss_read.default", "memory_plugins.gauss_read_backward.default"}, reads
    assert not any(is_cudagraph_unsafe_fx_node(n) for n in calls if str(n.target) in reads)


@pytest.mark.slow
def test_inductor_training_equals_eager() -> None:
    """The default backend (C++ codegen on CPU) on the memory with the most code."""
    _check_compiles(_compare("reference", "continuous", backend="inductor")[0], "reference/continuous inductor")


@pytest.mark.parametrize("name", ["xl"])  # the copy is the controller's, the same for every memory (continuous: +19 s)
def test_gradients_cross_segments_through_the_copied_state(name: str) -> None:
    """With ``detach=False`` the committed state keeps its graph: the compiled commit's state copy
    (``memory_plugins::copy_out``) passes the gradient back to the segment that wrote it, as eager does.
    Two segments, one backward over both losses, then the memory is detached."""
    eager, twin = _pair("reference", name, {"detach": False})
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager")
    gen = make_generator(2)
    for window in range(2):
        segments = [torch.randint(2, V, (B, N), generator=gen) for _ in range(2)]  # (b, n) each
        for model, wrapped in ((eager, eager), (compiled, twin)):
            loss = sum(F.cross_entropy(_logits(model(t))[:, :-1].flatten(0, 1), t[:, 1:].flatten())
                       + wrapped.memory_aux_loss() for t in segments)
            loss.backward()
            carried = [t.requires_grad for s in wrapped.memory.states for t in s.values()]
            assert any(carried), f"{name}: the committed state holds no graph (detach=False)"
            wrapped.detach_memory()
        _check_and_clear_gradients(eager, twin, f"{name} window {window}")
