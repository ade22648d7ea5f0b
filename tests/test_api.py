"""The public API for a training loop of one's own (kdcache.api): targets by sample index, the loss module,
the dataset wrapper and the index contract."""
import json

import numpy as np
import pytest
import torch
from conftest import make_folder_store, run_cli

import kdcache
from kdcache.distill import kd_loss
from kdcache.errors import UserError
from kdcache.store import LogitCache


def _dump(synth, teacher, out, *extra):
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", teacher / "model.pt", "--data", synth / "train.beton",
            "--out", out, "--batch-size", 64, "--chunk-rows", 128, "--workers", 1, *extra)
    return out


@pytest.fixture(scope="module")
def topk_cache(synth, teacher, tmp_path_factory):
    return _dump(synth, teacher, tmp_path_factory.mktemp("api") / "top2.zarr", "--topk", 2, "--temperature", 2)


@pytest.fixture(scope="module")
def sampled_cache(synth, teacher, tmp_path_factory):
    return _dump(synth, teacher, tmp_path_factory.mktemp("api") / "s3.zarr", "--sample", 3, "--temperature", 3)


def _batch(n=16, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def test_full_store_targets_are_the_trainers_rows_and_the_module_loss_is_the_trainers(synth, cache):
    rows = np.array([5, 17, 3, 399, 0])
    targets = kdcache.TeacherTargets(cache, data=synth, rows=rows)
    assert not targets.sparse and targets.temperature is None
    index = torch.tensor([399, 5, 0])
    want = torch.from_numpy(LogitCache(cache).logits(index.numpy()))
    assert torch.equal(targets(index), want)
    student, labels = _batch(3)
    loss_fn = targets.loss(alpha=0.7, temperature=3.0)
    loss = loss_fn(student, labels, targets(index))
    ref, ce, kl = kd_loss(student, want, labels, 0.7, 3.0)
    assert torch.equal(loss, ref) and torch.equal(loss_fn.ce, ce) and torch.equal(loss_fn.kl, kl)
    assert targets.nbytes == 5 * 4 * 4 + 400 * 8  # five float32 rows of four classes, and the row table


@pytest.mark.parametrize("which", ["topk_cache", "sampled_cache"])
def test_sparse_targets_give_the_loss_of_their_dense_expansion(which, request):
    store = request.getfixturevalue(which)
    sparse = kdcache.TeacherTargets(store)
    dense = kdcache.TeacherTargets(store, dense=True)  # exactly what `kdcache train` gathers
    assert sparse.sparse and not dense.sparse
    index = torch.arange(0, 400, 7)
    s, d = sparse(index), dense(index)
    assert isinstance(s, kdcache.SparseTargets) and s.classes.shape[1] < 4
    t = sparse.temperature
    assert torch.allclose(s.dense(4), torch.softmax(d / t, 1), atol=1e-6)
    assert torch.allclose(s.dense(4).sum(1), torch.ones(len(index)), atol=1e-6)
    student, labels = _batch(len(index), seed=1)
    loss_fn = sparse.loss(alpha=0.5)
    sparse_loss = loss_fn(student, labels, s)
    assert torch.allclose(sparse_loss, loss_fn(student, labels, d), rtol=1e-5, atol=1e-6)
    # and the gradient the student gets
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss_fn(a, labels, s).backward(), loss_fn(b, labels, d).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_sparse_device_bytes_are_k_per_sample(topk_cache):
    targets = kdcache.TeacherTargets(topk_cache)
    # top-2 of 4 classes: 2 float16 log-probabilities and 2 int16 classes per sample, plus the row table
    assert targets.nbytes == 400 * (2 * 2 + 2 * 2) + 400 * 8


def test_bad_input_is_one_clear_error(synth, cache, topk_cache, tmp_path):
    targets = kdcache.TeacherTargets(cache, rows=[1, 2, 3])
    with pytest.raises(UserError, match="out of range"):
        targets(torch.tensor([1, 400]))
    with pytest.raises(UserError, match="not among the rows loaded"):
        targets(torch.tensor([1, 4]))
    with pytest.raises(UserError, match="WithIndex"):
        targets(torch.zeros(2, 3, 16, 16))
    with pytest.raises(UserError, match="out of range"):
        kdcache.TeacherTargets(cache, rows=[-1])
    with pytest.raises(UserError, match="temperature 2, exact only there"):
        kdcache.TeacherTargets(topk_cache).loss(temperature=4)
    with pytest.raises(UserError, match="exact at temperature 2 only"):
        kdcache.DistillationLoss(temperature=4)(*_batch(3), kdcache.TeacherTargets(topk_cache)(torch.arange(3)))
    other = tmp_path / "other"
    run_cli("data", "synthetic", "--out", other, "--num-train", 40, "--num-test", 20, "--num-classes", 4,
            "--image-size", 16, "--workers", 1, "--seed", 1)
    with pytest.raises(UserError, match="made from another dataset"):
        kdcache.TeacherTargets(cache, data=other)


def test_with_index_batches_carry_store_rows(synth, cache):
    data = torch.utils.data.TensorDataset(torch.zeros(6, 3), torch.arange(6))
    loader = torch.utils.data.DataLoader(kdcache.WithIndex(data, rows=[10, 11, 12, 13, 14, 15]), batch_size=4)
    x, y, index = next(iter(loader))
    assert x.shape == (4, 3) and y.tolist() == [0, 1, 2, 3] and index.tolist() == [10, 11, 12, 13]
    assert next(iter(torch.utils.data.DataLoader(kdcache.WithIndex(data), batch_size=2)))[2].tolist() == [0, 1]


def test_positional_keys_are_recorded_and_labels_checked(synth, cache):
    manifest = json.loads((synth / "manifest.json").read_text())
    assert manifest["splits"]["train"]["keys"] == "position"
    targets = kdcache.TeacherTargets(cache)
    assert targets.cache.attrs["keys"] == "position" and kdcache.store_keys(cache) is None
    labels = targets.cache.labels()
    assert kdcache.rows_for(cache, labels=labels[:50]).tolist() == list(range(50))
    wrong = labels[:50].copy()
    wrong[7] = (wrong[7] + 1) % 4
    with pytest.raises(UserError, match="1 of 50 labels disagree .*item 7"):
        kdcache.rows_for(cache, labels=wrong)


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory):
    return make_folder_store(tmp_path_factory.mktemp("folder"))


