"""The long-document LM benchmark (examples/lm/benchmark.py): document resets, exact perplexity,
position buckets, bad input, and (slow) a whole tiny run with resume. Offline: tiny models, synthetic
documents, corpora built in tmp_path.

Notation: B lanes, n segment length, V vocabulary, L tokens of a document.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

import memory_plugins as mp
from examples.lm import benchmark, metrics
from examples.lm.benchmark import ALL_MEMORIES, Preset, build, evaluate, forward_segment
from examples.lm.data import Document, DocumentStream

pytestmark = [pytest.mark.filterwarnings("ignore:DocumentStream.*shorter than one segment"),
              pytest.mark.usefixtures("on_cpu")]  # the pipelines run on the device they are given: the CPU here

V = 64  # vocabulary of the tiny models
BOS = 0
TINY = Preset(memories=ALL_MEMORIES, dim=32, depth=2, heads=2, seg_len=8, batch=2, steps=4, eval_batch=2,
              n_basis=16, basis_widths=(0.05, 0.1), evals=1, valid_docs=2, valid_max_tokens=64, bootstrap=200)


def _doc(name: str, length: int, seed: int) -> Document:
    g = torch.Generator().manual_seed(seed)
    return Document(name, torch.randint(1, V, (length,), generator=g, dtype=torch.int32, device="cpu"))  # (L,)


def _model(memory: str) -> nn.Module:
    torch.manual_seed(1)
    model = build(TINY, memory, V)
    if isinstance(model, mp.MemoryModel):
        for backend in model.memory.backends:
            if hasattr(backend, "to_out"):  # the ∞-former's W_O starts at zero: make its LTM matter here
                nn.init.normal_(backend.to_out.weight, std=0.3)
            if isinstance(getattr(backend, "gate", None), nn.Parameter):  # the kNN gate starts closed: open it
                nn.init.constant_(backend.gate, 0.5)
    return model.eval()


@torch.no_grad()
def _stream_logits(model: nn.Module, docs: list[Document], batch: int, *, reset: bool = True) -> dict[str, Tensor]:
    """Every document's logits (L, V) at its real targets, streamed as the benchmark streams them
    (``forward_segment``); ``reset=False`` disables the per-lane reset (a leaking pipeline)."""
    if isinstance(model, mp.MemoryModel):
        model.reset_memory()
        if not reset:
            model.reset_memory = lambda mask=None: None  # instance attribute: forward_segment's resets do nothing
    out: dict[str, list[Tensor]] = {d.id: [] for d in docs}
    try:
        for seg in DocumentStream(docs, batch, TINY.seg_len, bos=BOS):
            logits = forward_segment(model, seg)  # (B, n, V)
            for b, d in enumerate(seg.doc_index.tolist()):
                if d >= 0:
                    out[docs[d].id].append(logits[b, seg.valid[b]])  # (k, V)
    finally:
        model.__dict__.pop("reset_memory", None)
    return {k: torch.cat(v) for k, v in out.items()}


# -- (1) a lane's memory is reset exactly at document boundaries --------------------------------------


@pytest.mark.parametrize("memory", ALL_MEMORIES)
def test_memory_is_reset_exactly_at_document_boundaries(memory: str) -> None:
    """Each document's logits, read after other documents in its lane (batch 1 and 2, boundaries at
    different times in the two lanes, padding at each document's end), equal the same document
    streamed alone from a fresh memory; without the reset they differ (so a leak is caught)."""
    model = _model(memory)
    docs = [_doc("a", 45, 1), _doc("b", 29, 2), _doc("c", 21, 3), _doc("d", 36, 4), _doc("e", 5, 5)]
    alone = {d.id: _stream_logits(model, [d], 1)[d.id] for d in docs}
    for batch in (1, 2):
        together = _stream_logits(model, docs, batch)
        for d in docs:
            assert together[d.id].shape == (d.tokens.numel(), V)
            err = (together[d.id] - alone[d.id]).abs().max().item()
            assert err <= 1e-6, f"{memory}, batch {batch}: document {d.id} differs from a fresh stream by {err:.2e}"
    if memory != "none":
        leaked = _stream_logits(model, docs, 1, reset=False)
        assert (leaked["b"] - alone["b"]).abs().max().item() > 1e-3, "the check cannot see a leak"


# -- (2) the pipeline's perplexity is the plain cross-entropy over every real token --------------------


def _direct_nll(model: nn.Module, docs: list[Document], n: int) -> tuple[float, int]:
    """Σ NLL and token count of every document token, each document alone, cut into segments of n
    targets, every segment run on its own (a memory-free model), plain cross-entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            seq = torch.cat([torch.tensor([BOS]), d.tokens.long()])  # (L + 1,)
            for s in range(0, d.tokens.numel(), n):
                inp, tgt = seq[s : s + n], seq[s + 1 : s + n + 1]  # (k,), (k,)
                logits = model(inp[None])[0, : tgt.numel()]  # (k, V)
                total += torch.nn.functional.cross_entropy(logits.double(), tgt, reduction="sum").item()
                count += tgt.numel()
    return total, count


