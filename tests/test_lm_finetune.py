"""The fine-tuning benchmark (examples/lm/finetune.py, the paper's §4.3): the book split, the HF path of
the shared evaluation, and that a memory-wrapped pretrained model starts from the base model's
predictions. Offline: a tiny GPT-2 from a config, synthetic documents.

Notation: B lanes, n segment length, V vocabulary, L tokens of a document.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import memory_plugins as mp
from examples.lm import finetune as ft
from examples.lm.benchmark import evaluate
from examples.lm.corpus import CorpusError
from examples.lm.data import Document

pytestmark = [pytest.mark.filterwarnings("ignore:DocumentStream.*shorter than one segment"),
              pytest.mark.usefixtures("on_cpu")]  # the pipelines run on the device they are given: the CPU here

V, N, BOS = 64, 8, 0
TINY = replace(ft.PRESETS["quick"], dim=32, depth=2, heads=2, seg_len=N, batch=2, eval_batch=2, steps=3,
               pretrain_steps=3, evals=1, n_basis=16, basis_widths=(0.05, 0.1), bootstrap=100)


def _doc(name: str, length: int, seed: int) -> Document:
    g = torch.Generator().manual_seed(seed)
    return Document(name, torch.randint(1, V, (length,), generator=g, dtype=torch.int32, device="cpu"))  # (L,)


def _gpt2() -> torch.nn.Module:
    return ft.pretrained_model(TINY, V, seed=3).eval()


def test_book_split_is_deterministic_disjoint_and_keeps_book_length() -> None:
    docs = [_doc(f"src/book{i}", 10 + 37 * i, i) for i in range(40)]
    pre, fine = ft.split_books(docs, min_tokens=300)
    pre2, fine2 = ft.split_books(list(reversed(docs)), min_tokens=300)
    assert {d.id for d in pre} == {d.id for d in pre2} and {d.id for d in fine} == {d.id for d in fine2}
    assert not {d.id for d in pre} & {d.id for d in fine}
    assert all(d.tokens.numel() >= 300 for d in fine)
    assert len(pre) >= 10 and len(fine) >= 5  # both halves are used (a hash split, not all-or-nothing)
    with pytest.raises(CorpusError, match="fine-tuning books"):
        ft.split_books(docs, min_tokens=10**6)


def _direct_nll(model: torch.nn.Module, doc: Document) -> Tensor:
    """Per-token NLL (L,) of ``doc`` computed directly: [bos] + tokens cut into windows of n + 1 that
    overlap by one, each window through the bare model with positions 0 … n-1."""
    seq = torch.cat([torch.tensor([BOS]), doc.tokens.long()])  # (L + 1,)
    out = []
    for start in range(0, seq.numel() - 1, N):
        window = seq[start : start + N + 1]  # (k + 1,)
        logits = model(input_ids=window[None, :-1]).logits[0]  # (k, V)
        out.append(F.cross_entropy(logits.double(), window[1:], reduction="none"))  # (k,)
    return torch.cat(out)  # (L,)



@torch.no_grad()
def test_hf_evaluation_equals_a_direct_computation() -> None:
    """The shared evaluation, through its Hugging Face path (attention_mask for the padded last segment
    and idle lanes), gives every token the NLL of a direct pass."""
    model = _gpt2()
    docs = [_doc("a", 29, 1), _doc("b", 13, 2), _doc("c", 5, 3)]
    got = evaluate(model, docs, TINY, torch.device("cpu"), BOS)
    for doc, nll in zip(docs, got):
        want = _direct_nll(model, doc)
        assert nll.shape == want.shape
        assert torch.allclose(nll, want, atol=1e-4, rtol=1e-4), (doc.id, (nll - want).abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("memory", ["continuous", "continuous_sticky"])
def test_wrapped_pretrained_model_starts_from_its_predictions(memory: str) -> None:
    """Fine-tuning with the ∞-former starts exactly where the pretrained model is (W_O = 0), and once
    W_O is non-zero the LTM changes predictions beyond the first segment (so the check can fail)."""
    docs = [_doc("a", 40, 1), _doc("b", 27, 2)]
    base = evaluate(_gpt2(), docs, TINY, torch.device("cpu"), BOS)
    kind, options = ft.memory_options(memory, TINY)
    model = mp.wrap(_gpt2(), kind, **options).eval()
    same = evaluate(model, docs, TINY, torch.device("cpu"), BOS)
    for a, b in zip(base, same):
        assert torch.allclose(a, b, atol=1e-6)
    for backend in model.memory.backends:
        torch.nn.init.normal_(backend.to_out.weight, std=0.3)
    moved = evaluate(model, docs, TINY, torch.device("cpu"), BOS)
    assert torch.allclose(moved[0][:N], base[0][:N], atol=1e-6)  # the first segment has no memory yet
    assert (moved[0][N:] - base[0][N:]).abs().max() > 1e-3


def test_memory_gets_its_own_learning_rate() -> None:
    model = mp.wrap(_gpt2(), "continuous", **ft.memory_options("continuous", TINY)[1])
    groups = ft.param_groups(model, lr=1e-3, memory_lr=5e-3, weight_decay=0.01)
    memory_ids = {id(p) for p in model.memory.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= memory_ids or not ids & memory_ids  # a group is all memory or no memory
        assert g["lr"] == (5e-3 if ids <= memory_ids else 1e-3)
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.slow
def test_fine_tuning_lowers_the_loss_for_every_variant() -> None:
    """A few steps on a repetitive book lower the validation perplexity from the pretrained start."""
    book = Document("src/rep", torch.arange(1, 17, dtype=torch.int32).repeat(30))  # (480,) a 16-token cycle
    preset = replace(TINY, steps=30, lr=3e-3, warmup=3)
    for memory in ("none", "continuous"):
        torch.manual_seed(0)
        kind, options = ft.memory_options(memory, preset)
        model = _gpt2() if kind is None else mp.wrap(_gpt2(), kind, **options)
        before = math.exp(sum(float(x.sum()) for x in evaluate(model, [book], preset, torch.device("cpu"), BOS)) / 480)
        log = ft.train_segments(model, [book], preset.steps, ft.param_groups(model, preset.lr, preset.lr * 5, 0.0),
                                preset, torch.device("cpu"), BOS, seed=0, desc=memory)
        after = math.exp(sum(float(x.sum()) for x in evaluate(model, [book], preset, torch.device("cpu"), BOS)) / 480)
        assert after < 0.5 * before, (memory, before, after, log)
