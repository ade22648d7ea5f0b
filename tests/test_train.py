import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SUBPROCESS_TIMEOUT, kill_at, run_cli

from kdcache.contracts import Cache
from kdcache.distill import auto_alpha, kd_loss
from kdcache.run_folder import METRICS, read_metrics

FAST = ["--arch", "resnet20", "--batch-size", 32, "--workers", 1, "--lr", 0.05]


def reference_kd(student, teacher, labels, alpha, t):
    """The loss written out term by term: (1-a) CE + a T^2 sum_i p_i (log p_i - log q_i), batch mean."""
    p = torch.softmax(teacher / t, 1)
    log_q = torch.log_softmax(student / t, 1)
    kl = (p * (torch.log(p) - log_q)).sum(1).mean()
    ce = -torch.log_softmax(student, 1)[torch.arange(len(labels)), labels].mean()
    return (1 - alpha) * ce + alpha * t * t * kl


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_loss_matches_reference(alpha, t):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    labels = torch.randint(0, 5, (8,), generator=g)
    loss, ce, kl = kd_loss(student, teacher, labels, alpha, t)
    torch.testing.assert_close(loss, reference_kd(student, teacher, labels, alpha, t))
    torch.testing.assert_close(ce, F.cross_entropy(student, labels))
    if alpha == 0:
        torch.testing.assert_close(loss, ce)
    # A teacher's logits and its log-probabilities (what top-k caches hold) give the same loss.
    loss_lp, _, _ = kd_loss(student, torch.log_softmax(teacher, 1), labels, alpha, t)
    torch.testing.assert_close(loss_lp, loss)


