"""Sparse Logit Sampling (Anshumann et al., ACL 2025): unbiased sparse teacher targets.

Top-k keeps the teacher's largest probabilities and drops the rest, which is exactly the dark knowledge
distillation is for: a biased summary. Sampling S classes from the teacher's tempered distribution p_T
and keeping each drawn class with its count gives q = counts / S, with E[q] = p_T: the soft-target
gradient (q - softmax(student / T)) is unbiased, at S x (index + count) bytes per sample.

Draws depend only on (seed, sample index, draw number), through a counter-based hash, so a dump gives
the same targets whatever its batches, chunks, processes or interruptions.
"""
from __future__ import annotations

import numpy as np

from .rng import uniforms


def sample_targets(probs: np.ndarray, index: np.ndarray, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `draws` classes per row of `probs` (B, C), or per sample and stored view of (B, V, C), with
    replacement; return (classes, counts), each (B, [V,] min(draws, C)): the drawn classes, most drawn
    first, and how often each was drawn (0 pads). View v of a sample takes that sample's draws
    v * draws ... (v + 1) * draws - 1, so a one-view store draws what a clean-view store does."""
    probs = np.asarray(probs, dtype=np.float64)
    shape = probs.shape[:-1]
    c = probs.shape[-1]
    probs = probs.reshape(-1, c)
    b = len(probs)
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]  # rounding: the last class closes the interval at exactly 1
    views = b // len(index)
    u = uniforms(seed, index, views * draws).reshape(b, draws)
    drawn = np.minimum((u[:, :, None] >= cdf[:, None, :]).sum(-1), c - 1)  # inverse CDF
    counts = np.zeros((b, c), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(b), draws), drawn.ravel()), 1)
    k = min(draws, c)
    classes = np.argsort(-counts, axis=1, kind="stable")[:, :k]
    counts = np.take_along_axis(counts, classes, axis=1)
    return classes.reshape(*shape, k), counts.reshape(*shape, k)

