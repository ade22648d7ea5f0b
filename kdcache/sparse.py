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

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a well-mixed 64-bit value from each 64-bit counter (vectorised)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, index: np.ndarray, draws: int) -> np.ndarray:
    """(len(index), draws) float64 in [0, 1), a function of (seed, index, draw) only."""
    index = np.asarray(index, dtype=np.uint64)
    counter = index[:, None] * np.uint64(draws) + np.arange(draws, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _splitmix64(counter ^ _splitmix64(np.full(1, seed, dtype=np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits: exact in a double


def sample_targets(probs: np.ndarray, index: np.ndarray, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `draws` classes per row of `probs` (B, C), with replacement; return (classes, counts), each
    (B, min(draws, C)): the drawn classes, most drawn first, and how often each was drawn (0 pads)."""
    probs = np.asarray(probs, dtype=np.float64)
    b, c = probs.shape
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]  # rounding: the last class closes the interval at exactly 1
    u = uniforms(seed, index, draws)
    drawn = np.minimum((u[:, :, None] >= cdf[:, None, :]).sum(-1), c - 1)  # inverse CDF
    counts = np.zeros((b, c), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(b), draws), drawn.ravel()), 1)
    k = min(draws, c)
    classes = np.argsort(-counts, axis=1, kind="stable")[:, :k]
    return classes, np.take_along_axis(counts, classes, axis=1)


def target(classes: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """The sparse target q = counts / draws as (B, C) float64, zero off the drawn classes."""
    q = np.zeros((len(classes), num_classes))
    np.put_along_axis(q, classes.astype(np.int64), counts / counts.sum(1, keepdims=True), axis=1)
    return q