@pytest.mark.parametrize("memory", ["none", "xl"])
def test_pipeline_perplexity_equals_direct_cross_entropy(memory: str) -> None:
    docs = [_doc("a", 45, 1), _doc("b", 3, 2), _doc("c", 29, 3)]
    model = _model(memory)
    base = model.unwrap() if isinstance(model, mp.MemoryModel) else model
    total, count = _direct_nll(base, docs, TINY.seg_len)
    ctx = model.memory_disabled() if isinstance(model, mp.MemoryModel) else torch.no_grad()
    with ctx:
        nll = evaluate(model, docs, TINY, torch.device("cpu"), BOS)
    assert [x.numel() for x in nll] == [d.tokens.numel() for d in docs]
    sums, counts = metrics.bucket_sums(nll)
    summary = metrics.summary(sums, counts, resamples=100)
    assert int(counts.sum()) == count
    assert summary["all"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert summary["0–512"]["ppl"] == pytest.approx(summary["all"]["ppl"], rel=1e-12)  # every token < 512
    lo, hi = summary["all"]["ci95"]
    assert lo <= summary["all"]["ppl"] <= hi


# -- (3) bucket assignment by in-document position ------------------------------------------------------


def test_bucket_edges() -> None:
    pos = torch.tensor([0, 1, 511, 512, 513, 2047, 2048, 8191, 8192, 100_000])
    assert metrics.bucket_of(pos).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert metrics.BUCKETS == ("0–512", "512–2k", "2k–8k", ">8k")


class _Unigram(nn.Module):
    """Logits that ignore the input: the NLL of target t is −log p_t, a known value per token id."""

    def __init__(self) -> None:
        super().__init__()
        self.logp = torch.log_softmax(torch.linspace(0.0, 3.0, V), dim=0)  # (V,) distinct values

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.logp.expand(*tokens.shape, V)  # (b, n, V)


def test_evaluation_stores_each_nll_at_its_position_in_the_document() -> None:
    """A model whose NLL names the target token: the pipeline's NLL at position i of a document must
    be that of the document's token i, for every position, in every bucket, with several lanes."""
    docs = [_doc("long", 9000, 1), _doc("mid", 2100, 2), _doc("short", 300, 3)]
    model = _Unigram()
    preset = Preset(memories=("none",), seg_len=64, eval_batch=2)
    nll = evaluate(model, docs, preset, torch.device("cpu"), BOS)
    for d, x in zip(docs, nll):
        expected = -model.logp[d.tokens.long()].double()  # (L,)
        assert torch.allclose(x, expected, atol=1e-6), d.id
    sums, counts = metrics.bucket_sums(nll)
    assert counts.tolist() == [[512, 1536, 6144, 808], [512, 1536, 52, 0], [300, 0, 0, 0]]
    assert sums[0, 3].item() == pytest.approx(float(nll[0][8192:].sum()))
    s = metrics.summary(sums, counts, resamples=50)
    assert s[">8k"]["tokens"] == 808 and s[">8k"]["documents"] == 1
    assert s[">8k"]["ppl"] == pytest.approx(math.exp(float(nll[0][8192:].mean())))


@pytest.mark.parametrize("memory", [m for m in ALL_MEMORIES if m != "none"])
def test_a_validation_point_leaves_the_training_lanes_memory_as_it_was(memory: str) -> None:
    """Validation during training streams its own documents; the training lanes then go on mid-document
    with the memory they had (emptied, they would be reset where no document starts)."""
    model = _model(memory)
    with torch.no_grad():
        model(torch.randint(1, V, (TINY.batch, TINY.seg_len)))
    before = model.memory_state()
    evaluate(model, [_doc("a", 40, 1), _doc("b", 30, 2), _doc("c", 20, 3)], TINY, torch.device("cpu"), BOS)
    after = model.memory_state()
    for layer, state in before["layers"].items():
        assert state is not None and all(torch.equal(state[k], after["layers"][layer][k]) for k in state), layer


def test_paired_difference_is_exact_and_signed() -> None:
    sums_a = torch.tensor([[10.0, 4.0, 0.0, 0.0], [8.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    sums_b = sums_a + 1.0
    counts = torch.tensor([[5, 2, 0, 0], [4, 0, 0, 0]])
    d = metrics.paired_difference(sums_a, sums_b, counts, resamples=100)
    assert d["all"]["diff"] == pytest.approx(math.exp(22 / 11) - math.exp(30 / 11))
    assert d["all"]["diff"] < 0 and d["all"]["ci95"][1] < 0  # a better on every document
    assert d["2k–8k"]["diff"] is None


# -- (4) bad input ----------------------------------------------------------------------------------------


def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "out")]
    assert benchmark.main(["--data", str(tmp_path / "nowhere"), *out]) == 2
    assert "--data: folder" in (err := capsys.readouterr().err) and "does not exist" in err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert benchmark.main(["--data", str(tmp_path / "empty"), *out]) == 2
    assert "holds no .txt file" in capsys.readouterr().err
    assert benchmark.main(["--corpus", str(tmp_path / "empty"), *out]) == 2
    assert "not a prepared corpus" in capsys.readouterr().err
    assert benchmark.main(["--tokenizer", "bpe", *out]) == 2
    assert "tokenizer: must be 'gpt2' or 'bpe<V>'" in capsys.readouterr().err
    assert benchmark.main(["--memories", "lstm", *out]) == 2
    assert "Preset.memories" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written on bad input


# -- a whole tiny run: outputs, equal budgets stated, resume ------------------------------------------------

WORDS = "the whale sea ship captain harpoon night storm wind deck sail boat oar rope tide".split()


def _write_corpus(folder, n_docs: int = 10) -> None:
    folder.mkdir(parents=True)
    for d in range(n_docs):
        words = [WORDS[(d * 7 + 3 * k + k * k) % len(WORDS)] for k in range(60 + 25 * d)]
        (folder / f"doc_{d:02d}.txt").write_text(f"Document {d}.\n\n" + " ".join(words) + ".\n", encoding="utf-8")


@pytest.mark.slow
def test_tiny_run_end_to_end_and_resume(tmp_path, monkeypatch) -> None:
    _write_corpus(tmp_path / "docs")
    monkeypatch.setitem(benchmark.PRESETS, "tiny", TINY)
    out = tmp_path / "runs"
    argv = ["--preset", "tiny", "--data", str(tmp_path / "docs"), "--tokenizer", "bpe300", "--out", str(out),
            "--memories", "none", "xl", "continuous_sticky"]
    assert benchmark.main(argv) == 0
    for name in ("results.json", "table.md", "perplexity_by_position.png", "ltm_attention.png", "sticky_samples.png"):
        assert (out / name).is_file(), name
    table = (out / "table.md").read_text()
    assert "8 STM vectors + N = 16 basis coefficients" in table
    assert "8 cached vectors" in table and "LTM off at test" in table
    result = json.loads((out / "continuous_sticky" / "result.json").read_text())
    assert set(result["test"]) == {"as_trained", "ltm_off"}
    summary = result["test"]["as_trained"]["summary"]
    assert summary["all"]["tokens"] == result["data"]["test_tokens"] > 0
    layers = result["diagnostics"]["layers"]
    assert all(abs(sum(x["mass"]) - 1) < 1e-6 for x in layers.values() if x["mass"])
    assert any("sticky_samples" in x for x in layers.values())
    results = json.loads((out / "results.json").read_text())
    assert {"continuous_sticky/as_trained", "continuous_sticky/ltm_off", "none/as_trained"} <= set(results["paired_vs_xl"])

    # resume: interrupted after the checkpoint at step 2, the rerun ends with the same weights
    ref = torch.load(out / "continuous_sticky" / "model.pt", weights_only=True)
    preset = Preset(**{**TINY.__dict__, "checkpoint_every": 2})
    monkeypatch.setitem(benchmark.PRESETS, "tiny", preset)
    out2 = tmp_path / "runs2"
    argv2 = ["--preset", "tiny", "--corpus", str(out / "corpus"), "--tokenizer", "bpe300", "--out", str(out2),
             "--memories", "continuous_sticky"]
    calls = {"n": 0}
    real = benchmark.token_nll

    def failing(logits, seg):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(logits, seg)

    monkeypatch.setattr(benchmark, "token_nll", failing)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv2)
    assert (out2 / "continuous_sticky" / "checkpoint.pt").is_file()
    monkeypatch.setattr(benchmark, "token_nll", real)
    assert benchmark.main(argv2) == 0
    again = torch.load(out2 / "continuous_sticky" / "model.pt", weights_only=True)
    assert json.loads((out2 / "continuous_sticky" / "result.json").read_text())["resumed_from_step"] == 2
    for k in ref:
        assert torch.allclose(ref[k], again[k], atol=1e-6), k
