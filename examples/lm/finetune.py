"""Fine-tuning a pretrained causal LM with a long-term memory (∞-former paper §4.3, Table 2).

    python -m examples.lm.finetune --preset quick --threads 1          # a few CPU minutes, offline
    python -m examples.lm.finetune --preset cpu --threads 1            # about half an hour on 2 cores
    python -m examples.lm.finetune --preset gpu --device cuda
    python -m examples.lm.finetune --preset gpu --device cuda --model gpt2   # real GPT-2 small, if you have it

Notation: B lanes (batch size), n segment length, N basis functions, V vocabulary.

The paper fine-tunes GPT-2 small (pretrained on WebText) on long books, with and without the ∞-former's
long-term memory (LTM only, N = 512 Gaussian RBFs for segments of 512, widths (0.005, 0.01), τ = 0.5,
λ_KL = 1e-6, σ₀ = 0.05; Adam, lr 5e-5 for GPT-2's weights and 2.5e-4 for the LTM's: App. C.3).

No pretrained weights can be fetched offline, so by default this script makes its own "pretrained
GPT-2" first: a small ``GPT2LMHeadModel`` (GPT-2 BPE, the corpus's ``gpt2`` tokens) trained without
memory on one half of the training books (split by a hash of the book id). Then every variant starts
from those weights and is fine-tuned for the same number of steps on the *book-length* books
(≥ ``min_tokens`` tokens) of the other half, streamed as in the from-scratch benchmark (each lane reads
one book in order, its memory reset when the book ends):

* ``none``: GPT-2 fine-tuned without memory (Table 2's "GPT-2" row);
* ``continuous``: GPT-2 + the ∞-former's LTM (``stm_len=0``: GPT-2 keeps its own window);
* ``continuous_sticky``: the same with sticky memories;
* ``xl`` (optional): GPT-2 + a Transformer-XL cache of n vectors.

``--model NAME_OR_DIR`` skips the pretraining and starts every variant from any causal LM that
``transformers`` can load (GPT-2 small gives the real Table 2 setting). It must use GPT-2's vocabulary,
since the corpus is tokenised with it.

The LTM is read-only at initialisation (its output projection starts at zero), so every variant starts
from exactly the pretrained model's predictions. Evaluation, buckets, intervals, the paired
difference (here to ``none``), LTM-off and the attention diagnostics are the benchmark's
(:mod:`examples.lm.benchmark`). Outputs under ``--out`` (default ``runs/lm_finetune/<preset>``):
``pretrained/`` (the base model, reused by later runs), ``<memory>/result.json``, ``table.md``,
``results.json`` and the plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

import memory_plugins as mp

from .benchmark import (
    check_preset,
    evaluate,
    longest,
    open_corpus,
    ppl_of,
    schedule,
    test_model,
    train_step,
)
from .corpus import ChecksumError, CorpusError
from .data import Document, DocumentStream

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is an optional extra
    tqdm = None

FT_MEMORIES = ("none", "xl", "continuous", "continuous_sticky")


@dataclass
class FinetunePreset:
    memories: tuple[str, ...] = ("none", "continuous", "continuous_sticky")
    dim: int = 128  # e (GPT-2's n_embd), for the offline pretrained model
    depth: int = 2  # n_layer
    heads: int = 4  # n_head
    seg_len: int = 128  # n = GPT-2's n_positions: every segment keeps positions 0 … n-1
    batch: int = 8  # B lanes
    pretrain_steps: int = 600
    pretrain_lr: float = 2e-3
    steps: int = 200  # fine-tuning steps, the same for every variant
    lr: float = 4e-4  # fine-tuning lr of the pretrained weights
    memory_lr_mult: float = 5.0  # the memory's lr = lr × this (App. C.3: 2.5e-4 / 5e-5)
    warmup: int = 40
    weight_decay: float = 0.01
    clip: float = 1.0
    min_tokens: int = 8192  # fine-tuning books: at least this long
    n_basis: int | None = None  # N (None: N = n, as the paper's 512 for 512)
    basis_widths: tuple[float, ...] = (0.005, 0.01)
    tau: float = 0.5
    kl_weight: float = 1e-6
    sigma_0: float = 0.05
    eval_batch: int = 8
    eval_docs: int | None = None
    eval_max_tokens: int | None = None
    valid_docs: int | None = 4
    valid_max_tokens: int | None = 2048
    evals: int = 2
    bootstrap: int = 2000
    amp: bool = False  # bf16 autocast (CUDA only)

    def __post_init__(self) -> None:
        check_preset(self, FT_MEMORIES, ("dim", "depth", "heads", "seg_len", "batch", "pretrain_steps", "steps",
                                         "eval_batch", "evals", "bootstrap", "min_tokens"))
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"FinetunePreset.warmup must be an int >= 0, got {self.warmup!r}")

    @property
    def basis(self) -> int:
        return self.n_basis or self.seg_len


PRESETS: dict[str, FinetunePreset] = {
    # A few CPU minutes: a 2-layer GPT-2 pretrained 600 steps, fine-tuned 200, tested on the 8 longest test
    # books cut at 10,240 tokens.
    "quick": FinetunePreset(eval_docs=8, eval_max_tokens=10_240),
    # About 40 minutes on 2 cores: pretrained 1,500 steps of 8 × 128 tokens, then each variant fine-tuned
    # 600 steps (as parallel processes of one thread: --memories), the whole test split.
    "cpu": FinetunePreset(depth=3, pretrain_steps=1500, steps=600, warmup=60, evals=3, valid_docs=6,
                          valid_max_tokens=4096),
    # One GPU: a GPT-2 of width 384 and 6 layers, 32 lanes (not measured yet).
    "gpu": FinetunePreset(memories=FT_MEMORIES, dim=384, depth=6, heads=6, batch=32, pretrain_steps=3000,
                          pretrain_lr=1e-3, steps=1000, lr=2e-4, warmup=100, evals=4, valid_docs=None,
                          valid_max_tokens=None, eval_batch=19, amp=True),
    # The paper's setting, for a user with GPT-2 small (--model gpt2): segments of 512, N = 512, lr 5e-5.
    "paper": FinetunePreset(memories=FT_MEMORIES, seg_len=512, batch=1, steps=100_000, lr=5e-5, warmup=0,
                            weight_decay=0.0, evals=10, valid_docs=None, valid_max_tokens=None, eval_batch=8,
                            amp=True),
}


def memory_options(name: str, preset: FinetunePreset) -> tuple[str | None, dict]:
    """Memory kind and options of a variant (App. C.3 for the ∞-former: LTM only)."""
    if name == "none":
        return None, {}
    if name == "xl":
        return "xl", {"mem_len": preset.seg_len}
    return "continuous", {"stm_len": 0, "n_basis": preset.basis, "basis_widths": tuple(preset.basis_widths),
                          "tau": preset.tau, "kl_weight": preset.kl_weight, "sigma_0": preset.sigma_0,
                          "sticky": name == "continuous_sticky"}


BUDGET = {
    "none": "nothing (each segment sees only itself)",
    "xl": "n cached vectors (n tokens back)",
    "continuous": "N basis coefficients (unbounded)",
    "continuous_sticky": "N basis coefficients, sticky (unbounded)",
}


def split_books(train: list[Document], min_tokens: int) -> tuple[list[Document], list[Document]]:
    """(pretraining books, fine-tuning books): the training books split in two halves by a hash of
    their id (deterministic, independent of order), the fine-tuning half kept to book length."""
    def half(d: Document) -> int:
        return hashlib.sha256(d.id.encode()).digest()[0] % 2

    pre = [d for d in train if half(d) == 0]
    fine = [d for d in train if half(d) == 1 and d.tokens.numel() >= min_tokens]
    if not pre or not fine:
        raise CorpusError(f"the corpus's {len(train)} training books give {len(pre)} pretraining and {len(fine)} "
                          f"fine-tuning books (≥ {min_tokens} tokens); both must be non-empty (lower min_tokens)")
    return pre, fine


def pretrained_model(preset: FinetunePreset, vocab_size: int, seed: int) -> nn.Module:
    """A fresh small GPT-2 (no dropout: short runs) whose positions cover one segment."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=preset.seg_len, n_embd=preset.dim, n_layer=preset.depth,
                     n_head=preset.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def param_groups(model: nn.Module, lr: float, memory_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: the base model's and the memory's weights at their own lrs; decay on matrices only."""
    base = model.model if isinstance(model, mp.MemoryModel) else model
    memory = list(model.memory.parameters()) if isinstance(model, mp.MemoryModel) else []
    groups = []
    for params, rate in ((list(base.parameters()), lr), (memory, memory_lr)):
        params = list({id(p): p for p in params if p.requires_grad}.values())
        groups += [{"params": [p for p in params if p.dim() >= 2], "lr": rate, "weight_decay": weight_decay},
                   {"params": [p for p in params if p.dim() < 2], "lr": rate, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def train_segments(model: nn.Module, books: list[Document], steps: int, groups: list[dict], preset: FinetunePreset,
                   device: torch.device, bos: int, seed: int, desc: str, on_eval=None) -> dict:
    """``steps`` truncated-BPTT steps over ``books`` streamed in B lanes (one optimiser step per segment,
    the memory carried over detached), warmup then cosine decay; ``on_eval(step)`` at ``preset.evals``
    points. Returns the learning curve and the training time."""
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
    warm = max(1, min(preset.warmup, steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(warm, steps))
    if isinstance(model, mp.MemoryModel):
        model.reset_memory()
    stream = iter(DocumentStream(books, preset.batch, preset.seg_len, train=True, seed=seed, bos=bos))
    eval_at = {round(steps * (k + 1) / preset.evals) for k in range(preset.evals)}
    curve, losses, seconds = [], [], 0.0
    bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True) if tqdm else None
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        seg = next(stream).to(device)
        losses = (losses + [train_step(model, model, seg, opt, sched, preset, device)])[-50:]
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}")
        if step + 1 in eval_at and on_eval is not None:
            seconds += time.perf_counter() - t0
            curve.append({"step": step + 1, "train_loss": sum(losses) / len(losses), "valid_ppl": on_eval()})
            t0 = time.perf_counter()
    if bar:
        bar.close()
    return {"curve": curve, "train_seconds": seconds + time.perf_counter() - t0}


def pretrain(out: Path, preset: FinetunePreset, corpus, books: list[Document], valid, device, seed: int) -> Path:
    """Train the memoryless base model once and save it (``out/pretrained``); reused when present."""
    folder = out / "pretrained"
    if (folder / "pretraining.json").is_file():  # written last: the weights are complete
        return folder
    model = pretrained_model(preset, corpus.vocab_size, seed).to(device)
    log = train_segments(model, books, preset.pretrain_steps, param_groups(model, preset.pretrain_lr, 0.0,
                         preset.weight_decay), preset, device, corpus.bos, seed, "pretrain",
                         lambda: ppl_of(evaluate(model, valid, preset, device, corpus.bos)))
    model.save_pretrained(folder)
    (folder / "pretraining.json").write_text(json.dumps({"books": len(books), "tokens": sum(d.tokens.numel() for d in books),
                                                         **log}, indent=1))
    return folder


def finetune_one(preset_name: str, preset: FinetunePreset, memory: str, base_dir: str, corpus, books, valid, test,
                 out: Path, device: torch.device, seed: int) -> dict:
    """Fine-tune one variant from the base model and test it; a finished run is read back."""
    from transformers import AutoModelForCausalLM

    run = out / memory
    result_file = run / "result.json"
    key = hashlib.sha256(json.dumps([asdict(preset), memory, str(base_dir), seed, [d.id for d in books]],
                                    default=str).encode()).hexdigest()[:16]
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result.get("fingerprint") == key:
            return result
        raise ValueError(f"--out: {run} holds a run of other settings; use another --out or delete that folder")
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir).to(device)
    kind, options = memory_options(memory, preset)
    if kind is not None:
        model = mp.wrap(model, kind, **options)
    before = ppl_of(evaluate(model, valid, preset, device, corpus.bos))  # = the base model's: the memory starts silent
    groups = param_groups(model, preset.lr, preset.lr * preset.memory_lr_mult, preset.weight_decay)
    log = train_segments(model, books, preset.steps, groups, preset, device, corpus.bos, seed, memory,
                         lambda: ppl_of(evaluate(model, valid, preset, device, corpus.bos)))
    results, diagnostics, eval_seconds, _ = test_model(model, kind == "continuous", test, preset, device, corpus.bos, seed)
    base = model.model if isinstance(model, mp.MemoryModel) else model
    result = {
        "preset": preset_name, "settings": asdict(preset), "memory": memory, "memory_kind": kind,
        "memory_options": options, "budget": BUDGET[memory], "seed": seed, "fingerprint": key,
        "host": f"GPT-2 ({type(base).__name__} from {base_dir}) fine-tuned,", "base_model": str(base_dir),
        "device": str(device), "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "data": {"corpus": str(corpus.root), "tokenizer": corpus.tokenizer, "vocab_size": corpus.vocab_size,
                 "finetune_documents": len(books), "finetune_tokens": sum(d.tokens.numel() for d in books),
                 "test_documents": len(test), "test_tokens": sum(d.tokens.numel() for d in test),
                 "eval_docs": preset.eval_docs, "eval_max_tokens": preset.eval_max_tokens},
        "steps": preset.steps, "tokens_per_step": preset.batch * preset.seg_len, "valid_ppl_before": before,
        "train_seconds": log["train_seconds"], "seconds_per_step": log["train_seconds"] / preset.steps,
        "eval_seconds": eval_seconds, "curve": log["curve"], "test": results, "diagnostics": diagnostics,
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.lm.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--memories", nargs="*", help=f"subset of {list(FT_MEMORIES)} (default: the preset's)")
    parser.add_argument("--model", help="a causal LM name or folder for transformers (GPT-2 vocabulary); "
                                        "default: pretrain a small GPT-2 here first")
    parser.add_argument("--steps", type=int, help="override the fine-tuning steps")
    parser.add_argument("--corpus", type=Path, default=Path("data/lm"), help="prepared corpus root (gpt2 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="default runs/lm_finetune/<preset>")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--report", action="store_true", help="only rebuild table.md, results.json and plots")
    args = parser.parse_args(argv)
    out = args.out or Path("runs/lm_finetune") / args.preset
    try:
        preset = PRESETS[args.preset]
        if args.memories:
            preset = replace(preset, memories=tuple(args.memories))
        if args.steps:
            preset = replace(preset, steps=args.steps)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        from .report import write_report

        if args.report:
            print(write_report(out, args.preset, preset, reference="none"))
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        corpus = open_corpus(args.corpus, "gpt2", None)
        pre, books = split_books(corpus.train, preset.min_tokens)
    except (CorpusError, ChecksumError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    valid = longest(corpus.valid, preset.valid_docs, preset.valid_max_tokens)
    test = longest(corpus.test, preset.eval_docs, preset.eval_max_tokens)
    print(f"preset {args.preset}: GPT-2 tokens (V = {corpus.vocab_size}); pretraining on {len(pre)} books "
          f"({sum(d.tokens.numel() for d in pre):,} tokens), fine-tuning on {len(books)} books "
          f"({sum(d.tokens.numel() for d in books):,} tokens), test on {len(test)} books", flush=True)
    base_dir = args.model or str(pretrain(out, preset, corpus, pre, valid, device, args.seed))
    for memory in preset.memories:
        r = finetune_one(args.preset, preset, memory, base_dir, corpus, books, valid, test, out, device, args.seed)
        s = r["test"]["as_trained"]["summary"]["all"]
        off = f", LTM off {r['test']['ltm_off']['summary']['all']['ppl']:.2f}" if "ltm_off" in r["test"] else ""
        print(f"{memory:>18}: test ppl {s['ppl']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]{off} "
              f"(valid before {r['valid_ppl_before']:.1f}; {r['train_seconds']:.0f} s train)", flush=True)
    print("\n" + write_report(out, args.preset, preset, reference="none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
