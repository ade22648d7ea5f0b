import json
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from conftest import run_cli

from kdcache.errors import UserError
from kdcache.store import (
    LOGITS_KIND,
    LogitCache,
    describe_store,
    hardness,
    index_dtype,
    open_store,
    read_score,
    score_names,
    write_score,
)


def hand_made_cache(path, *, n=10, c=6, k=None, chunk_rows=4, done=None, fingerprint="fp"):
    """A logit cache written directly (no teacher), as `kdcache dump` lays it out."""
    g = zarr.create_group(store=str(path), attributes={
        "kind": LOGITS_KIND, "schema_version": 2, "train_fingerprint": fingerprint, "num_samples": n,
        "num_classes": c, "chunk_rows": chunk_rows, "topk": k, "temperature": 1.0 if k else None})
    m = -(-n // chunk_rows)
    flags = g.create_array("chunks_done", shape=(m,), dtype="uint8", chunks=(1,), fill_value=0)
    flags[:] = np.ones(m, np.uint8) if done is None else np.asarray(done, np.uint8)
    g.create_array("labels", shape=(n,), dtype="int64", chunks=(chunk_rows,))[:] = np.arange(n) % c
    return g


def test_index_dtype_is_smallest_holding_every_class():
    assert index_dtype(10) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16 and index_dtype(65536) == np.uint16
    assert index_dtype(65537) == np.uint32


def test_full_cache_reads_rows_in_requested_order(tmp_path):
    g = hand_made_cache(tmp_path / "s.zarr", n=10, c=6)
    logits = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float16)
    g.create_array("logits", shape=(10, 6), dtype="float16", chunks=(4, 6))[:] = logits
    cache = LogitCache(str(tmp_path / "s.zarr"))
    idx = np.array([7, 2, 2, 9, 0])
    got = cache.logits(idx)
    assert got.dtype == np.float32 and got.shape == (5, 6)
    np.testing.assert_array_equal(got, logits[idx].astype(np.float32))
    np.testing.assert_array_equal(cache.labels(), np.arange(10) % 6)
    assert cache.labels().dtype == np.int64
    assert (cache.num_samples, cache.num_classes, cache.topk, cache.bytes_per_sample) == (10, 6, None, 12)
    assert LogitCache("file://" + str(tmp_path / "s.zarr")).num_samples == 10  # URLs too


def test_topk_reconstruction_spreads_remaining_mass(tmp_path):
    n, c, k = 8, 7, 3
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(n, c))
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-log_p, axis=1)[:, :k]
    values = np.take_along_axis(log_p, top, 1).astype(np.float16)
    g = hand_made_cache(tmp_path / "s.zarr", n=n, c=c, k=k)
    g.create_array("topk_values", shape=(n, k), dtype="float16", chunks=(4, k))[:] = values
    g.create_array("topk_indices", shape=(n, k), dtype="uint8", chunks=(4, k))[:] = top.astype(np.uint8)

    cache = LogitCache(str(tmp_path / "s.zarr"))
    assert cache.topk == k and cache.bytes_per_sample == k * (2 + 1)
    got = cache.logits(np.arange(n))
    assert got.shape == (n, c) and got.dtype == np.float32
    for i in range(n):
        rest = [j for j in range(c) if j not in top[i]]
        np.testing.assert_array_equal(got[i, top[i]], values[i].astype(np.float32))
        expected_rest = np.log((1 - np.exp(values[i].astype(np.float64)).sum()) / (c - k))
        np.testing.assert_allclose(got[i, rest], expected_rest, rtol=1e-5)
    # a distribution: softmax of the reconstruction is exp of it (the log-probabilities sum to 1)
    p = np.exp(got.astype(np.float64))
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    # the stored classes keep the teacher's probabilities (to float16 precision)
    np.testing.assert_allclose(np.take_along_axis(p, top, 1), np.exp(np.take_along_axis(log_p, top, 1)),
                               rtol=2e-3)


def test_incomplete_store_is_refused_with_missing_count(tmp_path):
    hand_made_cache(tmp_path / "s.zarr", n=10, chunk_rows=4, done=[1, 0, 0])
    with pytest.raises(UserError, match="incomplete: 2 of 3 chunks missing"):
        LogitCache(str(tmp_path / "s.zarr"))
    g = open_store(str(tmp_path / "s.zarr"), "r+")
    write_score(g, "loss", np.zeros(10))
    with pytest.raises(UserError, match="incomplete: 2 of 3 chunks missing"):
        read_score(g, "loss")  # selection must not rank unwritten rows
    assert describe_store(str(tmp_path / "s.zarr"))["scores"]["loss"]["max"] == 0.0  # info still works