def test_image_folder_keys_join_an_imagefolder_and_refuse_another(folder_store):
    from torchvision.datasets import ImageFolder
    root = folder_store
    keys = kdcache.store_keys(root / "c.zarr")
    assert keys.tolist() == [f"{c}/{i:03d}.png" for c in ("ant", "bee", "cat") for i in range(5)]
    assert json.loads((root / "data" / "manifest.json").read_text())["splits"]["train"]["keys"] == keys.tolist()
    assert "keys" not in kdcache.TeacherTargets(root / "c.zarr").cache.attrs["manifest"]["splits"]["train"]
    rows = kdcache.rows_for(root / "c.zarr", ImageFolder(root / "src" / "train"))
    assert rows.tolist() == list(range(15))
    assert kdcache.rows_for(root / "c.zarr", keys=["cat/004.png", "ant/000.png"]).tolist() == [14, 0]
    with pytest.raises(UserError, match="6 of 6 samples are not in store .*first: 'ant/000.jpg'"):
        kdcache.rows_for(root / "c.zarr", keys=[f"{c}/{i:03d}.jpg" for c in ("ant", "bee", "cat") for i in range(2)])
    with pytest.raises(UserError, match="labels disagree"):
        kdcache.rows_for(root / "c.zarr", keys=["ant/000.png"], labels=[2])
