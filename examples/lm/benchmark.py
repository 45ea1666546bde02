"""Long-document language modelling (∞-former paper §4.2): every memory on one host, documents streamed.

    python -m examples.lm.benchmark --preset quick --threads 1        # a few CPU minutes
    python -m examples.lm.benchmark --preset cpu --memories none xl compressive --threads 1 &
    python -m examples.lm.benchmark --preset cpu --memories continuous continuous_sticky --threads 1
    python -m examples.lm.benchmark --preset gpu --device cuda        # about 10 minutes on one H100/H200
    python -m examples.lm.benchmark --preset quick --data ~/pg19/test --tokenizer bpe8192   # any .txt folder
    torchrun --nproc_per_node 2 -m examples.lm.benchmark --preset quick --threads 1   # 2 processes (DDP)

Notation: B lanes (batch size), n segment length, N basis functions, V vocabulary, D documents,
L tokens of a document, e model dim, h heads, K position buckets.

Host: the reference decoder (``memory_plugins.models.ReferenceDecoder``, pre-LN, rotary positions),
the same for every memory. Memories, at the paper's equal budgets per layer and lane (Table 1: one
short-term memory of n vectors for all, plus a long-term memory of n for the last two):

* ``none``: the unwrapped decoder; each segment sees only itself.
* ``xl``: Transformer-XL cache of n vectors.
* ``compressive``: n vectors + n compressed vectors (conv, rate 4, attention-reconstruction loss).
* ``continuous``: the ∞-former: an STM of n vectors + an LTM of N = n basis functions (τ = 0.5,
  widths (0.01, 0.05), λ_KL = 1e-5, σ₀ = 0.1: App. C.2). ``continuous_sticky``: with sticky memories.
* ``knn``: Memorizing Transformers' retrieval memory: a store of 2n (key, value) pairs per head, each
  query's top 32 mixed with local attention by a per-head gate.

Data: ``examples.lm.data.DocumentStream``: each lane reads one document in order, n tokens per
segment; when its document ends the lane's memory is reset (``model.reset_memory(doc_start)``) and the
next document begins. Padding (a document's last, partial segment; idle lanes at the end of an
evaluation) goes in as ``mask=``: it never enters a memory and is left out of the loss. Training is
the paper's truncated BPTT: one optimiser step per segment, the memory carried over detached.

Training: AdamW (no decay on biases and norms), linear warmup then cosine decay to 0, gradient
clipping, the memories' aux losses added (KL, attention reconstruction). Runs are resumable: a
finished run is read back from its ``result.json``; an unfinished one continues from its checkpoint
(weights, optimiser, schedule, the stream position and the memory state).

Evaluation on the test documents (the longest ``eval_docs``, each cut to its first ``eval_max_tokens``
tokens if the preset says so): the NLL of every token is kept per document and position, giving the
perplexity overall and by position in the document (0–512, 512–2k, 2k–8k, > 8k tokens) with 95%
bootstrap intervals over documents, and the paired difference to ``xl``. The continuous memories are
evaluated a second time with their long-term memory switched off (every layer's LTM output set to
zero; the STM stays), and their reads are recorded: where the Gaussians attend over [0, 1] (Fig. 4)
and, with sticky memories, where the update samples the old signal.

Under ``torchrun --nproc_per_node K`` (docs/scale.md): K processes (gloo on the CPU, NCCL on CUDA, one
GPU each), the model in DDP; rank r streams its share of the training documents (every K-th from r) over
its own ``batch`` lanes with its own memory, so an optimiser step sees K × ``batch`` lanes. Rank 0 alone
logs, evaluates (the validation curve and the test, on the whole test set, as one process would; the
other ranks wait, then empty their memories too, as rank 0's evaluation does to its own) and writes the
outputs and checkpoints (with every rank's memory state and RNG; a resume needs the same K). One process
without torchrun runs exactly as before.

Outputs under ``--out`` (default ``runs/lm/<preset>``): ``<memory>/result.json`` (one per run, with
per-document sums), ``<memory>/nll.pt`` (per-token NLL), ``<memory>/model.pt``, ``results.json``,
``table.md``, ``perplexity_by_position.png``, ``ltm_attention.png``, ``sticky_samples.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memory_plugins as mp
from memory_plugins import distributed
from memory_plugins.distributed import Launch
from memory_plugins.models import DecoderConfig, ReferenceDecoder

from . import metrics
from .corpus import ChecksumError, CorpusError, collect_folder, read_manifest
from .data import IGNORE, Document, DocumentStream, Segment, load_corpus
from .tokenizer import check_name

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is an optional extra
    tqdm = None

ALL_MEMORIES = ("none", "xl", "compressive", "continuous", "continuous_sticky", "knn")


def check_preset(preset: Any, memories: tuple[str, ...], ints: tuple[str, ...]) -> None:
    """A preset's memories are a non-empty subset of ``memories``, its ``ints`` are ints >= 1 and its
    optional counts (evaluation documents and tokens, N) None or ints >= 1; else a ValueError naming
    the field, the value and what is allowed."""
    kind = type(preset).__name__
    bad = [m for m in preset.memories if m not in memories]
    if bad or not preset.memories:
        raise ValueError(f"{kind}.memories: {list(preset.memories)} is not a non-empty subset of {list(memories)}")
    for name in ints:
        value = getattr(preset, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{kind}.{name} must be an int >= 1, got {value!r}")
    for name in ("eval_docs", "eval_max_tokens", "valid_docs", "valid_max_tokens", "n_basis"):
        value = getattr(preset, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{kind}.{name} must be None or an int >= 1, got {value!r}")


@dataclass
class Preset:
    memories: tuple[str, ...]
    tokenizer: str = "bpe8192"
    dim: int = 128  # e
    depth: int = 2
    heads: int = 4
    ff_mult: int = 4
    tie_embeddings: bool = True  # the output layer reuses the embedding matrix
    seg_len: int = 64  # n
    batch: int = 8  # B lanes
    steps: int = 400  # optimiser steps = training segments per lane
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    clip: float = 1.0
    n_basis: int | None = None  # N (None: N = n)
    basis_widths: tuple[float, ...] = (0.01, 0.05)
    tau: float = 0.5
    kl_weight: float = 1e-5
    sigma_0: float = 0.1
    compression_rate: int = 4
    eval_batch: int = 8
    eval_docs: int | None = None  # the longest k test documents (None: all)
    eval_max_tokens: int | None = None  # first tokens of each evaluated document (None: all)
    valid_docs: int | None = 4  # validation curve: the longest k valid documents
    valid_max_tokens: int | None = 2048
    evals: int = 2  # validation points on the learning curve
    checkpoint_every: int = 200  # steps
    bootstrap: int = 2000  # resamples for the 95% intervals
    amp: bool = False  # bf16 autocast (CUDA only)

    def __post_init__(self) -> None:
        check_preset(self, ALL_MEMORIES, ("dim", "depth", "heads", "ff_mult", "seg_len", "batch", "steps", "eval_batch",
                                          "evals", "checkpoint_every", "bootstrap", "compression_rate"))
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"Preset.warmup must be an int >= 0, got {self.warmup!r}")
        check_name(self.tokenizer)

    @property
    def basis(self) -> int:
        """N: the ∞-former's basis functions (the preset's, or one per segment token)."""
        return self.n_basis or self.seg_len


PRESETS: dict[str, Preset] = {
    # A few CPU minutes (--threads 1, 2 busy cores): 3 memories × 400 steps of 8 × 64 tokens (0.2 M tokens
    # each; measured 0.21–0.26 s/step, 6–8 min in all), tested on the 8 longest test books cut at 10,240
    # tokens (82 k tokens, > 8k bucket included).
    "quick": Preset(memories=("none", "xl", "continuous"), steps=400, eval_docs=8, eval_max_tokens=10_240),
    # About an hour on 2 cores as two processes of one thread (see RESULTS.md): 5 memories × 1,800
    # steps of 8 × 128 tokens (1.8 M tokens, 0.27 epoch; measured 0.61–0.78 s/step), the whole test split
    # (384 k tokens).
    "cpu": Preset(memories=ALL_MEMORIES, depth=3, seg_len=128, steps=1800, lr=2e-3, warmup=100, evals=4,
                  valid_docs=6, valid_max_tokens=4096, eval_batch=8, checkpoint_every=250),
    # About 10 minutes on one H100/H200 (estimated, not measured): 5 memories × 3,000 steps of
    # 32 × 128 tokens (12 M tokens, 1.8 epochs), bf16 autocast, the whole test split.
    "gpu": Preset(memories=ALL_MEMORIES, dim=384, depth=6, heads=6, seg_len=128, batch=32, steps=3000, lr=1e-3,
                  warmup=200, evals=5, valid_docs=None, valid_max_tokens=None, eval_batch=19, checkpoint_every=500,
                  amp=True),
    # The paper's sizes (§4.2, App. C.2): 16 layers, 10 heads, segment = memories = 150, N = 150, batch 40,
    # 250k steps, lr 2.5e-4, GPT-2 tokens. e = 420 (paper 410: rotary needs an even head dim) and a
    # feed-forward of 5 × 420 = 2,100 as the paper. Clip 0.25 and no weight decay as Transformer-XL.
    "paper": Preset(memories=ALL_MEMORIES, tokenizer="gpt2", dim=420, depth=16, heads=10, ff_mult=5,
                    tie_embeddings=False, seg_len=150, batch=40, steps=250_000, lr=2.5e-4, warmup=1000,
                    weight_decay=0.0, clip=0.25, evals=25, valid_docs=None, valid_max_tokens=None, eval_batch=20,
                    checkpoint_every=2000, amp=True),
}


# -- models ------------------------------------------------------------------------------------------


def memory_options(name: str, preset: Preset) -> tuple[str | None, dict[str, Any]]:
    """Memory kind and options of each ablation at the paper's budgets (Table 1, App. C.2)."""
    n = preset.seg_len
    if name == "none":
        return None, {}
    if name == "xl":
        return "xl", {"mem_len": n}
    if name == "compressive":
        return "compressive", {"mem_len": n, "cmem_len": n, "compression_rate": preset.compression_rate}
    if name in ("continuous", "continuous_sticky"):
        return "continuous", {
            "stm_len": n, "n_basis": preset.basis, "basis_widths": tuple(preset.basis_widths), "tau": preset.tau,
            "kl_weight": preset.kl_weight, "sigma_0": preset.sigma_0, "sticky": name == "continuous_sticky",
        }
    if name == "knn":  # Memorizing Transformers: the compressive memory's 2n slots as retrievable pairs
        return "knn", {"store_len": 2 * n, "top_k": min(32, 2 * n)}
    raise ValueError(f"memory: unknown {name!r}; choose from {list(ALL_MEMORIES)}")


