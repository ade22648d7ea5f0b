import json
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.beton import beton_labels, dataset_info
from kdcache.dynamics import (
    DynamicsRecorder,
    aum,
    dynamic_uncertainty,
    early_epoch,
    el2n_early,
    forgetting_events,
    write_dynamics_scores,
)
from kdcache.errors import UserError
from kdcache.store import hardness, open_store, read_score, write_score

nan = np.nan


# ---- scores from dynamics, against hand-computed values ---------------------------------------------

def test_forgetting_events_hand_computed():
    correct = np.array([
        [1, 0, 1, 0, 1],        # 1->0 twice
        [0, 1, 1, 1, 1],        # learned, never forgotten
        [0, 0, 0, 0, 0],        # never learned: E + 1 = 6, ranks above any real count
        [1, nan, 0, nan, 1],    # unseen epochs skipped: 1 (seen) -> 0 is one event
        [nan, nan, nan, nan, nan],  # never seen: unknown
        [0, 1, 0, 1, 0],        # 2 events
        [1, 1, 1, 1, 0],        # forgotten at the very end: 1
    ])
    np.testing.assert_array_equal(forgetting_events(correct), [2, 0, 6, 1, nan, 2, 1])
    # int8 with -1 for unseen, the stored form, gives the same
    stored = np.where(np.isnan(correct), -1, correct).astype(np.int8)
    np.testing.assert_array_equal(forgetting_events(stored), [2, 0, 6, 1, nan, 2, 1])


def test_el2n_early_averages_runs_and_fills_unseen_from_nearest_epoch():
    run1 = np.array([[0.9, 0.5, 0.1], [0.4, nan, 0.2], [nan, nan, 0.3]])
    run2 = np.array([[0.7, 0.3, 0.1], [0.6, 0.8, 0.2], [nan, nan, nan]])
    # epoch 1: row 0 mean(.5, .3); row 1 run1 unseen -> nearest is a tie (0 and 2) -> earlier .4;
    # row 2 only run1 at epoch 2
    np.testing.assert_allclose(el2n_early([run1, run2], 1), [0.4, 0.6, 0.3], rtol=1e-6)
    np.testing.assert_allclose(el2n_early([run1], 0), [0.9, 0.4, 0.3], rtol=1e-6)
    assert early_epoch(10, 0.2) == 1 and early_epoch(200, 0.2) == 39 and early_epoch(3, 0.2) == 0
    assert early_epoch(5, 1.0) == 4


def test_dynamic_uncertainty_hand_computed():
    prob = np.array([[0.1, 0.2, 0.4, 0.8], [0.5, 0.5, 0.5, 0.5], [0.0, nan, 1.0, 1.0]])
    # window 3: sample std (ddof=1) of [.1 .2 .4] = .152753, of [.2 .4 .8] = .305505, mean .229129
    # row 2: [0 nan 1] -> std of [0 1] = .707107; [nan 1 1] -> 0; mean .353553
    np.testing.assert_allclose(dynamic_uncertainty(prob, 3), [0.229129, 0.0, 0.353553], atol=1e-6)
    # window 2: std of pairs = |a - b| / sqrt(2), averaged over the three windows
    want0 = np.mean([0.1, 0.2, 0.4]) / np.sqrt(2)
    np.testing.assert_allclose(dynamic_uncertainty(prob, 2)[0], want0, rtol=1e-5)
    # the default window (10) is clipped to the 4 epochs: a single window
    np.testing.assert_allclose(dynamic_uncertainty(prob)[0], np.std(prob[0], ddof=1), rtol=1e-5)
    assert np.isnan(dynamic_uncertainty(prob[:, :1])).all()  # one epoch: undefined


