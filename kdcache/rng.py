"""Counter-based randomness: values that are a function of (seed, stream, sample index, draw) only.

What a sample gets (its sparse teacher targets, its augmentation in an epoch) must not depend on which
batch, process, chunk or resumed run handles it; a generator's stream would. A hash of the counter does
not: splitmix64, whose output passes BigCrush as a generator of consecutive counters.
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


def uniforms(seed: int, index: np.ndarray, draws: int, stream: int = 0) -> np.ndarray:
    """(len(index), draws) float64 in [0, 1), a function of (seed, stream, index, draw) only. Streams
    keep independent uses apart (e.g. one per epoch)."""
    index = np.asarray(index, dtype=np.uint64)
    counter = index[:, None] * np.uint64(draws) + np.arange(draws, dtype=np.uint64)[None, :]
    key = _splitmix64(np.full(1, seed, dtype=np.uint64))
    if stream:
        key = _splitmix64(key ^ np.uint64(stream))
    bits = _splitmix64(counter ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits: exact in a double
