"""A Hugging Face GPT-2 with a plug-in memory: stream, train a few steps, generate, save and load.

    python examples/gpt2_memory.py [--memory continuous] [--segment 32] [--steps 20]

Uses a tiny random GPT-2 config (no download). Steps:

1. wrap ``GPT2LMHeadModel`` with a memory; with the continuous memory's zero-initialised output the
   wrapped model's logits equal the base model's on every segment (checked);
2. train a few steps on a synthetic stream whose second half repeats its first half, with
   :class:`memory_plugins.SegmentRunner` (task loss + the memory's aux loss);
3. ``generate()`` with the kv cache on: the memory is read at every step, written afterwards;
4. save the base model with ``save_pretrained`` and the memory beside it, load both back, and check
   that the loaded model continues the stream with the same logits.

With ``--memory xl`` or ``compressive`` a warning explains what absolute positions mean for them.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import memory_plugins as mp
from memory_plugins.adapters import hf

SMALL = {
    "continuous": dict(n_basis=64, stm_len=0),
    "xl": dict(mem_len=64),
    "compressive": dict(mem_len=32, cmem_len=16, compression_rate=2),
}


def stream(batch: int, length: int, vocab: int) -> torch.Tensor:
    """(b, 2·length) tokens: a random first half, repeated. The memory can help predict the second half."""
    first = torch.randint(2, vocab, (batch, length))
    return torch.cat([first, first], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="continuous", choices=sorted(SMALL))
    parser.add_argument("--segment", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    vocab, n = 128, args.segment

    config = GPT2Config(vocab_size=vocab, n_positions=n, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    base = GPT2LMHeadModel(config).eval()
    reference = copy.deepcopy(base)
    model = mp.wrap(base, args.memory, **SMALL[args.memory])

    # 1. A fresh memory changes nothing yet (continuous: zero-initialised output; XL: empty on segment 1).
    tokens = stream(2, 2 * n, vocab)  # (b, 4n)
    with torch.no_grad():
        first = model(tokens[:, :n]).logits
        diff = (first - reference(tokens[:, :n]).logits).abs().max().item()
    print(f"{args.memory}: first segment vs base GPT-2, max |Δlogit| = {diff:.1e}")
    model.reset_memory()

    # 2. A few training steps over streams of 4 segments (the runner resets the memory per batch).
    runner = mp.SegmentRunner(model, segment_len=n)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.steps):
        optim.zero_grad()
        out = runner(stream(8, 2 * n, vocab), backward=True)
        optim.step()
        if step % max(args.steps // 4, 1) == 0 or step == args.steps - 1:
            print(f"  step {step:3d}: loss {out.loss.item():.3f} (aux {out.aux_loss.item():.2e})")
    model.eval()

    # 3. Generation: prime the memory with a segment, then generate with the kv cache.
    model.reset_memory()
    tokens = stream(2, n, vocab)  # (b, 2n)
    with torch.no_grad():
        model(tokens[:, :n])
    out = model.generate(tokens[:, n : n + 4], max_new_tokens=8, do_sample=False, use_cache=True,
                         eos_token_id=None, write_memory=True)  # read at every step, written once at the end
    print("  generated:", out[0, 4:].tolist(), " memory holds", model.memory.state_size(), "numbers")

    # 4. Save beside save_pretrained, load back, continue the same stream.
    probe = stream(2, n, vocab)[:, :n]
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, save_memory_state=True)  # base weights + memory weights, config, state
        loaded = hf.from_pretrained(GPT2LMHeadModel, directory).eval()
        with torch.no_grad():
            diff = (loaded(probe).logits - model(probe).logits).abs().max().item()
    print(f"  saved and loaded: next segment max |Δlogit| = {diff:.1e}")
    if diff > 1e-5:
        raise SystemExit("the loaded model does not continue the stream like the saved one")


if __name__ == "__main__":
    main()
