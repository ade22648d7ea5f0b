"""Sparse Logit Sampling: the sampled target is an unbiased estimate of the tempered teacher."""
import numpy as np
import pytest

from kdcache.sparse import sample_targets, uniforms
from kdcache.store import sampled_target


def tempered(logits: np.ndarray, t: float) -> np.ndarray:
    z = logits / t
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_sampled_target_averages_to_the_tempered_distribution(t):
    """Each teacher row is sampled for n different sample indices; the mean of q = counts / S over them
    must be p_T. Var(q_c) = p_c (1 - p_c) / S per sample, so the mean's standard error is
    sqrt(p_c (1 - p_c) / (S n)); we allow 5 of them (a false alarm in 1.7 million per class if the draws
    are independent; the draws are seeded, so the test itself is deterministic)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(6, 10))
    logits[0] = 0  # uniform
    logits[1, 3] = 30  # nearly one-hot
    p = tempered(logits, t)
    s, n = 8, 5000
    for row, p_row in enumerate(p):
        probs = np.repeat(p_row[None], n, axis=0)
        classes, counts = sample_targets(probs, np.arange(row * n, (row + 1) * n), s, seed=7)
        assert classes.shape == counts.shape == (n, 8) and (counts.sum(1) == s).all()
        mean = sampled_target(classes, counts, 10).mean(0)
        bound = 5 * np.sqrt(p_row * (1 - p_row) / (s * n)) + 1e-12
        assert (np.abs(mean - p_row) <= bound).all(), (row, mean - p_row, bound)


def test_draws_depend_on_seed_index_and_draw_only():
    index = np.array([5, 17, 3, 99_999_999])
    u = uniforms(0, index, 4)
    assert u.shape == (4, 4) and (u >= 0).all() and (u < 1).all()
    np.testing.assert_array_equal(uniforms(0, index[::-1], 4), u[::-1])  # batch order does not matter
    np.testing.assert_array_equal(uniforms(0, index[1:2], 4), u[1:2])    # nor batch composition
    assert not np.array_equal(uniforms(1, index, 4), u)                  # the seed does
    assert len(np.unique(u)) == u.size
    flat = uniforms(3, np.arange(20000), 5).ravel()  # roughly uniform: deciles within 5% of 10,000
    assert (np.abs(np.histogram(flat, bins=10, range=(0, 1))[0] - 10000) < 500).all()


def test_classes_are_distinct_most_drawn_first_and_never_improbable():
    p = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    classes, counts = sample_targets(p, np.array([0, 1]), 6, seed=0)
    assert classes.shape == (2, 4)
    for c, k in zip(classes, counts):
        assert len(set(c.tolist())) == 4 and (np.diff(k) <= 0).all() and k.sum() == 6
    q = sampled_target(classes, counts, 4)
    assert (q[0, 2:] == 0).all() and q[1].tolist() == [0, 0, 0, 1]  # a class of probability 0 is never drawn