def test_dynamic_uncertainty_matches_direct_windows_with_gaps():
    rng = np.random.default_rng(0)
    prob = rng.random((300, 25))
    prob[rng.random(prob.shape) < 0.2] = nan
    windows = np.lib.stride_tricks.sliding_window_view(prob, 10, axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # windows with fewer than two values
        want = np.nanmean(np.nanstd(windows, axis=2, ddof=1), axis=1)
    np.testing.assert_allclose(dynamic_uncertainty(prob, 10), want, rtol=1e-5)


def test_aum_is_mean_margin_over_seen_epochs():
    margin = np.array([[1.0, 2.0, 3.0], [-1.0, nan, 0.0]])
    np.testing.assert_allclose(aum(margin), [2.0, -0.5])


# ---- the recorder ------------------------------------------------------------------------------------

def reference(logits, labels):
    """Direct per-sample values for checking the recorder."""
    p = F.softmax(logits, 1)
    p_true = p[torch.arange(len(labels)), labels]
    onehot = F.one_hot(labels, logits.shape[1]).float()
    others = logits.masked_fill(onehot.bool(), float("-inf")).max(1).values
    return {"prob": p_true.numpy(), "correct": (logits.argmax(1) == labels).numpy().astype(np.int8),
            "el2n": (p - onehot).norm(dim=1).numpy(),
            "margin": (logits[torch.arange(len(labels)), labels] - others).numpy()}


def feed(rec, logits, labels, order, batch=64):
    for start in range(0, len(order), batch):
        i = torch.as_tensor(order[start:start + batch])
        rec.update(i, logits[i], labels[i])


@pytest.fixture
def info(synth):
    return dataset_info(synth / "train.beton")


def test_recorder_two_epochs_with_unseen_samples(info, tmp_path):
    n = info.size
    labels = torch.as_tensor(beton_labels(info.path))
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, 4, generator=g) * 3 for _ in range(2)]
    url = str(tmp_path / "dyn.zarr")
    rec = DynamicsRecorder(url, info, epochs=2)
    feed(rec, logits[0], labels, torch.randperm(n, generator=g))
    rec.end_epoch(0)
    unseen = np.arange(n) % 7 == 3  # epoch 1 trains on a subset
    feed(rec, logits[1], labels, torch.as_tensor(np.flatnonzero(~unseen)))
    rec.end_epoch(1)

    root = open_store(url, "r")
    assert root.attrs["train_fingerprint"] == info.train_fingerprint
    np.testing.assert_array_equal(root["labels"][:], labels.numpy())
    group = root["dynamics/seed0"]
    for epoch in (0, 1):
        want = reference(logits[epoch], labels)
        seen = ~unseen if epoch else np.ones(n, bool)
        for name in ("prob", "el2n", "margin"):
            got = group[name][:]
            assert got.shape == (n, 2) and got.dtype == np.float32
            np.testing.assert_allclose(got[seen, epoch], want[name][seen], rtol=1e-5, atol=1e-5)
            assert np.isnan(got[~seen, epoch]).all()
        got = group["correct"][:]
        assert got.shape == (n, 2)
        np.testing.assert_array_equal(got[seen, epoch], want["correct"][seen])
        assert (got[~seen, epoch] == -1).all()
    assert group.attrs["epochs_written"] == [0, 1]

    assert rec.finish() == ["forgetting", "el2n_early", "dynunc", "aum"]
    prob, correct, margin = group["prob"][:], group["correct"][:], group["margin"][:]
    forgot = (correct[:, 0] == 1) & (correct[:, 1] == 0)
    never = (correct != 1).all(1)
    np.testing.assert_array_equal(read_score(root, "forgetting"), np.where(never, 3, forgot.astype(np.float32)))
    np.testing.assert_allclose(read_score(root, "el2n_early"), group["el2n"][:, 0])  # epoch max(1, round(0.1 * 2)) = 1
    dynunc = read_score(root, "dynunc")
    np.testing.assert_allclose(dynunc[~unseen], np.abs(prob[~unseen, 0] - prob[~unseen, 1]) / np.sqrt(2), rtol=1e-5)
    assert np.isnan(dynunc[unseen]).all()  # one seen epoch: no spread to measure
    np.testing.assert_allclose(read_score(root, "aum"), np.nanmean(margin, 1), rtol=1e-5)
    # orientation: low margin = hard
    assert root["scores/aum"].attrs["higher_is_harder"] is False
    np.testing.assert_allclose(hardness(root, "aum"), -np.nanmean(margin, 1), rtol=1e-5)
    assert root["scores/forgetting"].attrs["higher_is_harder"] is True