def budget(name: str, preset: Preset) -> str:
    """What the memory keeps per layer and lane, in words (the equal-budget statement of the outputs)."""
    n, c = preset.seg_len, preset.compression_rate
    return {
        "none": "nothing (each segment sees only itself)",
        "xl": f"{n} cached vectors ({n} tokens back)",
        "compressive": f"{n} vectors + {n} compressed (rate {c}: {n + c * n} tokens back)",
        "continuous": f"{n} STM vectors + N = {preset.basis} basis coefficients (unbounded)",
        "continuous_sticky": f"{n} STM vectors + N = {preset.basis} basis coefficients, sticky (unbounded)",
        "knn": f"{2 * n} retrievable (key, value) pairs per head, top {min(32, 2 * n)} ({2 * n} tokens back)",
    }[name]


def build(preset: Preset, memory: str, vocab_size: int) -> nn.Module:
    """The reference decoder with ``memory`` (the bare decoder for ``none``)."""
    model = ReferenceDecoder(DecoderConfig(vocab_size=vocab_size, dim=preset.dim, depth=preset.depth,
                                           heads=preset.heads, ff_mult=preset.ff_mult))
    if preset.tie_embeddings:  # GPT-2 style: one (V, e) matrix, small init (N(0, 1) would give huge logits)
        nn.init.normal_(model.embed.weight, std=0.02)
        model.head.weight = model.embed.weight  # (V, e) shared
    kind, options = memory_options(memory, preset)
    return model if kind is None else mp.wrap(model, kind, **options)


