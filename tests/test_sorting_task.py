"""The sorting task's generator, target ranking and oracles (paper §4.1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from examples.sorting.task import (
    IGNORE,
    NUM_SYMBOLS,
    SEP,
    generate,
    oracle_scores,
    ranking,
    score,
    teacher_forced_predictions,
)


@pytest.fixture(autouse=True)
def _on_the_cpu() -> Iterator[None]:
    """The task and its oracles are CPU code (data is made there whatever the test device)."""
    with torch.device("cpu"):
        yield


def test_generator_is_deterministic_and_seeded() -> None:
    a, b, c = generate(6, 500, seed=3), generate(6, 500, seed=3), generate(6, 500, seed=4)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert torch.equal(generate(6, 500, seed=3, chunk=4).tokens[:4], generate(4, 500, seed=3, chunk=4).tokens)


def test_layout_counts_and_ranking() -> None:
    batch = generate(5, 300, seed=0)
    x = batch.tokens[:, :300]
    assert torch.all(batch.tokens[:, 300] == SEP) and x.max() < NUM_SYMBOLS
    for i in range(5):
        counts = torch.bincount(x[i], minlength=NUM_SYMBOLS)
        assert torch.equal(counts, batch.counts[i])
        expected = sorted(range(NUM_SYMBOLS), key=lambda s: (-int(counts[s]), s))
        assert batch.tokens[i, 301:].tolist() == expected


def test_ties_are_broken_by_the_smaller_symbol() -> None:
    counts = torch.tensor([[3, 5, 5, 0] + [0] * 16])
    assert ranking(counts)[0, :5].tolist() == [1, 2, 0, 3, 4]


def test_distribution_drifts_from_p_init_to_p_final() -> None:
    """First and last quarters differ far more than the two middle quarters: the mixture drifts."""
    batch = generate(200, 4000, seed=1)
    q = torch.nn.functional.one_hot(batch.tokens[:, :4000], NUM_SYMBOLS).view(200, 4, 1000, NUM_SYMBOLS)
    freq = q.sum(2).float() / 1000  # (B, 4 quarters, S)
    far = (freq[:, 0] - freq[:, 3]).abs().sum(1).mean()
    near = (freq[:, 1] - freq[:, 2]).abs().sum(1).mean()
    assert far > 1.5 * near


def test_teacher_forced_targets_sit_on_sep_and_ranks() -> None:
    batch = generate(2, 50, seed=0)
    inputs, targets = batch.inputs_and_targets()
    assert inputs.shape == targets.shape == (2, 50 + NUM_SYMBOLS)
    assert torch.all(targets[:, :50] == IGNORE)
    assert torch.equal(targets[:, 50:], batch.tokens[:, 51:])
    assert torch.all(inputs[:, 50] == SEP)
    lm_inputs, lm_targets = batch.inputs_and_targets(lm_loss=True)  # sequence positions trained too
    assert torch.equal(lm_inputs, inputs) and torch.equal(lm_targets[:, 50:], targets[:, 50:])
    assert torch.equal(lm_targets[:, :50], batch.tokens[:, 1:51])  # next token, the last one is SEP


def test_oracles_bracket_the_task() -> None:
    batch = generate(300, 2000, seed=2)
    scores = oracle_scores(batch, window=250)
    full, window = scores["full-count oracle"], scores["window oracle (W=250)"]
    assert full.accuracy == 1.0 and full.exact_match == 1.0
    assert 0.1 < window.accuracy < 0.6 and window.accuracy_ci95 > 0
    whole = oracle_scores(batch, window=2000)["window oracle (W=2000)"]
    assert whole.accuracy == 1.0  # a window covering everything is the full-count oracle


def test_teacher_forcing_skips_ranked_symbols_and_score_counts_exact_matches() -> None:
    target = ranking(torch.arange(NUM_SYMBOLS).flip(0)[None])  # 0, 1, 2, ...
    scores = torch.zeros(1, NUM_SYMBOLS)
    scores[0, 5] = 10  # a counter convinced that symbol 5 is the most frequent
    preds = teacher_forced_predictions(scores, target)
    assert preds[0, :6].tolist() == [5] * 6  # 5 stays the guess until the true ranks reach it
    assert preds[0, 6:].tolist() == list(range(6, NUM_SYMBOLS))  # then the tie rule takes over
    s = score(preds, target)
    assert abs(s.accuracy - 15 / 20) < 1e-6 and s.exact_match == 0.0
