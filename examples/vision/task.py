"""A synthetic streaming-vision task whose label was shown once, in the first frame.

Notation: b batch, T frames per sequence, S frame side in pixels, K cue classes.

Each sequence is T single-channel S×S frames over Gaussian noise:

* frame 0, the **cue**: a bright square filling one of the K = 4 quadrants; the label is that quadrant;
* frames 1 … T-2, **distractors**: a bright bar (horizontal or vertical) at a random place;
* frame T-1, the **query**: the same diagonal cross in every sequence, where the answer is read.

Every frame is one forward of a ViT (one segment), so the answer needs a memory that reaches T-1
frames back. The label is independent of every frame but the first: a model that sees only the last
segment (or a window of frames that misses frame 0, as XL with ``mem_len`` of one or two frames does
for T ≥ 4) can do no better than chance, 1/K.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

K = 4  # cue classes (quadrants)


def make_sequences(b: int, frames: int, side: int = 16, noise: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``b`` sequences: frames (T, b, 1, S, S) and labels (b,) in 0 … K-1, drawn from ``seed``."""
    if frames < 2 or side % 2:
        raise ValueError(f"make_sequences: frames must be >= 2 and side even, got frames={frames}, side={side}")
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(frames, b, 1, side, side, generator=g, device="cpu")  # (T, b, 1, S, S) CPU data
    labels = torch.randint(0, K, (b,), generator=g, device="cpu")  # (b,)
    half = side // 2
    for i, label in enumerate(labels.tolist()):  # cue: one quadrant lit
        r, c = divmod(label, 2)
        x[0, i, 0, r * half:(r + 1) * half, c * half:(c + 1) * half] += 2.0
    length, width = half, max(1, side // 8)
    for t in range(1, frames - 1):  # distractors: a bar anywhere
        for i in range(b):
            r, c = torch.randint(0, side - length + 1, (2,), generator=g, device="cpu").tolist()
            if bool(torch.randint(0, 2, (1,), generator=g, device="cpu")):
                x[t, i, 0, r:r + width, c:c + length] += 2.0
            else:
                x[t, i, 0, r:r + length, c:c + width] += 2.0
    eye = torch.eye(side, dtype=torch.bool, device="cpu")
    x[-1, :, 0] += 2.0 * (eye | eye.flip(1))  # query: a fixed cross
    return x, labels


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of an accuracy ``correct / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