def test_other_dataset_and_non_cache_are_refused(tmp_path):
    g = hand_made_cache(tmp_path / "s.zarr", fingerprint="aaa")
    g.create_array("logits", shape=(10, 6), dtype="float16", chunks=(4, 6))
    info = SimpleNamespace(path="x/train.beton", train_fingerprint="bbb")  # the DatasetInfo fields it reads
    with pytest.raises(UserError, match="another dataset"):
        LogitCache(str(tmp_path / "s.zarr"), info)
    LogitCache(str(tmp_path / "s.zarr"), SimpleNamespace(path="x", train_fingerprint="aaa"))

    scores_only = open_store(str(tmp_path / "dyn.zarr"), "w")
    scores_only.attrs.update({"train_fingerprint": "aaa", "schema_version": 2})
    write_score(scores_only, "forgetting", np.arange(5.0))
    with pytest.raises(UserError, match="not a teacher-logit cache"):
        LogitCache(str(tmp_path / "dyn.zarr"))
    with pytest.raises(UserError, match="no kdcache store"):
        LogitCache(str(tmp_path / "nothing.zarr"))


def test_score_functions_keep_working(tmp_path):
    g = open_store(str(tmp_path / "s.zarr"), "w")
    write_score(g, "margin", np.array([3.0, -1.0, 0.5]), higher_is_harder=False, description="m")
    write_score(g, "loss", np.array([0.1, 2.0, 0.7]))
    assert score_names(g) == ["loss", "margin"]
    np.testing.assert_array_equal(hardness(g, "margin"), [-3.0, 1.0, -0.5])
    np.testing.assert_array_equal(read_score(g, "loss"), np.float32([0.1, 2.0, 0.7]))


def test_info_on_a_store_of_scores_only(tmp_path):
    g = open_store(str(tmp_path / "dyn.zarr"), "w")
    g.attrs["train_fingerprint"] = "abc"
    write_score(g, "forgetting", np.array([0.0, 4.0, 1.0, 2.0]), description="forgetting events")
    d = describe_store(str(tmp_path / "dyn.zarr"))
    assert d["complete"] and d["bytes_per_sample"] is None
    assert d["scores"]["forgetting"] == {"min": 0.0, "median": 1.5, "max": 4.0, "higher_is_harder": True,
                                         "description": "forgetting events"}
    out = run_cli("info", tmp_path / "dyn.zarr").output
    assert "scores/forgetting" in out and "fingerprint abc" in out
    assert json.loads(run_cli("info", tmp_path / "dyn.zarr", "--json").output)["arrays"][
        "scores/forgetting"]["shape"] == [4]
    assert "no kdcache store" in run_cli("info", tmp_path / "missing.zarr", expect=2).output


def test_info_statistics_cover_finished_chunks_only(tmp_path):
    g = hand_made_cache(tmp_path / "s.zarr", n=10, c=6, chunk_rows=4, done=[1, 0, 1])
    write_score(g, "loss", np.arange(10.0) * 10)  # rows 4-7 belong to the unfinished chunk
    stats = describe_store(str(tmp_path / "s.zarr"))["scores"]["loss"]
    assert (stats["min"], stats["median"], stats["max"]) == (0.0, 25.0, 90.0)  # of 0, 10, 20, 30, 80, 90


def test_a_store_at_an_fsspec_url(tmp_path):
    """Stores live wherever fsspec reaches (s3://, gs://, ...): an in-process memory:// filesystem here."""
    from kdcache.store import create_logit_arrays, create_store

    url = "memory://kdcache-test/cache.zarr"
    g = create_store(url, {"kind": LOGITS_KIND, "schema_version": 2, "train_fingerprint": "fp", "num_samples": 6,
                           "num_classes": 3, "chunk_rows": 4, "topk": None}, overwrite=True)
    create_logit_arrays(g, num_samples=6, num_classes=3, chunk_rows=4, topk=None, sample=None,
                        scores={"loss": (True, "")})
    logits = np.arange(18, dtype=np.float16).reshape(6, 3)
    g["logits"][:] = logits
    g["chunks_done"][:] = 1
    cache = LogitCache(url)
    np.testing.assert_array_equal(cache.logits(np.array([5, 0])), logits[[5, 0]].astype(np.float32))
    assert describe_store(url)["complete"] and open_store(url, "r").attrs["train_fingerprint"] == "fp"


def test_a_store_of_the_older_layout_is_refused_in_one_line(tmp_path):
    g = hand_made_cache(tmp_path / "old.zarr")
    g.attrs.update({"schema_version": 1, "fingerprint": "fp"})  # schema 1: `fingerprint`, top-k at T = 1
    with pytest.raises(UserError, match=r"made by an older kdcache \(store schema 1, this one reads 2\): make it"):
        LogitCache(str(tmp_path / "old.zarr"))
