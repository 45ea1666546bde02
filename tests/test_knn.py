"""The kNN retrieval memory (Memorizing Transformers) against a naive float64 implementation.

Notation: b batch, n segment length, S store slots, k retrieved per query, h heads, d head dim, e model dim.

The registry-parametrised suites (test_invariants, test_core, the adapter and compile tests) check its
padding, reset, save/restore, failed-forward and bounded-state invariants; here: the retrieval itself,
the gate, and the mixing before the output projection.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memory_plugins as mp
from memory_plugins import AttentionDims, HostAttention, KNNConfig, KNNMemory
from memory_plugins.models import ReferenceDecoder

from .conftest import DEVICE

B, H, D, E = 3, 2, 4, 8


def _host(dtype: torch.dtype) -> HostAttention:
    """Random content projections q, k, v: (b, n, e) → (b, h, n, d)."""
    wq, wk, wv = (torch.randn(E, H * D, dtype=dtype) for _ in range(3))
    split = lambda t: t.unflatten(-1, (H, D)).transpose(1, 2)  # noqa: E731  (b, h, n, d)
    return HostAttention(AttentionDims(E, H, D), lambda x: split(x @ wq), lambda x: (split(x @ wk), split(x @ wv)))


class NaiveKNN:
    """Per sample a Python list of (normalised key, value) per head, in float64; loops over everything."""

    def __init__(self, host: HostAttention, store_len: int, top_k: int, gate: list[float]) -> None:
        self.host, self.store_len, self.top_k, self.gate = host, store_len, top_k, gate
        self.store: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(B)]  # per sample: (h, d) pairs

    def step(self, x: Tensor, q: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Returns A_mem (b, h, n, d) and g (b, h, n, 1) from the store *before* this segment."""
        n = x.shape[1]
        out, gate = torch.zeros(B, H, n, D, dtype=torch.float64), torch.zeros(B, H, n, 1, dtype=torch.float64)
        for s in range(B):
            for hd in range(H):
                for i in range(n):
                    if not self.store[s]:
                        continue
                    qi = q[s, hd, i].double()
                    qi = qi / qi.norm()
                    scored = sorted(((float(qi @ key[hd]), val[hd]) for key, val in self.store[s]),
                                    key=lambda p: -p[0])[: self.top_k]
                    logits = torch.tensor([c * math.sqrt(D) for c, _ in scored], dtype=torch.float64)
                    w = torch.softmax(logits, dim=0)
                    out[s, hd, i] = sum(wj * v for wj, (_, v) in zip(w, scored))
                    gate[s, hd, i] = min(max(self.gate[hd], 0.0), 1.0)
        k, v = self.host.project_kv(x.double())  # (b, h, n, d)
        for s in range(B):
            for i in range(n):
                if valid[s, i]:
                    key = k[s, :, i] / k[s, :, i].norm(dim=-1, keepdim=True)  # (h, d)
                    self.store[s].append((key, v[s, :, i]))
            self.store[s] = self.store[s][-self.store_len:]
        return out, gate


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_steps_equal_a_naive_float64_retrieval_with_padding_and_eviction(dtype: torch.dtype, tol: float) -> None:
    host64 = _host(torch.float64)
    wq, wk = host64.project_q, host64.project_kv
    host = HostAttention(host64.dims, lambda x: wq(x.double()).to(x.dtype),
                         lambda x: tuple(t.to(x.dtype) for t in wk(x.double())))
    mem = KNNMemory(KNNConfig(store_len=10, top_k=3), host, nn.ModuleDict()).to(dtype)
    with torch.no_grad():
        mem.gate.copy_(torch.tensor([0.7, 1.4], dtype=torch.float64))  # g = 0.7 and g = 1 (clamped)
    naive = NaiveKNN(host64, 10, 3, [0.7, 1.4])
    state = mem.init_state(B, DEVICE, dtype)
    for t in range(5):  # 5 × ≤4 valid tokens through a store of 10: it fills, then evicts
        x = torch.randn(B, 4, E, dtype=torch.float64)
        valid = torch.rand(B, 4) < 0.75
        valid[0] = True
        q = host64.project_q(x)  # (b, h, n, d)
        read, state = mem.step(state, x.to(dtype), q.to(dtype), valid)
        expected, gate = naive.step(x, q, valid)
        if t == 0:
            assert read.head_output is None  # empty store: the host attends as without memory
            continue
        torch.testing.assert_close(read.head_gate.double().expand_as(gate), gate, atol=tol, rtol=0)
        torch.testing.assert_close(read.head_output.double() * (gate > 0), expected, atol=tol, rtol=0)
        for s in range(B):  # the store: each sample's last ≤ 10 valid (k̂, v), right-aligned
            held = state["valid"][s]
            keys = state["keys"][s][held].unflatten(-1, (H, D)).double()  # (S_s, h, d)
            assert keys.shape[0] == len(naive.store[s]) and not held[: held.shape[0] - keys.shape[0]].any()
            torch.testing.assert_close(keys, torch.stack([k for k, _ in naive.store[s]]), atol=tol, rtol=0)
    assert state["keys"].shape[1] == 10 and state["keys"].grad_fn is None


