import json

import numpy as np
import pytest
from conftest import manifest, run_cli

from kdcache.beton import beton_labels, dataset_info
from kdcache.errors import UserError
from kdcache.selection import (
    ccs,
    ccs_allocate,
    choose_subset,
    class_budgets,
    save_selection,
    select,
)
from kdcache.store import open_store, write_score


def toy(n=403, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, n), rng.random(n)


# ---- select() -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["random", "el2n", "ccs"])
@pytest.mark.parametrize("balanced", [False, True])
def test_exact_count_sorted_unique_and_deterministic(method, balanced):
    labels, h = toy()
    for fraction in (1e-4, 0.1, 0.3, 0.5, 0.95, 1.0):
        idx = select(method, fraction, labels, hardness=h, class_balanced=balanced, seed=3)
        assert idx.dtype == np.int64
        assert len(idx) == max(1, round(fraction * len(labels)))
        assert (np.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < len(labels)
        np.testing.assert_array_equal(idx, select(method, fraction, labels, hardness=h,
                                                  class_balanced=balanced, seed=3))
    assert len(select(method, 1.0, labels, hardness=h, class_balanced=balanced)) == len(labels)


def test_seed_changes_random_choice():
    labels, _ = toy()
    a, b = select("random", 0.3, labels, seed=0), select("random", 0.3, labels, seed=1)
    assert len(np.intersect1d(a, b)) < len(a)


def test_keep_hard_and_easy_take_the_ends_with_seeded_tie_breaks():
    labels = np.zeros(10, dtype=np.int64)
    h = np.array([5, 1, 9, 3, 7, 2, 8, 0, 6, 4], dtype=float)
    np.testing.assert_array_equal(select("s", 0.3, labels, hardness=h), [2, 4, 6])  # 9, 7, 8
    np.testing.assert_array_equal(select("s", 0.3, labels, hardness=h, keep="easy"), [1, 5, 7])  # 1, 2, 0
    # ties (forgetting counts often tie): all of the top level first, the rest decided by the seed
    tied = np.array([2, 2, 2, 2, 1, 1, 0, 0, 0, 0], dtype=float)
    picks = {tuple(select("s", 0.5, labels, hardness=tied, seed=s)) for s in range(20)}
    assert all({0, 1, 2, 3} <= set(p) and len(set(p) & {4, 5}) == 1 for p in picks)
    assert len(picks) == 2  # both of the tied samples 4 and 5 get picked under some seed


def test_class_balanced_counts_follow_each_class():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = select("random", 0.3, labels, class_balanced=True)
    np.testing.assert_array_equal(np.bincount(labels[idx]), [15, 9, 6])
    # round(f * n_c) per class, then the remainder spread deterministically to hit round(f * N)
    np.testing.assert_array_equal(class_budgets(labels, 0.25, 25), [12, 8, 5])  # 12.5->12, 7.5->8, 5
    np.testing.assert_array_equal(class_budgets(np.repeat([0, 1, 2], 3), 0.5, 4), [1, 1, 2])  # 2,2,2 -> 4
    np.testing.assert_array_equal(class_budgets(np.repeat([0, 1, 2], [5, 7, 9]), 0.4, 8), [2, 3, 3])
    np.testing.assert_array_equal(class_budgets(np.repeat([0, 1], [1, 1000]), 1e-4, 1), [0, 1])
    labels, h = toy(1000, 10)
    for fraction in (0.01, 0.137, 0.5):
        counts = np.bincount(labels[select("el2n", fraction, labels, hardness=h, class_balanced=True)],
                             minlength=10)
        assert counts.sum() == round(fraction * 1000)
        assert (np.abs(counts - fraction * np.bincount(labels)) < 1.5).all()


def test_class_balanced_score_keeps_hardest_within_each_class():
    labels = np.repeat([0, 1], 5)
    h = np.array([1, 2, 3, 4, 5, 10, 20, 30, 40, 50], dtype=float)
    np.testing.assert_array_equal(select("s", 0.4, labels, hardness=h, class_balanced=True), [3, 4, 8, 9])
    np.testing.assert_array_equal(select("s", 0.4, labels, hardness=h), [6, 7, 8, 9])


def test_ccs_allocation_smallest_stratum_first():
    # sizes 0, 2, 5, 100, 3 with budget 20: 2 -> 2 (share 5), 3 -> 3 (share 6), 5 -> 5 (share 7), 100 -> 10
    np.testing.assert_array_equal(ccs_allocate(np.array([0, 2, 5, 100, 3]), 20), [0, 2, 5, 10, 3])
    np.testing.assert_array_equal(ccs_allocate(np.array([10, 10, 10]), 7), [2, 2, 3])
    np.testing.assert_array_equal(ccs_allocate(np.array([4, 1]), 5), [4, 1])


def test_ccs_drops_hardest_beta_then_samples_each_stratum():
    # 100 samples, hardness 0..99; beta 0.1 drops 90..99; 3 strata over [0, 89] of width 29.67:
    # [0, 29] 30, [30, 59] 30, [60, 89] 30 samples; budget 30 -> 10 from each
    h = np.arange(100, dtype=float)
    for seed in range(5):
        idx = select("ccs", 0.3, np.zeros(100, np.int64), hardness=h, ccs_beta=0.1, ccs_strata=3, seed=seed)
        assert idx.max() < 90
        np.testing.assert_array_equal(np.bincount(idx // 30, minlength=3), [10, 10, 10])
    # skewed scores: 80 easy samples in one stratum, 10 in each of two others; budget 24 -> 8 each
    h = np.concatenate([np.zeros(80), np.full(10, 5.0), np.full(10, 10.0)])
    pos = ccs(h, 24, np.random.default_rng(0), beta=0.0, strata=2)
    # two strata [0, 5) and [5, 10]: sizes 80 and 20 -> 12 each
    assert (h[pos] == 0).sum() == 12 and (h[pos] > 0).sum() == 12
    pos = ccs(h, 24, np.random.default_rng(0), beta=0.0, strata=3)
    np.testing.assert_array_equal(np.bincount(h[pos].astype(int) // 5), [8, 8, 8])
    # budget above what survives the drop: the drop shrinks so the count stays exact
    assert len(select("ccs", 0.95, np.zeros(100, np.int64), hardness=np.arange(100.0))) == 95


def test_select_rejects_bad_input():
    labels, h = toy(20)
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"\(0, 1\]"):
            select("random", fraction, labels)
    with pytest.raises(UserError, match="needs a score"):
        select("el2n", 0.5, labels)
    h[3] = np.nan
    with pytest.raises(UserError, match="missing .NaN. for 1 samples, e.g. index 3"):
        select("el2n", 0.5, labels, hardness=h)
    with pytest.raises(UserError, match="keep"):
        select("random", 0.5, labels, keep="middle")


# ---- store, CLI, sidecar ------------------------------------------------------------------------------

@pytest.fixture
def store(synth, tmp_path):
    """A store like a logit cache's: fingerprint, labels, two scores of opposite orientation."""
    labels = beton_labels(synth / "train.beton")
    n = len(labels)
    root = open_store(str(tmp_path / "cache.zarr"), "w")
    root.attrs.update({"train_fingerprint": manifest(synth)["splits"]["train"]["fingerprint"], "num_classes": 4,
                       "schema_version": 2})
    root.create_array("labels", shape=(n,), dtype="int64")[:] = labels
    write_score(root, "el2n", np.arange(n) / n, higher_is_harder=True)
    write_score(root, "margin", np.arange(n) / n, higher_is_harder=False)
    return tmp_path / "cache.zarr"


def test_select_cli_writes_indices_and_sidecar(synth, store, tmp_path):
    out = tmp_path / "sel" / "hard.npy"
    result = run_cli("select", "--store", store, "--method", "el2n", "--fraction", 0.25,
                     "--data", synth / "train.beton", "--out", out)
    idx = np.load(out)
    np.testing.assert_array_equal(idx, np.arange(300, 400))  # the highest el2n
    side = json.loads(out.with_suffix(".json").read_text())
    labels = beton_labels(synth / "train.beton")
    assert side["method"] == "el2n" and side["fraction"] == 0.25 and side["seed"] == 0 and side["keep"] == "hard"
    assert side["score_source"] == {"store": str(store), "score": "el2n"}
    assert side["num_selected"] == 100 and side["num_samples"] == 400
    assert side["class_counts"] == np.bincount(labels[idx], minlength=4).tolist()
    assert "selected 100 of 400" in result.output and str(side["class_counts"]) in result.output

    # margin is higher = easier: keeping the hard end means the lowest margins
    run_cli("select", "--store", store, "--method", "margin", "--fraction", 0.25, "--out", tmp_path / "m.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.arange(100))
    run_cli("select", "--store", store, "--method", "margin", "--fraction", 0.25, "--keep", "easy",
            "--out", tmp_path / "m.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.arange(300, 400))

    # random needs only the data; class-balanced uses the data's labels; CCS reads --ccs-score
    run_cli("select", "--method", "random", "--fraction", 0.5, "--class-balanced", "--data",
            synth / "train.beton", "--out", tmp_path / "r.npy")
    side = json.loads((tmp_path / "r.json").read_text())
    assert side["score_source"] is None and side["class_balanced"] is True
    np.testing.assert_allclose(side["class_counts"], np.bincount(labels) * 0.5, atol=1)
    run_cli("select", "--store", store, "--method", "ccs", "--ccs-score", "margin", "--fraction", 0.3,
            "--ccs-strata", 10, "--out", tmp_path / "c.npy")
    idx = np.load(tmp_path / "c.npy")
    assert len(idx) == 120 and idx.min() >= 40  # beta 0.1 dropped the 40 lowest margins (the hardest)
    side = json.loads((tmp_path / "c.json").read_text())
    assert side["score_source"]["score"] == "margin" and side["ccs_strata"] == 10


def test_choose_subset_matches_select(synth, store):
    info = dataset_info(synth / "train.beton")
    idx, side = choose_subset(info, "el2n", 0.1, store=str(store), class_balanced=True, seed=4)
    labels = beton_labels(synth / "train.beton")
    np.testing.assert_array_equal(idx, select("el2n", 0.1, labels, hardness=np.arange(400) / 400,
                                              class_balanced=True, seed=4))
    assert side["num_selected"] == 40 and sum(side["class_counts"]) == 40


def test_save_selection_without_npy_suffix(tmp_path):
    save_selection(tmp_path / "subset", np.array([3, 1]), {"method": "random"})
    assert np.load(tmp_path / "subset", allow_pickle=False).tolist() == [3, 1]
    assert json.loads((tmp_path / "subset.json").read_text()) == {"method": "random"}
    assert not list(tmp_path.glob("*.tmp"))


def test_select_cli_bad_input_is_one_line_exit_2(synth, store, tmp_path):
    train = synth / "train.beton"
    out = ("--out", tmp_path / "x.npy")
    r = run_cli("select", "--store", store, "--method", "grand", "--fraction", 0.5, *out, expect=2)
    assert "error: store" in r.output and "has no score 'grand'; it has: el2n, margin" in r.output
    assert r.output.strip().count("\n") == 0  # one line, no traceback
    for fraction in (0, 1.5, -1):
        r = run_cli("select", "--store", store, "--method", "el2n", "--fraction", fraction, *out, expect=2)
        assert "fraction must be in (0, 1]" in r.output
    other = open_store(str(tmp_path / "other.zarr"), "w")
    other.attrs.update({"train_fingerprint": "f" * 32, "schema_version": 2})
    write_score(other, "el2n", np.zeros(400))
    r = run_cli("select", "--store", tmp_path / "other.zarr", "--method", "el2n", "--fraction", 0.5,
                "--data", train, *out, expect=2)
    assert "another dataset" in r.output
    r = run_cli("select", "--store", tmp_path / "other.zarr", "--method", "el2n", "--fraction", 0.5, *out, expect=2)
    assert "no labels array" in r.output and "--data" in r.output
    r = run_cli("select", "--method", "random", "--fraction", 0.5, *out, expect=2)
    assert "needs a --store" in r.output
    r = run_cli("select", "--method", "el2n", "--fraction", 0.5, "--data", train, *out, expect=2)
    assert "--method el2n needs a --store" in r.output
    r = run_cli("select", "--store", tmp_path / "missing.zarr", "--method", "el2n", "--fraction", 0.5, *out, expect=2)
    assert "no kdcache store" in r.output
    r = run_cli("select", "--store", store, "--method", "el2n", "--fraction", 0.5, "--data",
                synth / "test.beton", *out, expect=2)
    assert "test split" in r.output
    r = run_cli("select", "--store", store, "--method", "ccs", "--ccs-beta", 1, "--fraction", 0.5, *out, expect=2)
    assert "--ccs-beta must be in [0, 1)" in r.output
    assert not (tmp_path / "x.npy").exists()


def test_ccs_over_tied_counts_is_deterministic_and_spreads_over_strata():
    """Forgetting counts are small integers: most samples tie. CCS must still fill its budget exactly,
    spread it over the strata, and depend on the seed only."""
    from kdcache.selection import select

    rng = np.random.default_rng(0)
    counts = rng.choice([0, 0, 0, 0, 1, 1, 2, 3, 7], size=300).astype(float)  # heavy ties, one rare value
    labels = np.arange(300) % 3
    a = select("ccs", 0.2, labels, hardness=counts, seed=4, ccs_beta=0.1, ccs_strata=5)
    b = select("ccs", 0.2, labels, hardness=counts, seed=4, ccs_beta=0.1, ccs_strata=5)
    assert len(a) == 60 and len(np.unique(a)) == 60 and np.array_equal(a, b)
    assert not np.array_equal(a, select("ccs", 0.2, labels, hardness=counts, seed=5, ccs_beta=0.1, ccs_strata=5))
    kept = set(counts[a].tolist())
    assert {0.0, 1.0, 2.0} <= kept  # the common values are all covered
    n7 = int((counts == 7).sum())
    assert (counts[a] == 7).sum() <= n7 - 30  # the hardest 10% (30 samples, all 7s) were dropped first