def forward_segment(model: nn.Module, seg: Segment) -> Tensor:
    """One segment through ``model`` (or its DDP wrapper): reset the lanes that start a new document,
    then run the inputs with the padding mask. Returns logits (B, n, V)."""
    core = distributed.unwrap(model)
    if isinstance(core, mp.MemoryModel) and bool(seg.doc_start.any()):
        core.reset_memory(seg.doc_start)  # exactly the lanes whose new document begins here
    mask = None if bool(seg.valid.all()) else seg.valid  # (B, n) True = real token
    base = core.model if isinstance(core, mp.MemoryModel) else core
    if type(base).__module__.startswith("transformers."):  # a Hugging Face causal LM (the fine-tuning runs)
        return model(input_ids=seg.inputs, attention_mask=None if mask is None else mask.long()).logits  # (B, n, V)
    return model(seg.inputs, mask=mask)  # (B, n, V)


def token_nll(logits: Tensor, seg: Segment) -> Tensor:
    """Per-token cross-entropy (B, n) float32; 0 where the target is padding."""
    _, targets = seg.inputs_and_targets()  # (B, n), IGNORE where not valid
    return F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # (B, n)


def autocast(device: torch.device, preset: Preset):
    return torch.autocast("cuda", dtype=torch.bfloat16) if preset.amp and device.type == "cuda" else nullcontext()


