"""SegmentRunner: streamed losses equal a full pass, document resets, truncated BPTT, early backward."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import memory_plugins as mp
from memory_plugins.models import ReferenceDecoder


def _model() -> ReferenceDecoder:
    return ReferenceDecoder(vocab_size=29, dim=32, depth=2, heads=4)


def test_streamed_token_loss_equals_one_full_pass() -> None:
    base = _model().eval()
    tokens = torch.randint(0, 29, (3, 101))
    logits = base(tokens[:, :-1])  # (b, 100, V)
    full = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (b, 100)
    out = mp.SegmentRunner(mp.wrap(base, "xl", mem_len=100), segment_len=17)(tokens)
    assert out.num_tokens == 300
    assert (out.token_loss - full).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - full.mean().item()) <= 1e-6
    agree = out.predictions == logits.argmax(-1)
    assert agree.float().mean() > 0.99  # argmax may flip only on float near-ties


def test_end_aligned_segments_keep_the_last_segment_full() -> None:
    base = _model().eval()
    tokens = torch.randint(0, 29, (2, 41))
    full = F.cross_entropy(base(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none")
    seen = []
    hook = base.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    out_end = mp.SegmentRunner(mp.wrap(base, "xl", mem_len=40), segment_len=16)(tokens, align="end")
    hook.remove()
    assert seen == [8, 16, 16]
    assert (out_end.token_loss - full).abs().max().item() <= 1e-5


def test_document_start_resets_only_that_sample() -> None:
    wrapped = mp.wrap(_model().eval(), "xl", mem_len=64)
    runner = mp.SegmentRunner(wrapped, segment_len=16)
    tokens = torch.randint(0, 29, (2, 64))
    doc_start = torch.zeros(2, 64, dtype=torch.bool)
    doc_start[1, 32] = True  # sample 1 starts a new document at a segment boundary
    targets = tokens.roll(-1, dims=1)
    out = runner(tokens, targets, doc_start=doc_start)
    plain = runner(tokens, targets)
    alone = runner(tokens[1:, 32:], targets[1:, 32:])  # the second document on its own
    assert torch.equal(out.token_loss[0], plain.token_loss[0])
    assert (out.token_loss[1, 32:] - alone.token_loss[0]).abs().max().item() <= 1e-6
    assert (out.token_loss[1, 32:] - plain.token_loss[1, 32:]).abs().max().item() > 1e-4


def test_a_document_starting_in_the_first_segment_of_a_continued_call_resets_that_sample() -> None:
    """With ``reset=False`` the call continues the streams: a document that starts in its first segment
    must not read the previous document's memory."""
    wrapped = mp.wrap(_model().eval(), "xl", mem_len=64)
    runner = mp.SegmentRunner(wrapped, segment_len=16)
    history, tokens = torch.randint(0, 29, (2, 32)), torch.randint(0, 29, (2, 32))
    targets = tokens.roll(-1, dims=1)
    doc_start = torch.zeros(2, 32, dtype=torch.bool)
    doc_start[1, 0] = True  # sample 1's new document starts at the call's first token
    runner(history, history.roll(-1, dims=1))
    kept = copy.deepcopy(wrapped.memory_state())
    out = runner(tokens, targets, doc_start=doc_start, reset=False)
    wrapped.set_memory_state(kept)
    wrapped.reset_memory(torch.tensor([False, True]))
    explicit = runner(tokens, targets, reset=False)
    wrapped.set_memory_state(kept)
    continued = runner(tokens, targets, reset=False)
    assert torch.equal(out.token_loss, explicit.token_loss)
    assert torch.equal(out.token_loss[0], continued.token_loss[0])
    assert (out.token_loss[1] - continued.token_loss[1]).abs().max().item() > 1e-4


def test_ignored_targets_and_grad_segments() -> None:
    wrapped = mp.wrap(_model(), "xl", mem_len=32)
    tokens = torch.randint(0, 29, (2, 48))
    targets = torch.full_like(tokens, -100)
    targets[:, -5:] = tokens[:, -5:]  # score only the last five positions (the sorting task's layout)
    out = mp.SegmentRunner(wrapped, segment_len=16)(tokens, targets, grad_segments=1)
    assert out.num_tokens == 10
    assert torch.all(out.token_loss[:, :-5] == 0)
    out.loss.backward()
    assert wrapped.model.embed.weight.grad is not None
    # only the last segment's tokens were run with gradients: embeddings of tokens seen only earlier get none
    early_only = set(tokens[:, :32].flatten().tolist()) - set(tokens[:, 32:].flatten().tolist())
    grad = wrapped.model.embed.weight.grad
    assert all(grad[t].abs().sum() == 0 for t in early_only)