def test_kd_loss_topk_reconstruction(tmp_path):
    """A top-k cache row, as `LogitCache` rebuilds it, enters the loss as the teacher's tempered
    distribution on its top k with the rest of its mass spread evenly: computed here from the definition."""
    import zarr

    from kdcache.store import LOGITS_KIND, LogitCache

    teacher = torch.tensor([[4.0, 2.0, 0.5, 0.1, -1.0]])
    t, k = 2.0, 2
    g = zarr.create_group(store=str(tmp_path / "top.zarr"), attributes={
        "kind": LOGITS_KIND, "schema_version": 2, "num_samples": 1, "num_classes": 5, "chunk_rows": 1, "topk": k,
        "temperature": t})
    values, classes = torch.log_softmax(teacher / t, 1).topk(k, 1)
    g.create_array("topk_values", shape=(1, k), dtype="float32")[:] = values.numpy()
    g.create_array("topk_indices", shape=(1, k), dtype="uint8")[:] = classes.numpy().astype(np.uint8)
    g.create_array("chunks_done", shape=(1,), dtype="uint8")[:] = 1
    row = torch.from_numpy(LogitCache(str(tmp_path / "top.zarr")).logits(np.array([0])))

    p_t = torch.softmax(teacher / t, 1)[0]  # [0.6285, 0.2312, 0.0516, 0.0346, 0.0541]: top 2 are classes 0, 1
    q = torch.full((5,), float(1 - p_t[0] - p_t[1]) / 3)
    q[0], q[1] = p_t[0], p_t[1]
    student, labels = torch.randn(1, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([1])
    log_s = torch.log_softmax(student / t, 1)[0]
    expected = 0.5 * F.cross_entropy(student, labels) + 0.5 * t * t * (q * (q.log() - log_s)).sum()
    loss, _, _ = kd_loss(student, row, labels, 0.5, t)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_auto_alpha_follows_the_measured_rule():
    fractions = [1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.001]
    alphas = [auto_alpha(f) for f in fractions]
    assert alphas == sorted(alphas)  # smaller fractions lean more on the teacher
    assert set(alphas[:7]) == {0.5}  # paper-cpu: 0.5 best or within noise of it at 5% and 10%
    assert auto_alpha(0.02) == pytest.approx(0.5 + 0.4 * math.log10(2.5) / math.log10(5), abs=1e-4)
    assert auto_alpha(0.01) == auto_alpha(0.001) == 0.9


def test_epoch_visits_selected_indices_once(synth):
    from kdcache.beton import dataset_info
    from kdcache.loader import Batches

    chosen = np.random.default_rng(0).choice(400, size=77, replace=False)
    batches = Batches(dataset_info(synth / "train.beton"), batch_size=16, train=True, indices=chosen,
                      num_workers=1)
    orders = []
    for _ in range(2):
        seen = torch.cat([index for _, _, index, _ in batches]).numpy()
        assert sorted(seen.tolist()) == sorted(chosen.tolist())
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch


def test_cached_logits_reach_their_samples(synth):
    """After shuffling, each batch's teacher rows are the cache rows of exactly those sample indices."""
    from kdcache.beton import dataset_info
    from kdcache.loader import Batches
    from kdcache.teachers import CachedTeacher

    class IndexCache:  # row i encodes i in its first column
        num_classes, bytes_per_sample, temperature, views = 4, 8, None, 1

        def logits(self, indices):
            return np.stack([indices, -indices, indices * 2, indices * 3], 1).astype(np.float32)

        def view_params(self):
            raise AssertionError("a single-view cache has no view table")

    assert isinstance(IndexCache(), Cache)

    info = dataset_info(synth / "train.beton")
    chosen = np.arange(3, 400, 5)
    teacher = CachedTeacher(IndexCache(), chosen, info.size, torch.device("cpu"))
    for x, _, index, _ in Batches(info, batch_size=16, train=True, indices=chosen, num_workers=1):
        rows = teacher(x, index)
        assert torch.equal(rows[:, 0].long(), index) and torch.equal(rows[:, 2].long(), 2 * index)


@pytest.mark.slow
def test_short_run_learns_and_writes_outputs(synth, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", synth / "train.beton", "--out", out, "--fraction", 1, "--alpha", 0,
                "--epochs", 6, *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] > 0.75, summary  # 4 classes: chance is 0.25
    assert "test accuracy" in r.output
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == list(range(1, 7))
    assert rows[-1]["lr"] < rows[0]["lr"] and all(row["images_per_sec"] > 0 for row in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["alpha_resolved"] == 0.0 and config["fraction"] == 1.0
    assert config["train_fingerprint"] and config["epochs"] == 6
    assert sorted(np.load(out / "indices.npy").tolist()) == list(range(400))
    assert not (out / "last.pt").exists()
    from kdcache.models import load_checkpoint
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["arch"] == "resnet20" and meta["num_classes"] == 4 and meta["test_acc"] == summary["test_acc"]


def test_steps_fix_the_number_of_updates(synth, tmp_path):
    out = tmp_path / "steps"
    run_cli("train", "--data", synth / "train.beton", "--out", out, "--indices", _indices(tmp_path, 100),
            "--alpha", 0, "--steps", 7, "--eval-every", 100, *FAST)
    summary = json.loads((out / "summary.json").read_text())
    # 100 samples at batch 32 are 4 steps an epoch: 7 steps take 2 epochs, the second cut short.
    assert summary["steps"] == 7 and summary["epochs"] == 2 and summary["fraction"] == 0.25
    rows = read_metrics(out)
    assert rows[0]["test_acc"] is None and rows[1]["test_acc"] is not None  # evaluation only at the end


def _indices(tmp_path, n):
    path = tmp_path / f"first{n}.npy"
    np.save(path, np.arange(n))
    return path


@pytest.mark.parametrize("augment", ["--no-augment", "--augment"])  # augmentations are seeded too
@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(synth, tmp_path, augment):
    args = ["train", "--data", synth / "train.beton", "--indices", _indices(tmp_path, 128), "--alpha", 0,
            "--epochs", 2, augment, *FAST]
    run_cli(*args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_at(args, killed, "1")
    assert (killed / "last.pt").exists() and not (killed / "summary.json").exists()
    assert len(read_metrics(killed)) == 1
    r = run_cli(*args, "--out", killed, expect=2)  # nothing lost on a crash: no silent restart
    assert r.output.strip() == (f"error: {killed} holds a killed run: pass --resume to continue it, "
                                "or --overwrite to start over")
    assert len(read_metrics(killed)) == 1
    r = run_cli(*args, "--out", killed, "--resume")
    assert f"resuming {killed} from epoch 1 of 2" in r.output
    a, b = read_metrics(tmp_path / "whole"), read_metrics(killed)
    assert len(b) == 2
    for key in ("train_loss", "test_loss", "test_acc"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-4, abs=1e-5)
    wa = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)["state_dict"]
    wb = torch.load(killed / "model.pt", weights_only=False)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--fraction", 0], "--fraction must be in (0, 1], got 0.0"),
    (["--fraction", 1.5], "--fraction must be in (0, 1], got 1.5"),
    (["--alpha", 1.2], "--alpha must be in [0, 1], got 1.2"),
    (["--alpha", "much"], "--alpha must be a number in [0, 1] or 'auto', got 'much'"),
    (["--alpha", 0.5], "needs a teacher: pass --cache"),
    (["--test", "nowhere/test.beton"], "test set not found: nowhere/test.beton"),
    (["--teacher-online", "resnet20"], "--teacher-online needs --teacher-checkpoint"),
    (["--indices", "chosen.npy", "--fraction", 0.5], "--indices gives the subset; drop --fraction"),
    (["--indices", "chosen.npy", "--method", "el2n", "--class-balanced"],
     "--indices gives the subset; drop --method, --class-balanced"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_inputs(synth, tmp_path, args, message):
    r = run_cli("train", "--data", synth / "train.beton", "--out", tmp_path / "bad", "--alpha", 0, *args,
                expect=2)
    assert message in r.output
    assert not (tmp_path / "bad" / METRICS).exists()  # refused before any training


@pytest.mark.slow
def test_cached_and_online_kd_agree_on_first_batch(synth, teacher, cache, tmp_path):
    common = ["train", "--data", synth / "train.beton", "--fraction", 0.5, "--alpha", 0.7, "--steps", 1,
              "--no-augment", "--eval-every", 100, *FAST]
    run_cli(*common, "--cache", cache, "--out", tmp_path / "cached")
    run_cli(*common, "--teacher-online", "resnet20", "--teacher-checkpoint", teacher / "model.pt",
            "--out", tmp_path / "online")
    cached, online = read_metrics(tmp_path / "cached")[0], read_metrics(tmp_path / "online")[0]
    assert cached["train_kl"] > 0
    for key in ("train_loss", "train_ce", "train_kl"):  # the cache holds float16 logits
        assert cached[key] == pytest.approx(online[key], rel=2e-3), key
    config = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config["cache_fingerprint"] == config["train_fingerprint"]


def test_kd_from_cache_trains_a_student(synth, cache, tmp_path):
    out = tmp_path / "student"
    run_cli("train", "--data", synth / "train.beton", "--cache", cache, "--fraction", 0.5, "--method",
            "el2n", "--class-balanced", "--epochs", 4, "--out", out, *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alpha"] == auto_alpha(0.5) and summary["num_selected"] == 200
    assert summary["cache_bytes_per_sample"] == 4 * 2  # 4 classes of float16
    assert all(row["train_kl"] > 0 for row in read_metrics(out))
    selection = json.loads((out / "config.json").read_text())["selection"]
    assert selection["method"] == "el2n" and selection["class_counts"] == [50, 50, 50, 50]
    # `kdcache select` with the same options picks the very same subset
    run_cli("select", "--store", cache, "--method", "el2n", "--fraction", 0.5, "--class-balanced",
            "--out", tmp_path / "sel.npy")
    assert np.array_equal(np.load(tmp_path / "sel.npy"), np.load(out / "indices.npy"))


def test_cache_of_another_dataset_is_refused(cache, tmp_path):
    run_cli("data", "synthetic", "--out", tmp_path / "other", "--num-train", 400, "--num-test", 200,
            "--num-classes", 4, "--image-size", 16, "--seed", 1, "--workers", 1)
    r = run_cli("train", "--data", tmp_path / "other" / "train.beton", "--cache", cache, "--out",
                tmp_path / "x", *FAST, expect=2)
    assert "was made from another dataset" in r.output
    assert not (tmp_path / "x").exists()  # a refused run leaves no folder behind
    run_cli("data", "synthetic", "--out", tmp_path / "five", "--num-train", 400, "--num-test", 200,
            "--num-classes", 5, "--image-size", 16, "--workers", 1)
    r = run_cli("train", "--data", tmp_path / "five" / "train.beton", "--cache", cache, "--out",
                tmp_path / "y", *FAST, expect=2)
    assert "another dataset" in r.output or "classes" in r.output


def torchrun(*args, timeout=SUBPROCESS_TIMEOUT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


SHARE_SCRIPT = """
import sys, numpy as np, torch, torch.distributed as dist
from kdcache.beton import dataset_info
from kdcache.loader import Batches
dist.init_process_group("gloo")
chosen = np.arange(0, 400, 2)[:int(sys.argv[3])]
batches = Batches(dataset_info(sys.argv[1]), batch_size=16, train=True, indices=chosen, distributed=True,
                  num_workers=1)
epochs = [torch.cat([i for _, _, i, _ in batches]).numpy() for _ in range(2)]
np.save(f"{sys.argv[2]}/rank{dist.get_rank()}.npy", np.stack(epochs))
"""


@pytest.mark.slow
def test_distributed_ranks_see_disjoint_shares(synth, tmp_path):
    (tmp_path / "share.py").write_text(SHARE_SCRIPT)
    torchrun(tmp_path / "share.py", synth / "train.beton", tmp_path, 200)
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    for epoch in range(2):
        assert len(r0[epoch]) == len(r1[epoch]) == 100
        assert not set(r0[epoch]) & set(r1[epoch])
        assert sorted(np.concatenate([r0[epoch], r1[epoch]])) == list(range(0, 400, 2))
    assert not np.array_equal(r0[0], r0[1])


@pytest.mark.slow
def test_two_process_ddp_run_records_dynamics(synth, tmp_path):
    out = tmp_path / "ddp"
    torchrun("-m", "kdcache_cli.main", "train", "--data", synth / "train.beton", "--out", out, "--fraction", 1,
             "--alpha", 0, "--epochs", 5, "--record-dynamics", *FAST)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 * 7  # 200 samples per rank at batch 32
    assert summary["test_acc"] > 0.6
    import zarr
    root = zarr.open_group(str(out / "dynamics.zarr"), mode="r")
    prob = root["dynamics/seed0/prob"][:]
    assert prob.shape == (400, 5) and not np.isnan(prob).any()  # every sample seen every epoch
    assert {"forgetting", "el2n_early", "aum", "dynunc"} <= set(root["scores"].array_keys())


def test_online_teacher_checkpoint_is_validated_like_the_dumps(synth, tmp_path):
    """One validator: an online teacher built for another image size is refused, as `dump` refuses it."""
    from kdcache.models import build_model, save_checkpoint

    ckpt = tmp_path / "t32.pt"
    save_checkpoint(ckpt, build_model("resnet20", 4, 32), arch="resnet20", num_classes=4, image_size=32)
    for command in (["train", "--out", tmp_path / "online", "--alpha", 0.5, "--teacher-online", "resnet20",
                     "--teacher-checkpoint", ckpt, *FAST],
                    ["dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--out", tmp_path / "c.zarr"]):
        r = run_cli(*command, "--data", synth / "train.beton", expect=2)
        assert f"{ckpt} was built for 32 px images but the dataset's are 16 px" in r.output


def test_recorded_dynamics_go_to_the_runs_own_store_not_the_cache(synth, cache, tmp_path):
    out = tmp_path / "student"
    run_cli("train", "--data", synth / "train.beton", "--cache", cache, "--fraction", 0.5, "--epochs", 1,
            "--record-dynamics", "--eval-every", 100, "--out", out, *FAST)
    from kdcache.store import open_store
    assert "dynamics" not in open_store(str(cache))  # `dump --overwrite` could otherwise erase them
    prob = open_store(str(out / "dynamics.zarr"))["dynamics/seed0/prob"][:]
    assert prob.shape == (400, 1) and (~np.isnan(prob[:, 0])).sum() == 200  # the half it trained on


@pytest.mark.slow
def test_finished_runs_are_kept_unless_overwritten(synth, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", synth / "train.beton", "--indices", _indices(tmp_path, 64), "--alpha", 0,
            "--epochs", 1, "--no-augment", "--out", out, *FAST]
    r = run_cli(*args, "--resume")
    assert f"nothing to resume in {out}: starting a new run" in r.output
    first = (out / "summary.json").read_text()
    r = run_cli(*args, expect=2)
    assert f"{out} holds a finished run: pass --overwrite" in r.output
    assert run_cli(*args, "--resume").output.count("epoch 1/1") == 0  # finished: nothing trained again
    assert (out / "summary.json").read_text() == first
    r = run_cli(*args, "--resume", "--lr", 0.2, expect=2)  # another run than the one in --out
    assert f"{out} holds a finished run with other options (lr); pass --overwrite" in r.output
    run_cli(*args, "--overwrite")
    config = json.loads((out / "config.json").read_text())
    assert config["amp_resolved"] == "off" and config["device"] == "cpu"  # no autocast on CPU, and it says so
    assert [r["first_in_process"] for r in read_metrics(out)] == [True]
    assert "either --resume or --overwrite" in run_cli(*args, "--resume", "--overwrite", expect=2).output


def test_indices_selected_from_another_dataset_are_refused(synth, tmp_path):
    run_cli("data", "synthetic", "--out", tmp_path / "other", "--num-train", 400, "--num-test", 200,
            "--num-classes", 4, "--image-size", 16, "--seed", 1, "--workers", 1)
    run_cli("select", "--data", tmp_path / "other" / "train.beton", "--method", "random", "--fraction", 0.5,
            "--out", tmp_path / "other-sel")  # `.npy` is added
    r = run_cli("train", "--data", synth / "train.beton", "--indices", tmp_path / "other-sel.npy", "--alpha", 0,
                "--out", tmp_path / "x", *FAST, expect=2)
    assert f"{tmp_path / 'other-sel.npy'} were selected from another dataset" in r.output


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    from kdcache.train import lr_at

    assert [lr_at(s, 100, 4, 0.4) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lr_at(4, 100, 4, 0.4) == pytest.approx(0.4)  # the peak, where the cosine starts
    assert lr_at(52, 100, 4, 0.4) == pytest.approx(0.2)  # half-way through the decay: half the peak
    assert lr_at(100, 100, 4, 0.4) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 100, 0, 0.4) == pytest.approx(0.4)  # no warm-up


@pytest.mark.slow
def test_resume_drops_metrics_written_after_the_last_checkpoint(synth, tmp_path):
    """Killed between an epoch's metrics line and its checkpoint: the resumed run drops that line and
    redoes the epoch, ending as the uninterrupted run."""
    args = ["train", "--data", synth / "train.beton", "--indices", _indices(tmp_path, 128), "--alpha", 0,
            "--epochs", 2, "--no-augment", *FAST]
    run_cli(*args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_at(args, killed, "2:metrics")
    assert len(read_metrics(killed)) == 2 and torch.load(killed / "last.pt", weights_only=False)["epoch"] == 1
    run_cli(*args, "--out", killed, "--resume")
    a, b = read_metrics(tmp_path / "whole"), read_metrics(killed)
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("train_loss", "test_loss", "test_acc"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-4, abs=1e-5)


def test_cache_with_another_number_of_classes_is_refused(synth, tmp_path):
    """Same dataset fingerprint, another class count: the trainer's own check, not the fingerprint's."""
    from kdcache.beton import dataset_info
    from kdcache.store import LOGITS_KIND, create_logit_arrays, create_store

    info = dataset_info(synth / "train.beton")
    url = str(tmp_path / "five.zarr")
    g = create_store(url, {"kind": LOGITS_KIND, "schema_version": 2, "train_fingerprint": info.train_fingerprint,
                           "num_samples": 400, "num_classes": 5, "chunk_rows": 400, "topk": None}, overwrite=False)
    create_logit_arrays(g, num_samples=400, num_classes=5, chunk_rows=400, topk=None, sample=None, scores={})
    g["chunks_done"][:] = 1
    r = run_cli("train", "--data", synth / "train.beton", "--cache", url, "--fraction", 0.5, "--out",
                tmp_path / "x", *FAST, expect=2)
    assert r.output.strip() == f"error: cache {url} has 5 classes, the dataset has 4"


@pytest.mark.slow
def test_uneven_subset_under_two_ranks_repeats_exactly_one_sample(synth, tmp_path):
    """101 samples on 2 ranks: FFCV pads the shorter share so that both ranks take the same steps (DDP
    needs that), so per epoch every sample is seen and exactly world - 1 = 1 of them twice."""
    (tmp_path / "share.py").write_text(SHARE_SCRIPT)
    torchrun(tmp_path / "share.py", synth / "train.beton", tmp_path, 101)
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    chosen = np.arange(0, 400, 2)[:101]
    for epoch in range(2):
        seen = np.concatenate([r0[epoch], r1[epoch]])
        assert len(r0[epoch]) == len(r1[epoch]) == 51 and sorted(set(seen.tolist())) == chosen.tolist()
        assert len(seen) - len(set(seen.tolist())) == 1


@pytest.mark.slow
def test_short_kd_run_evaluates_with_statistics_of_its_own_weights(synth, cache, tmp_path):
    """Ten steps at lr 0.1 move the weights faster than BatchNorm's running averages follow: evaluated
    with them, a short KD run fell to chance. Re-estimated before evaluation (`--bn-batches`), its test
    accuracy is that of the same weights normalised by batch statistics."""
    from kdcache.beton import dataset_info
    from kdcache.evaluation import evaluate
    from kdcache.loader import Batches
    from kdcache.models import load_checkpoint

    out = tmp_path / "short"
    run_cli("train", "--data", synth / "train.beton", "--cache", cache, "--fraction", 0.5, "--epochs", 5,
            "--arch", "resnet20", "--workers", 1, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    model, _ = load_checkpoint(out / "model.pt")
    test = Batches(dataset_info(synth / "test.beton"), batch_size=200, train=False, num_workers=1)
    assert evaluate(model.eval(), test, None)[1] == pytest.approx(summary["test_acc"])  # what model.pt holds
    model.train()  # batch statistics: what the weights do without any running average (this moves them)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y, _, _ in test)
    batch_stats_acc = correct / 200
    assert summary["test_acc"] > 0.4, summary["test_acc"]  # chance: 0.25
    assert abs(summary["test_acc"] - batch_stats_acc) < 0.1, (summary["test_acc"], batch_stats_acc)
    # the same run without re-estimation: evaluated with the lagging running averages
    run_cli("train", "--data", synth / "train.beton", "--cache", cache, "--fraction", 0.5, "--epochs", 5,
            "--arch", "resnet20", "--workers", 1, "--bn-batches", 0, "--out", tmp_path / "lagging")
    lagging = json.loads((tmp_path / "lagging" / "summary.json").read_text())["test_acc"]
    assert lagging < summary["test_acc"] - 0.1, (lagging, summary["test_acc"])


def test_warm_up_has_a_floor_in_steps():
    from kdcache.train import Schedule, TrainConfig

    short = Schedule.of(TrainConfig(data="", out="", epochs=5, warmup=0.02), steps_per_epoch=4)
    assert (short.total_steps, short.warmup_steps) == (20, 5)  # 2% of 20 rounds to 0: a quarter of the run
    long = Schedule.of(TrainConfig(data="", out="", epochs=100, warmup=0.02), steps_per_epoch=100)
    assert long.warmup_steps == 200  # long runs: the fraction as given
    assert Schedule.of(TrainConfig(data="", out="", epochs=5, warmup=0), steps_per_epoch=4).warmup_steps == 0


@pytest.mark.slow
def test_training_on_an_image_folder_with_a_torchvision_model(tmp_path):
    """The large-image path end to end: JPEG image folder, random-resized crop + flip at the crop side,
    centre crop for the test split, and a torchvision ResNet given the small-image stem (28 px <= 64)."""
    from conftest import make_image_folder

    from kdcache.models import load_checkpoint

    make_image_folder(tmp_path / "src", np.random.default_rng(0), counts=(("cat", 6), ("dog", 6)))
    run_cli("data", "imagefolder", "--src", tmp_path / "src", "--out", tmp_path / "data", "--max-side", 32,
            "--workers", 1)
    out = tmp_path / "run"
    run_cli("train", "--data", tmp_path / "data" / "train.beton", "--out", out, "--arch", "resnet18", "--alpha", 0,
            "--epochs", 2, "--batch-size", 4, "--workers", 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_selected"] == 12 and summary["steps"] == 6 and 0 <= summary["test_acc"] <= 1
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["image_size"] == 28 and meta["arch"] == "resnet18"
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


@pytest.mark.slow
def test_a_run_killed_after_its_last_epoch_resumes_to_its_result(synth, tmp_path):
    """Killed after the last epoch's checkpoint, before the summary: resuming trains nothing more and
    the summary carries the last evaluation."""
    args = ["train", "--data", synth / "train.beton", "--indices", _indices(tmp_path, 64), "--alpha", 0,
            "--epochs", 2, "--no-augment", *FAST]
    killed = tmp_path / "killed"
    kill_at(args, killed, "2")
    assert not (killed / "summary.json").exists()
    r = run_cli(*args, "--out", killed, "--resume")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["test_acc"] == read_metrics(killed)[-1]["test_acc"] is not None
    assert "test accuracy" in r.output and "epoch 2/2" not in r.output.replace("resuming", "")


def test_eval_batch_size_changes_no_accuracy(synth, teacher, tmp_path):
    """--eval-batch-size is declared not to change results (NOT_RESULTS): evaluation runs in eval mode."""
    from kdcache.beton import dataset_info
    from kdcache.evaluation import evaluate
    from kdcache.loader import Batches
    from kdcache.models import load_checkpoint
    from kdcache.run_folder import NOT_RESULTS

    model, _ = load_checkpoint(teacher / "model.pt")
    info = dataset_info(synth / "test.beton")
    losses, accuracies = zip(*(evaluate(model, Batches(info, batch_size=b, train=False, num_workers=1), None)
                               for b in (512, 7)))
    assert accuracies[0] == accuracies[1] and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert "eval_batch_size" in NOT_RESULTS and "batch_size" not in NOT_RESULTS
    r = run_cli("train", "--data", synth / "train.beton", "--out", tmp_path / "x", "--eval-batch-size", 0, expect=2)
    assert "--eval-batch-size must be at least 1" in r.output


def test_batchnorm_is_re_estimated_on_batches_augmented_as_in_training(synth, tmp_path):
    """The layers after each BatchNorm learnt on augmented batches' statistics: re-estimating them on clean
    images cost CIFAR-10 KD students at 2% 4.4 points (3 seeds). The re-estimation batches are augmented,
    with the same draws at every evaluation (so a resumed run evaluates as an uninterrupted one)."""
    from kdcache.train import TrainConfig, Trainer, validate

    def bn_pixels(augment: bool):
        cfg = TrainConfig(data=str(synth / "train.beton"), out=str(tmp_path / str(augment)), arch="resnet8",
                          fraction=0.5, epochs=1, batch_size=32, workers=1, augment=augment, alpha="0")
        t = Trainer(cfg, *validate(cfg), torch.device("cpu"))
        t.bn_batches.next_epoch = 0
        first = torch.cat([x for x, *_ in t.bn_batches])
        t.bn_batches.next_epoch = 0
        return first, torch.cat([x for x, *_ in t.bn_batches])

    clean, _ = bn_pixels(False)
    augmented, again = bn_pixels(True)
    assert torch.equal(augmented, again)  # the same draws at every evaluation
    assert augmented.shape == clean.shape and not torch.equal(augmented, clean)