# -- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, docs: list[Document], preset: Preset, device: torch.device, bos: int) -> list[Tensor]:
    """Per-token NLL of every document, streamed with ``eval_batch`` lanes: a list (L_d,) float64 in
    the order of ``docs``, entry i = NLL of the document's token i (its in-document position)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(docs)), key=lambda i: (-docs[i].tokens.numel(), i))  # longest first: lanes end together
    stream = DocumentStream([docs[i] for i in order], preset.eval_batch, preset.seg_len, bos=bos, short="keep")
    nll = [torch.full((docs[i].tokens.numel(),), math.nan, dtype=torch.float64) for i in order]
    training_stream = model.memory_state() if isinstance(model, mp.MemoryModel) else None  # put back afterwards
    if training_stream is not None:
        model.reset_memory()
    for seg in stream:
        seg = seg.to(device)
        with autocast(device, preset):
            logits = forward_segment(model, seg)  # (B, n, V)
        tl = token_nll(logits, seg).to("cpu", torch.float64)  # (B, n)
        valid, doc, offset = seg.valid.cpu(), seg.doc_index.tolist(), seg.offset.tolist()
        for b, d in enumerate(doc):
            if d < 0:
                continue
            k = int(valid[b].sum())  # valid targets form a prefix of the lane
            # with bos, target j of a segment at offset p is document token p + j
            nll[d][offset[b] : offset[b] + k] = tl[b, :k]
    if training_stream is not None:  # the training lanes go on mid-document with the memory they had
        model.reset_memory()
        model.set_memory_state(training_stream)
    model.train(was_training)
    out = [torch.empty(0)] * len(docs)
    for pos, i in enumerate(order):
        out[i] = nll[pos]
    return out


class LTMOff:
    """Inside: every continuous layer's LTM output Z_LTM is zero (its STM still works)."""

    def __init__(self, model: nn.Module) -> None:
        self.backends = list(model.memory.backends)
        self.hooks: list = []

    def __enter__(self) -> LTMOff:
        self.hooks = [b.to_out.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out)) for b in self.backends]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()