def test_grad_segments_train_the_mean_loss_of_those_segments() -> None:
    """With targets in every segment, the objective of ``grad_segments=1`` is the mean over the last
    segment's targets: the same gradient as that mean computed by hand (earlier segments' targets
    must not shrink it by their share, 2/3 here), with or without the early ``backward``."""
    base = _model()
    tokens = torch.randint(0, 29, (2, 49))  # 48 inputs: 3 segments of 16

    def grads(how: str) -> list[torch.Tensor]:
        wrapped = mp.wrap(copy.deepcopy(base), "xl", mem_len=32)
        runner = mp.SegmentRunner(wrapped, segment_len=16)
        if how == "by hand":
            with torch.no_grad():
                wrapped(tokens[:, :16])
                wrapped(tokens[:, 16:32])
            logits = wrapped(tokens[:, 32:48])  # (b, 16, V)
            F.cross_entropy(logits.transpose(1, 2), tokens[:, 33:]).backward()
        elif how == "loss":
            out = runner(tokens, grad_segments=1)
            assert out.num_tokens == 96 and out.token_loss.shape == (2, 48)
            out.loss.backward()
        else:
            runner(tokens, grad_segments=1, backward=True)
        return [p.grad.clone() for p in wrapped.model.parameters()]

    ref = grads("by hand")
    for how in ("loss", "backward"):
        assert all((g - r).abs().max() <= 1e-6 * (1 + r.abs().max()) for g, r in zip(grads(how), ref)), how


def _early_embedding_grad(bptt: int, tokens: torch.Tensor, base: ReferenceDecoder, detach: bool | None = None,
                          backward: bool = False) -> torch.Tensor:
    """Gradient of the last segment's loss on the embeddings of tokens 0..9 (seen only in segment 1);
    with ``backward`` the runner's own backward of every window's loss."""
    wrapped = mp.wrap(copy.deepcopy(base), "xl", mem_len=48, detach=bptt == 1 if detach is None else detach)
    out = mp.SegmentRunner(wrapped, segment_len=16, bptt_segments=bptt)(tokens, backward=backward)
    if not backward:
        out.token_loss[:, 32:].sum().backward()
    return wrapped.model.embed.weight.grad[:10]


def test_a_window_of_one_segment_stops_the_gradient_of_a_memory_that_keeps_it() -> None:
    """bptt_segments=1 (the default) is the paper's stop-gradient between segments also for a memory
    built with detach=False: the runner cuts the graph at every window's end."""
    base = _model()
    tokens = torch.cat([torch.randint(0, 10, (2, 16)), torch.randint(10, 29, (2, 33))], dim=1)
    assert _early_embedding_grad(1, tokens, base, detach=False).abs().sum() == 0
    # each window's own backward: no "backward through the graph a second time", the detached memory's gradients
    kept, detached = (_early_embedding_grad(1, tokens, base, detach=d, backward=True) for d in (False, True))
    assert torch.equal(kept, detached)


def test_truncated_bptt_window_controls_how_far_gradients_reach() -> None:
    base = _model()
    # tokens 0..9 only in the first segment, 10..28 afterwards: gradients on embeddings 0..9 can only
    # come through the memory.
    tokens = torch.cat([torch.randint(0, 10, (2, 16)), torch.randint(10, 29, (2, 33))], dim=1)
    assert _early_embedding_grad(1, tokens, base).abs().sum() == 0  # detached memory: nothing flows back
    assert _early_embedding_grad(3, tokens, base).abs().sum() > 0  # window of 3 segments reaches segment 1
    assert _early_embedding_grad(2, tokens, base).abs().sum() == 0  # window of 2 segments does not


def test_early_backward_gives_the_same_gradients_as_one_backward() -> None:
    base = _model()
    tokens = torch.randint(0, 29, (2, 65))
    grads = []
    for early in (False, True):
        wrapped = mp.wrap(copy.deepcopy(base), "xl", mem_len=32, detach=False)
        out = mp.SegmentRunner(wrapped, segment_len=16, bptt_segments=2)(tokens, backward=early)
        if not early:
            out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in wrapped.model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