def test_recorder_resume_keeps_written_columns_and_restart_replaces(info, tmp_path):
    n = info.size
    labels = torch.as_tensor(beton_labels(info.path))
    logits = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    url = str(tmp_path / "dyn.zarr")
    rec = DynamicsRecorder(url, info, epochs=3)
    feed(rec, logits, labels, torch.arange(n))
    rec.end_epoch(0)
    first = open_store(url, "r")["dynamics/seed0/prob"][:, 0]
    assert not np.isnan(first).any()

    # the run is killed and resumed: column 0 stays, column 1 is added
    rec = DynamicsRecorder(url, info, epochs=3, resume=True)
    feed(rec, -logits, labels, torch.arange(n))
    rec.end_epoch(1)
    prob = open_store(url, "r")["dynamics/seed0/prob"][:]
    np.testing.assert_array_equal(prob[:, 0], first)
    np.testing.assert_allclose(prob[:, 1], reference(-logits, labels)["prob"], rtol=1e-5)
    assert np.isnan(prob[:, 2]).all()
    assert open_store(url, "r")["dynamics/seed0"].attrs["epochs_written"] == [0, 1]

    # a second seed lands beside it; a fresh (non-resumed) seed0 starts empty
    DynamicsRecorder(url, info, epochs=3, run="seed1")
    rec = DynamicsRecorder(url, info, epochs=3)
    root = open_store(url, "r")
    assert sorted(name for name, _ in root["dynamics"].groups()) == ["seed0", "seed1"]
    assert np.isnan(root["dynamics/seed0/prob"][:]).all()
    assert root["dynamics/seed0"].attrs["epochs_written"] == []