class LTMProbe:
    """Records the continuous memory's reads during an evaluation pass (wraps each backend's ``step``).

    * ``mass`` (layers, K) float64: attention mass of 𝒩(μ, σ²) in K equal bins of [0, 1], summed over
      heads and over the valid queries of lanes whose LTM is non-empty (the paper's Fig. 4).
    * ``outside`` (layers,): the mass that fell outside [0, 1]; ``queries`` (layers,): query·heads counted.
    * ``example`` per layer: μ, σ² (h, 3) of three queries (first, middle, last of the segment) of lane
      0 in the last fully valid segment where its LTM held something (deep in the longest document).
    * ``samples`` (layers, K), sticky only: where the update sampled the old signal (Eq. 17), as a count
      of the M locations per bin (linear spacing would be flat).
    """

    BINS = 20

    def __init__(self, model: nn.Module) -> None:
        self.backends = list(model.memory.backends)
        layers = len(self.backends)
        self.mass = torch.zeros(layers, self.BINS, dtype=torch.float64)  # (layers, K)
        self.outside = torch.zeros(layers, dtype=torch.float64)  # (layers,)
        self.queries = torch.zeros(layers, dtype=torch.float64)  # (layers,)
        self.samples = torch.zeros(layers, self.BINS, dtype=torch.float64)  # (layers, K)
        self.example: list[dict | None] = [None] * layers
        self.sticky = bool(self.backends[0].config.sticky)

    def __enter__(self) -> LTMProbe:
        for i, b in enumerate(self.backends):
            b.step = self._wrap(b, i)  # instance attribute shadows the method while probing
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self.backends:
            b.__dict__.pop("step", None)

    def _wrap(self, backend: nn.Module, i: int):
        original = type(backend).step.__get__(backend)
        edges = torch.linspace(0.0, 1.0, self.BINS + 1, dtype=torch.float64)  # (K + 1,)

        def step(state, x, q, valid):
            if self.sticky and "hist" in state:
                self._record_samples(backend, i, state)
            read, new = original(state, x, q, valid)
            info = read.info or {}
            if "mu" not in info or "sigma2" not in info:
                return read, new
            mu = info["mu"].detach().to("cpu", torch.float64)  # (b, h, n)
            sd = info["sigma2"].detach().to("cpu", torch.float64).sqrt()  # (b, h, n)
            has = new["has_ltm"].detach().cpu()  # (b,) the LTM this read attended to was not empty
            w = has[:, None, None].expand_as(mu)  # (b, h, n)
            if valid is not None:
                w = w & valid.cpu()[:, None, :]
            cdf = torch.special.ndtr((edges - mu[..., None]) / sd[..., None])  # (b, h, n, K + 1)
            bins = (cdf[..., 1:] - cdf[..., :-1]) * w[..., None]  # (b, h, n, K)
            self.mass[i] += bins.sum(dim=(0, 1, 2))
            self.queries[i] += float(w.sum())
            self.outside[i] += float(w.sum()) - float(bins.sum())
            if bool(has[0]) and (valid is None or bool(valid[0].all())):
                n = mu.shape[-1]
                picks = [0, n // 2, n - 1]
                self.example[i] = {"query": picks, "mu": mu[0][:, picks].tolist(), "sigma2": (sd[0][:, picks] ** 2).tolist()}
            return read, new

        return step

    def _record_samples(self, backend: nn.Module, i: int, state: dict) -> None:
        from memory_plugins.continuous.sticky import sample_locations

        cfg = backend.config
        rows = state["has_ltm"] & state["pending_valid"].any(dim=1)  # (b,) lanes whose old signal is resampled now
        if not bool(rows.any()):
            return
        loc = sample_locations(state["hist"][rows], cfg.samples_per_update, cfg.sticky_sampling)  # (b', M)
        self.samples[i] += torch.histc(loc.detach().to("cpu", torch.float64), bins=self.BINS, min=0.0, max=1.0)

    def result(self) -> dict:
        depth = len(self.backends)
        tau = float(self.backends[0].config.tau)
        out = {"bins": self.BINS, "tau": tau, "layers": {}}
        for i in sorted({0, depth // 2, depth - 1}):
            total = float(self.mass[i].sum())
            layer = {
                "mass": (self.mass[i] / total).tolist() if total > 0 else None,
                "outside_fraction": float(self.outside[i] / self.queries[i]) if self.queries[i] > 0 else None,
                "queries": float(self.queries[i]),
                "example": self.example[i],
            }
            if self.sticky and float(self.samples[i].sum()) > 0:
                layer["sticky_samples"] = (self.samples[i] / self.samples[i].sum()).tolist()
            out["layers"][str(i)] = layer
        return out


# -- corpus ------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    root: Path
    tokenizer: str
    vocab_size: int
    bos: int
    train: list[Document]
    valid: list[Document]
    test: list[Document]


def longest(docs: list[Document], count: int | None, max_tokens: int | None) -> list[Document]:
    """The ``count`` longest documents (all if None; ties by id), each cut to its first ``max_tokens``."""
    chosen = sorted(docs, key=lambda d: (-d.tokens.numel(), d.id))[: count or len(docs)]
    chosen = sorted(chosen, key=lambda d: d.id)
    return [Document(d.id, d.tokens[:max_tokens]) if max_tokens else d for d in chosen]


def open_corpus(corpus: Path, tokenizer: str, data: Path | None) -> Corpus:
    """Load the prepared corpus at ``corpus``; with ``data`` (a folder of .txt documents) prepare it
    there first, unless it already holds that folder with this tokenizer. Raises :class:`CorpusError`
    with the parameter, the bad value and the remedy."""
    check_name(tokenizer)
    if data is not None:
        collect_folder(data, parameter="--data")  # missing or empty folder: a clear error first
        manifest = read_manifest(corpus) if (corpus / "manifest.json").is_file() else {}
        same = manifest.get("docs_root") == str(data.resolve()) and tokenizer in manifest.get("tokenizers", {})
        if not same:
            from . import prepare

            argv = ["--data", str(data), "--out", str(corpus), "--tokenizers", tokenizer]
            shipped = Path("data/lm/downloads")  # the GPT-2 files' archive, if the default corpus was prepared
            if tokenizer == "gpt2" and shipped.is_dir():
                argv += ["--downloads", str(shipped)]
            if prepare.main(argv) != 0:
                raise CorpusError(f"--data: preparing {str(data)!r} into {str(corpus)!r} failed (see the message above)")
    manifest = read_manifest(corpus)
    entry = manifest.get("tokenizers", {}).get(tokenizer)
    if entry is None:
        raise CorpusError(
            f"--tokenizer: {tokenizer!r} is not prepared in {str(corpus)!r} (it has {sorted(manifest.get('tokenizers', {}))}); "
            f"run `python -m examples.lm.prepare --out {corpus} --tokenizers {tokenizer}`"
        )
    splits = {s: load_corpus(corpus, s, tokenizer) for s in ("train", "valid", "test")}
    return Corpus(corpus, tokenizer, int(entry["vocab_size"]), int(entry["eot_id"]), **splits)


# -- training ----------------------------------------------------------------------------------------


def fingerprint(preset: Preset, memory: str, corpus: Corpus, seed: int, world_size: int = 1) -> str:
    """What a run's result depends on: preset, memory, corpus documents, tokenizer, seed (and the
    number of processes, when more than one)."""
    docs = [(d.id, d.tokens.numel()) for d in corpus.train + corpus.test]
    settings = [asdict(preset), memory, corpus.tokenizer, docs, seed] + ([world_size] if world_size > 1 else [])
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def schedule(warmup: int, steps: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step / steps, 1.0)))

    return factor


def train_step(model: nn.Module, parallel: nn.Module, seg: Segment, opt: torch.optim.Optimizer, sched: Any,
               preset: Any, device: torch.device) -> float:
    """One truncated-BPTT step on segment ``seg`` through ``parallel`` (``model`` or its DDP wrapper):
    token loss + the memories' aux losses, backward, clipping, optimiser and schedule step. Returns
    the token loss (mean over real targets)."""
    with autocast(device, preset):
        logits = forward_segment(parallel, seg)  # (B, n, V)
    loss = token_nll(logits, seg).sum() / seg.valid.sum().clamp_min(1)  # mean over real targets
    aux = model.memory_aux_loss() if isinstance(model, mp.MemoryModel) else loss.new_zeros(())
    (loss + aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def optimizer(model: nn.Module, preset: Preset) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms or the memories' scalar maps)."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": preset.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=preset.lr, betas=(0.9, 0.98), eps=1e-8)


def ppl_of(nll: list[Tensor]) -> float:
    total = sum(float(x.sum()) for x in nll)
    count = sum(x.numel() for x in nll)
    return math.exp(total / max(count, 1))


def test_model(model: nn.Module, continuous: bool, docs: list[Document], preset: Any, device: torch.device,
               bos: int, seed: int) -> tuple[dict, dict | None, float, dict[str, list[Tensor]]]:
    """Test ``model`` on ``docs``: per variant ("as_trained"; for the ∞-former also "ltm_off") the bucket
    summary with intervals and the per-document sums; the LTM diagnostics; seconds; the per-token NLL."""
    t_eval = time.perf_counter()
    variants: dict[str, list[Tensor]] = {}
    diagnostics = None
    if continuous:
        with LTMProbe(model) as probe:
            variants["as_trained"] = evaluate(model, docs, preset, device, bos)
        diagnostics = probe.result()
        with LTMOff(model):
            variants["ltm_off"] = evaluate(model, docs, preset, device, bos)
    else:
        variants["as_trained"] = evaluate(model, docs, preset, device, bos)
    eval_seconds = time.perf_counter() - t_eval
    test = {}
    for name, nll in variants.items():
        sums, counts = metrics.bucket_sums(nll)
        test[name] = {
            "summary": metrics.summary(sums, counts, resamples=preset.bootstrap, seed=seed),
            "per_doc": {d.id: {"nll_sum": sums[i].tolist(), "tokens": counts[i].tolist()} for i, d in enumerate(docs)},
        }
    return test, diagnostics, eval_seconds, variants


def train_one(preset_name: str, preset: Preset, memory: str, corpus: Corpus, seed: int, out: Path,
              device: torch.device, launch: Launch | None = None) -> dict:
    """Train and test one memory; resumable through ``out/<memory>/``. With ``launch`` of several
    processes (torchrun), every rank calls it: DDP, each rank its share of the training documents."""
    launch = launch or Launch(device=device)
    run = out / memory
    result_file = run / "result.json"
    key = fingerprint(preset, memory, corpus, seed, launch.world_size)
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if result.get("fingerprint") != key:
            raise ValueError(
                f"--out: {run} holds a run of other settings (preset, data, tokenizer or seed changed); "
                "use another --out or delete that folder"
            )
        return result
    if launch.is_main:
        run.mkdir(parents=True, exist_ok=True)
    if len(corpus.train) < launch.world_size:
        raise ValueError(f"--nproc_per_node: {launch.world_size} processes need at least as many training documents; "
                         f"the corpus has {len(corpus.train)}")
    torch.manual_seed(seed)
    model = build(preset, memory, corpus.vocab_size).to(device)
    parallel = distributed.data_parallel(model, launch)  # model itself for one process
    opt = optimizer(model, preset)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(preset.warmup, preset.steps))
    wrapped = isinstance(model, mp.MemoryModel)
    valid_docs = longest(corpus.valid, preset.valid_docs, preset.valid_max_tokens)
    test_docs = longest(corpus.test, preset.eval_docs, preset.eval_max_tokens)

    start, curve, train_seconds, losses = 0, [], 0.0, []
    ckpt = run / "checkpoint.pt"
    memory_state = None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        if state.get("fingerprint") != key:
            raise ValueError(f"--out: checkpoint {ckpt} belongs to other settings; delete it or use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, curve, train_seconds = state["step"], state["curve"], state["train_seconds"]
        memory_state = state["memory_states"][launch.rank] if launch.distributed else state.get("memory_state")
        torch.set_rng_state(state["rngs"][launch.rank] if launch.distributed else state["rng"])
    train_docs = distributed.shard(corpus.train, launch)  # this rank's documents (all of them for one process)
    stream = iter(DocumentStream(train_docs, preset.batch, preset.seg_len, train=True, seed=seed, bos=corpus.bos))
    seen: set[str] = set()  # ids of the documents this rank trained on (reported with several processes)
    for _ in range(start):  # the stream is deterministic: skip what was already trained on
        next(stream)
    if wrapped:
        model.reset_memory()
        if memory_state is not None:
            model.set_memory_state(memory_state)

    eval_at = {round(preset.steps * (k + 1) / preset.evals) for k in range(preset.evals)}
    bar = tqdm(total=preset.steps, initial=start, desc=memory, leave=False, dynamic_ncols=True) if tqdm and launch.is_main else None
    model.train()
    t0 = time.perf_counter()
    for step in range(start, preset.steps):
        seg = next(stream).to(device)
        if launch.distributed:
            seen.update(train_docs[d].id for d in seg.doc_index.tolist() if d >= 0)
        losses.append(train_step(model, parallel, seg, opt, sched, preset, device))
        losses = losses[-50:]
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        done = step + 1
        if done in eval_at:
            train_seconds += time.perf_counter() - t0
            if launch.is_main:  # the others wait; evaluate() puts rank 0's training memory back
                v = ppl_of(evaluate(model, valid_docs, preset, device, corpus.bos))
                curve.append({"step": done, "train_loss": sum(losses) / len(losses), "valid_ppl": v})
            distributed.barrier(launch)
            t0 = time.perf_counter()
        if done % preset.checkpoint_every == 0 or done in eval_at:
            elapsed = train_seconds + time.perf_counter() - t0
            memory_states = distributed.gather(model.memory_state() if wrapped else None, launch)  # every rank's
            rngs = distributed.gather(torch.get_rng_state(), launch)
            if launch.is_main:
                per_rank = {"memory_states": memory_states, "rngs": rngs} if launch.distributed else {}
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": done,
                            "curve": curve, "train_seconds": elapsed, "rng": rngs[0], "fingerprint": key,
                            "memory_state": memory_states[0], **per_rank}, ckpt)
            train_seconds, t0 = elapsed, time.perf_counter()
    train_seconds += time.perf_counter() - t0
    if bar:
        bar.close()
    seen_by_rank = distributed.gather(sorted(seen), launch)
    if not launch.is_main:  # rank 0 tests the whole test set and writes the outputs; the others read them
        distributed.barrier(launch)
        return json.loads(result_file.read_text())

    # -- test ------------------------------------------------------------------------------------
    kind, options = memory_options(memory, preset)
    test, diagnostics, eval_seconds, variants = test_model(model, kind == "continuous", test_docs, preset, device,
                                                           corpus.bos, seed)
    torch.save({"ids": [d.id for d in test_docs], **{k: [x.float() for x in v] for k, v in variants.items()}}, run / "nll.pt")
    result = {
        "preset": preset_name, "settings": asdict(preset), "memory": memory, "memory_kind": kind,
        "memory_options": options, "budget": budget(memory, preset), "seed": seed, "stream_seed": seed,
        "fingerprint": key, "device": str(device), "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "data": {"corpus": str(corpus.root), "tokenizer": corpus.tokenizer, "vocab_size": corpus.vocab_size,
                 "train_documents": len(corpus.train), "train_tokens": sum(d.tokens.numel() for d in corpus.train),
                 "test_documents": len(test_docs), "test_tokens": sum(d.tokens.numel() for d in test_docs),
                 "eval_docs": preset.eval_docs, "eval_max_tokens": preset.eval_max_tokens},
        "steps": preset.steps, "tokens_per_step": preset.batch * preset.seg_len * launch.world_size,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / preset.steps,
        "resumed_from_step": start, "eval_seconds": eval_seconds, "curve": curve, "test": test,
        "diagnostics": diagnostics,
    }
    if launch.distributed:  # K processes: who trained on what (disjoint shares of the training documents)
        result["distributed"] = {"world_size": launch.world_size, "backend": str(torch.distributed.get_backend()),
                                 "train_documents_by_rank": seen_by_rank}
    torch.save(model.state_dict(), run / "model.pt")
    result_file.write_text(json.dumps(result, indent=1))
    ckpt.unlink(missing_ok=True)
    distributed.barrier(launch)
    return result