def test_a_segments_own_keys_are_not_in_what_it_reads() -> None:
    """No future leak: the read depends on the store before the segment and the queries, never on x."""
    host = _host(torch.float32)
    mem = KNNMemory(KNNConfig(store_len=12, top_k=2), host, nn.ModuleDict())
    with torch.no_grad():
        mem.gate.fill_(1.0)
    _, state = mem.step(mem.init_state(B, DEVICE, torch.float32), torch.randn(B, 5, E), None, None)
    q = torch.randn(B, H, 5, D)
    read_a, after_a = mem.step(state, torch.randn(B, 5, E), q, None)
    read_b, after_b = mem.step(state, torch.randn(B, 5, E), q, None)
    assert torch.equal(read_a.head_output, read_b.head_output) and torch.equal(read_a.head_gate, read_b.head_gate)
    assert not torch.equal(after_a["keys"], after_b["keys"])  # (each segment was written after its read)


def _decoder_pair(top_k: int, store_len: int) -> tuple[ReferenceDecoder, mp.MemoryModel]:
    base = ReferenceDecoder(vocab_size=29, dim=32, depth=1, heads=4).double().eval()
    return base, mp.wrap(copy.deepcopy(base), "knn", store_len=store_len, top_k=top_k).double().eval()


def test_full_retrieval_with_the_gate_mixes_attention_over_the_whole_store_before_w_o() -> None:
    """top_k = store_len: every query attends over all stored keys; W_O sees (1 − g)·A_local + g·A_mem."""
    base, wrapped = _decoder_pair(top_k=24, store_len=24)
    gate = torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=torch.float64)  # per head; head 0 fully open
    with torch.no_grad():
        wrapped.memory.backends[0].gate.copy_(gate)
    attn, block = wrapped.model.blocks[0].attn, wrapped.model.blocks[0]
    seen: list[Tensor] = []  # what W_O receives: (b, n, h·d)
    handle = attn.to_out.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    history = torch.randint(0, 29, (2, 24))
    wrapped(history)  # fills the store exactly (24 tokens)
    probe = torch.randint(0, 29, (2, 8))
    wrapped(probe)
    with wrapped.memory_disabled():
        wrapped(probe)
    handle.remove()
    live, local = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in seen[1:])  # (b, h, n, d)
    with torch.no_grad():
        k, v = attn.project_kv(block.norm1(wrapped.model.embed(history)))  # (b, h, S, d) content, no rotary
        q = attn.project_q(block.norm1(wrapped.model.embed(probe)))  # (b, h, n, d)
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)  # (b, h, n, S)
        mem_out = torch.softmax(math.sqrt(q.shape[-1]) * cos, dim=-1) @ v  # (b, h, n, d)
        g = gate[None, :, None, None]  # (1, h, 1, 1)
        expected = (1 - g) * local + g * mem_out  # (b, h, n, d)
    torch.testing.assert_close(live, expected, atol=1e-12, rtol=0)
    assert (live[:, 0] - local[:, 0]).abs().max() > 1e-3 and torch.equal(live[:, 2], local[:, 2])


def test_default_init_is_the_base_model_and_the_gate_trains_from_either_side() -> None:
    base, wrapped = _decoder_pair(top_k=4, store_len=16)
    segments = torch.randint(0, 29, (3, 2, 8))
    for seg in segments:
        assert torch.allclose(wrapped(seg), base(seg), atol=1e-6, rtol=0)  # gate closed: exactly the host
    gate = wrapped.memory.backends[0].gate
    for start in (0.0, -0.5):  # at the boundary and deep in the closed region: the gradient still arrives
        with torch.no_grad():
            gate.fill_(start)
        gate.grad = None
        wrapped.train()
        logits = wrapped(segments[0])
        F.cross_entropy(logits.flatten(0, 1), torch.roll(segments[0], -1, 1).flatten()).backward()
        assert gate.grad is not None and gate.grad.abs().min() > 0, start
        wrapped.eval()


def test_options_are_validated_with_the_parameter_and_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"KNNConfig.top_k must be an int in \[1, store_len=8\], got 9"):
        mp.create_config("knn", store_len=8, top_k=9)
    with pytest.raises(ValueError, match="KNNConfig.store_len must be an int >= 1, got 0"):
        mp.create_config("knn", store_len=0)
    with pytest.raises(ValueError, match="KNNConfig.detach must be True, got False"):
        mp.create_config("knn", detach=False)


def test_x_transformers_laser_attention_refuses_a_per_head_memory_result_with_the_reason() -> None:
    xt = pytest.importorskip("x_transformers", reason="x-transformers is an optional host library")
    net = xt.TransformerWrapper(num_tokens=29, max_seq_len=64,
                                attn_layers=xt.Decoder(dim=32, depth=1, heads=2, rotary_pos_emb=True, attn_laser=True))
    wrapped = mp.wrap(net, "knn", store_len=16, top_k=2)
    wrapped(torch.randint(0, 29, (1, 8)))  # empty store: nothing to mix yet
    with pytest.raises(NotImplementedError, match="laser attention.*memory='knn'.*attn_laser=False"):
        wrapped(torch.randint(0, 29, (1, 8)))
    assert wrapped.memory.states[0]["keys"].shape[1] == 8  # the failed forward committed nothing