def test_recorder_in_a_logit_cache_touches_nothing_else(info, tmp_path):
    url = str(tmp_path / "cache.zarr")
    root = open_store(url, "w")
    root.attrs.update({"train_fingerprint": info.train_fingerprint, "schema_version": 2, "teacher": "t"})
    root.create_array("logits", shape=(info.size, 4), dtype="float32")[:] = 1.5
    write_score(root, "el2n", np.arange(info.size))
    rec = DynamicsRecorder(url, info, epochs=1)
    rec.update(torch.arange(4), torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    rec.end_epoch(0)
    rec.finish()
    root = open_store(url, "r")
    assert root.attrs["teacher"] == "t"
    assert (root["logits"][:] == 1.5).all()
    np.testing.assert_array_equal(read_score(root, "el2n"), np.arange(info.size))
    assert root["dynamics/seed0/prob"].shape == (info.size, 1)

    other = open_store(str(tmp_path / "other.zarr"), "w")
    other.attrs.update({"train_fingerprint": "0" * 32, "schema_version": 2})
    with pytest.raises(UserError, match="another dataset"):
        DynamicsRecorder(str(tmp_path / "other.zarr"), info, epochs=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, url, info, logits, labels):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rec = DynamicsRecorder(url, info, epochs=1)
        mine = torch.arange(len(labels))[rank::world]  # disjoint shares, as a distributed sampler gives
        feed(rec, logits, labels, mine, batch=32)
        rec.end_epoch(0)
        rec.finish()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_recorder_all_reduces_across_ranks(info, tmp_path):
    n = info.size
    labels = torch.as_tensor(beton_labels(info.path))
    logits = torch.randn(n, 4, generator=torch.Generator().manual_seed(2))
    url = str(tmp_path / "dyn.zarr")
    torch.multiprocessing.spawn(_distributed_worker, args=(2, _free_port(), url, info, logits, labels), nprocs=2)
    got = open_store(url, "r")["dynamics/seed0/el2n"][:, 0]
    np.testing.assert_allclose(got, reference(logits, labels)["el2n"], rtol=1e-5)


def test_recorded_training_run_has_one_row_per_sample_and_one_column_per_epoch(synth, tmp_path):
    from conftest import run_cli
    out = tmp_path / "teacher"
    run_cli("train", "--data", synth / "train.beton", "--out", out, "--fraction", 1, "--alpha", 0, "--epochs", 2,
            "--arch", "resnet20", "--batch-size", 64, "--workers", 1, "--record-dynamics")
    root = open_store(str(out / "dynamics.zarr"), "r")
    group = root["dynamics/seed0"]
    for name in ("prob", "correct", "el2n", "margin"):
        assert group[name].shape == (400, 2)
    assert group.attrs["epochs_written"] == [0, 1]
    prob, correct = group["prob"][:], group["correct"][:]
    seen = ~np.isnan(prob)
    assert seen.all()  # the loader never drops a partial batch: every sample, every epoch
    assert ((prob[seen] >= 0) & (prob[seen] <= 1)).all() and set(np.unique(correct[seen])) <= {0, 1}
    np.testing.assert_array_equal(correct == -1, ~seen)
    assert {"forgetting", "el2n_early", "dynunc", "aum"} <= {name for name, _ in root["scores"].arrays()}
    np.testing.assert_array_equal(read_score(root, "forgetting"), forgetting_events(correct))
    # the store is enough to select from: it carries the labels and the fingerprint
    r = run_cli("select", "--store", out / "dynamics.zarr", "--method", "forgetting", "--fraction", 0.5,
                "--data", synth / "train.beton", "--out", tmp_path / "sel.npy")
    assert "selected 200 of 400" in r.output and len(np.load(tmp_path / "sel.npy")) == 200
    # CCS stratifies by AUM where the store has it (Zheng et al.'s code), and says so
    run_cli("select", "--store", out / "dynamics.zarr", "--method", "ccs", "--fraction", 0.5,
            "--data", synth / "train.beton", "--out", tmp_path / "ccs.npy")
    sidecar = json.loads((tmp_path / "ccs.json").read_text())
    assert sidecar["ccs_score"] == "aum" and sidecar["score_source"]["score"] == "aum"
    assert sidecar["score_description"].startswith("area under the margin: true-class logit margin "
                                                              "averaged over epochs 1-2 (100% of training)")


def test_early_el2n_and_aum_follow_their_papers_epochs(tmp_path):
    """el2n_early is EL2N 10% into training (Paul et al.: epoch 20 of 200); aum averages the margin over
    the first `aum_fraction` of the epochs; each score's description names the epochs it used."""
    n, e = 6, 20
    rng = np.random.default_rng(0)
    root = open_store(str(tmp_path / "dyn.zarr"), "w")
    group = root.require_group("dynamics").require_group("seed0")
    arrays = {"prob": rng.random((n, e)), "el2n": rng.random((n, e)), "margin": rng.normal(size=(n, e)),
              "correct": rng.integers(0, 2, (n, e))}
    for name, values in arrays.items():
        group.create_array(name, shape=(n, e), dtype="int8" if name == "correct" else "float32")[:] = values
    write_dynamics_scores(root, aum_fraction=0.25)
    np.testing.assert_allclose(read_score(root, "el2n_early"), arrays["el2n"][:, 1], rtol=1e-6)  # epoch 2 of 20
    np.testing.assert_allclose(read_score(root, "aum"), arrays["margin"][:, :5].mean(1), rtol=1e-5)
    assert root["scores/el2n_early"].attrs["description"].startswith("EL2N at the end of epoch 2 (10% into")
    assert "epochs 1-5 (25% of training)" in root["scores/aum"].attrs["description"]
    assert "eval mode" in root["scores/dynunc"].attrs["description"]  # how it differs from He et al.
    np.testing.assert_allclose(aum(arrays["margin"]), arrays["margin"].mean(1), rtol=1e-5)  # default: all epochs