# -- command -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.lm.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--memories", nargs="*", help=f"subset of {list(ALL_MEMORIES)} (default: the preset's)")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--tokenizer", help="gpt2 or bpe<V> (default: the preset's)")
    parser.add_argument("--corpus", type=Path, help="prepared corpus root (default data/lm; with --data: OUT/corpus)")
    parser.add_argument("--data", type=Path, help="a folder of .txt documents to prepare and use instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="default runs/lm/<preset>")
    parser.add_argument("--threads", type=int, help="torch threads (two processes of 1 on 2 cores)")
    parser.add_argument("--report", action="store_true", help="only rebuild table.md, results.json and plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch = distributed.launch(args.device)  # torchrun: the process group; plain python: one process
    try:
        return run_all(args, launch)
    finally:
        distributed.close(launch)


def run_all(args: argparse.Namespace, launch: Launch) -> int:
    """Every memory of the preset, then the report; under torchrun every rank runs it, rank 0 alone
    prints and writes."""
    say = print if launch.is_main else (lambda *a, **k: None)
    preset = replace(PRESETS[args.preset])
    corpus = None
    try:
        if args.memories:
            preset = replace(preset, memories=tuple(args.memories))
        if args.steps:
            preset = replace(preset, steps=args.steps)
        if args.tokenizer:
            preset = replace(preset, tokenizer=args.tokenizer)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        out = args.out or Path("runs/lm") / args.preset
        if args.report:
            from .report import write_report

            if launch.is_main:
                write_report(out, args.preset, preset)
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        corpus_root = args.corpus or (out / "corpus" if args.data else Path("data/lm"))
        if launch.is_main:  # rank 0 prepares the corpus (if --data asks for it) before the others read it
            corpus = open_corpus(corpus_root, preset.tokenizer, args.data)
    except (CorpusError, ChecksumError, ValueError) as err:
        say(f"error: {err}", file=sys.stderr)
        distributed.agree(False, launch)
        return 2
    if not distributed.agree(True, launch):
        return 2
    if corpus is None:
        corpus = open_corpus(corpus_root, preset.tokenizer, args.data)
    if launch.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = launch.device
    test_docs = longest(corpus.test, preset.eval_docs, preset.eval_max_tokens)
    processes = f", {launch.world_size} processes (DDP)" if launch.distributed else ""
    say(f"preset {args.preset}: {corpus.tokenizer} (V = {corpus.vocab_size}), {len(corpus.train)} train documents "
        f"({sum(d.tokens.numel() for d in corpus.train):,} tokens), test on {len(test_docs)} documents "
        f"({sum(d.tokens.numel() for d in test_docs):,} tokens); n = {preset.seg_len}, B = {preset.batch}, "
        f"{preset.steps} steps{processes}", flush=True)
    for memory in preset.memories:
        try:
            r = train_one(args.preset, preset, memory, corpus, args.seed, out, device, launch)
        except ValueError as err:
            say(f"error: {err}", file=sys.stderr)
            return 2
        s = r["test"]["as_trained"]["summary"]["all"]
        extra = ""
        if "ltm_off" in r["test"]:
            extra = f", LTM off {r['test']['ltm_off']['summary']['all']['ppl']:.2f}"
        step_ms = f"{1000 * r['seconds_per_step']:.0f} ms/step"
        say(f"{memory:>18}: test ppl {s['ppl']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]{extra}  "
            f"({r['train_seconds']:.0f} s train, {step_ms}, {r['eval_seconds']:.0f} s test)", flush=True)
    if launch.is_main:
        from .report import write_report

        md = write_report(out, args.preset, preset)
        print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
