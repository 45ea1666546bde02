"""Train a tiny GPT-2 with a memory through ``transformers.Trainer`` on long documents (about a minute on a CPU).

    python -m examples.hf_trainer.train                       # data/lm if prepared, else synthetic documents
    python -m examples.hf_trainer.train --memory continuous --steps 300 --synthetic

The model is a ``GPT2LMHeadModel`` built from a ``GPT2Config`` (no download), wrapped with
``memory_plugins.wrap``; :class:`~memory_plugins.integrations.hf_trainer.SegmentDataset` streams the
documents lane by lane and :class:`~memory_plugins.integrations.hf_trainer.MemoryTrainer` resets each
lane's memory where its next document starts. It prints the held-out loss before and after training,
and after training once more with the memory switched off (what the memory is worth to this model).

Data: the prepared corpus ``data/lm`` (``python -m examples.lm.prepare``; tokenizer ``bpe8192``) when it
is there, else synthetic documents in which each document repeats its own phrase of ``2 × seg_len``
tokens: every word has 4 possible successors (learnt from the data, loss ln 4 = 1.39), and which one
a phrase took can only be recalled from memory of its previous occurrence (loss towards 0).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path

import torch

import memory_plugins as mp
from memory_plugins.data import Document

TOKENIZER = "bpe8192"


def synthetic_documents(count: int, vocab: int, phrase: int, seed: int) -> list[Document]:
    """``count`` documents of 512..1023 tokens, each its own phrase of ``phrase`` tokens, repeated. Phrases
    follow one rule (every word has 4 possible successors, seed 0): the rule is learnt from the data, the
    choices a phrase made can only be recalled from memory of its earlier occurrence."""
    successors = torch.randint(1, vocab, (vocab, 4), generator=torch.Generator().manual_seed(0))  # (V, 4); 0 separates
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(count):
        length = int(torch.randint(512, 1024, (1,), generator=g))
        text = [int(torch.randint(1, vocab, (1,), generator=g))]
        for choice in torch.randint(0, 4, (phrase - 1,), generator=g).tolist():
            text.append(int(successors[text[-1], choice]))
        docs.append(Document(f"synthetic/{i}", torch.tensor(text).repeat(length // phrase + 1)[:length]))  # (L,)
    return docs


def load_documents(args: argparse.Namespace) -> tuple[list[Document], list[Document], int, int, str]:
    """Train and held-out documents, vocabulary size, separator id, and where they came from."""
    if not args.synthetic and (Path(args.data) / "manifest.json").is_file():
        from examples.lm.benchmark import longest, open_corpus

        corpus = open_corpus(Path(args.data), TOKENIZER, None)
        held_out = longest(corpus.valid, 4, 512)  # four held-out books, their first 512 tokens
        return corpus.train, held_out, corpus.vocab_size, corpus.bos, f"{args.data} ({TOKENIZER})"
    vocab = 256
    train = synthetic_documents(64, vocab, 2 * args.seg_len, seed=0)
    held_out = synthetic_documents(4, vocab, 2 * args.seg_len, seed=1)
    return train, held_out, vocab, 0, "synthetic documents"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", default="xl", choices=mp.list_memories())
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4,
                        help="lanes per process: documents read side by side (under torchrun, × processes in all)")
    parser.add_argument("--seg-len", type=int, default=32)
    parser.add_argument("--data", default="data/lm")
    parser.add_argument("--synthetic", action="store_true", help="ignore data/lm")
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from memory_plugins.integrations.hf_trainer import MemoryTrainer, SegmentDataset

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="memory_plugins: this model has absolute position embeddings")
    torch.manual_seed(0)
    train_docs, held_docs, vocab, bos, source = load_documents(args)
    config = GPT2Config(vocab_size=vocab, n_positions=args.seg_len, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=bos, eos_token_id=bos)
    options = {"xl": {"mem_len": 2 * args.seg_len}, "compressive": {"mem_len": args.seg_len, "cmem_len": args.seg_len // 2},
               "continuous": {"n_basis": 64, "stm_len": args.seg_len}}.get(args.memory, {})
    model = mp.wrap(GPT2LMHeadModel(config), args.memory, **options)
    cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun
    training = TrainingArguments(args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                 per_device_eval_batch_size=args.batch, learning_rate=4e-3, warmup_steps=20,
                                 logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=cpu, ddp_backend="gloo" if cpu and launched else None)
    lanes = args.batch * training.world_size  # every process reads its own --batch lanes of each step
    train = SegmentDataset(train_docs, lanes, args.seg_len, train=True, bos=bos)
    held_out = SegmentDataset(held_docs, lanes, args.seg_len, bos=bos, short="drop")
    trainer = MemoryTrainer(model=model, args=training, train_dataset=train, eval_dataset=held_out)
    say = print if trainer.is_world_process_zero() else (lambda *a, **k: None)
    say(f"{source}: {len(train_docs)} training documents; GPT-2 with {args.memory} memory, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {training.world_size} process(es)")

    before = trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    with model.memory_disabled():
        without = trainer.evaluate()["eval_loss"]
    say(f"held-out loss before {before:.3f} (ppl {math.exp(before):.0f}), after {args.steps} steps "
        f"{after:.3f} (ppl {math.exp(after):.1f}) in {seconds:.0f} s; "
        f"same model with the memory off {without:.3f}")


if __name__ == "__main__":
    main()
