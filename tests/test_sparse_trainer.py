"""The trainer's cached teacher reads a cache through the public API's reader (`kdcache.api.TargetTable`): a
top-k or sampled cache stays sparse on the device (K classes and values per sample, never an (n, C) float
table) and its step gives the loss and update of the dense rows the trainer used to expand it to; a full
cache's step is unchanged, to the bit."""
import copy

import numpy as np
import pytest
import torch
from conftest import DUMP, run_cli
from test_step import SYNCING, step_ops, trainer

from kdcache.api import TargetTable
from kdcache.distill import SparseTargets, kd_loss
from kdcache.store import LogitCache

N, C = 400, 4  # conftest's synth: 400 training samples of 4 classes
KD_SPARSE_EXTRA_OPS = 60  # a top-k cache's KD term over CE: the K-entry gathers, the target's expansion (mass,
                          # tail), the KL from K entries and the tail, and its backward (57 in torch 2.14; dense
                          # targets: test_step's KD_EXTRA_OPS, 25, with a (B, C) float32 row a sample)


def _dump(synth, teacher, out, *extra):
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", teacher / "model.pt", "--data", synth / "train.beton",
            "--out", out, *DUMP, *extra)
    return out


@pytest.fixture(scope="module")
def stores(synth, teacher, tmp_path_factory):
    """A top-2 store at T = 2, a sampled store (3 draws) at T = 3, and a top-2 store of 3 stored views."""
    root = tmp_path_factory.mktemp("sparse-trainer")
    return {"topk": _dump(synth, teacher, root / "top2.zarr", "--topk", 2, "--temperature", 2),
            "sample": _dump(synth, teacher, root / "s3.zarr", "--sample", 3, "--temperature", 3),
            "views": _dump(synth, teacher, root / "v3.zarr", "--views", 3, "--view-seed", 7, "--topk", 2,
                           "--temperature", 2)}


def held_tensors(obj) -> list[torch.Tensor]:
    """Every tensor a teacher holds, through its attributes, dicts and kdcache objects."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in held_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in held_tensors(v)]
    if type(obj).__module__.startswith("kdcache"):
        return [t for v in vars(obj).values() for t in held_tensors(v)]
    return []


def first_batch(t):
    x, y, index, view = next(iter(t.train_batches))
    return x, y, index, view


# bytes per selected sample on the device: top-2 = 2 float16 log-probabilities + 2 int16 classes; 3 draws of 4
# classes = min(3, 4) int16 classes + uint8 counts; 3 views of top-2 = 3 x 8
SPARSE_BYTES = {"topk": 2 * 2 + 2 * 2, "sample": 3 * 2 + 3 * 1, "views": 3 * (2 * 2 + 2 * 2)}


@pytest.mark.parametrize("which", ["topk", "sample", "views"])
@pytest.mark.slow
def test_a_sparse_cache_stays_sparse_in_the_trainer_and_gives_its_dense_expansions_step(which, stores, synth,
                                                                                       tmp_path):
    store = stores[which]
    sparse = trainer(synth, tmp_path / "sparse", alpha="0.5", cache=str(store))
    dense = trainer(synth, tmp_path / "dense", alpha="0.5", cache=str(store))
    cache = LogitCache(str(store))
    n = len(sparse.indices)
    # the old trainer's teacher: (n, [V,] C) float32 rows whose softmax at the store's temperature is the target
    dense.teacher.targets = TargetTable(cache, sparse.indices, N, torch.device("cpu"), dense=True)

    # on the device: the sparse tables and the row table, nothing else; no (n, C) float table
    held = held_tensors(sparse.teacher)
    assert sparse.teacher.nbytes == sum(t.numel() * t.element_size() for t in held) == n * SPARSE_BYTES[which] + N * 8
    assert not any(t.is_floating_point() and t.shape[-1] == C for t in held)
    assert dense.teacher.nbytes == n * (3 if which == "views" else 1) * C * 4 + N * 8  # what it was: 16 B a row
    assert sparse.temperature == dense.temperature == cache.temperature

    x, y, index, view = first_batch(sparse)
    assert (view is not None) == (which == "views")
    target = sparse.teacher(x, index, view)
    assert isinstance(target, SparseTargets) and target.classes.shape[1] < C
    rows = dense.teacher(x, index, view)
    want_rows = torch.from_numpy(cache.logits(index.numpy()))
    if view is not None:
        want_rows = want_rows[torch.arange(len(index)), view]
    assert torch.equal(rows, want_rows)
    t = cache.temperature
    torch.testing.assert_close(target.dense(C), torch.softmax(rows / t, 1), rtol=0, atol=1e-6)

    # one step each on the same batch: the same loss, CE and KL, and the same update, to float tolerance
    assert all(torch.equal(a, b) for a, b in zip(sparse.model.state_dict().values(), dense.model.state_dict().values()))
    before = copy.deepcopy(sparse.model)
    got, ref = sparse.train_step(x, y, index, view), dense.train_step(x, y, index, view)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got[2] > 0  # a KL term was there
    with torch.no_grad():
        loss, ce, kl = kd_loss(before(x), target, y, sparse.alpha, sparse.temperature)
    torch.testing.assert_close(got[:3], torch.stack([loss, ce, kl]) * len(y), rtol=1e-6, atol=1e-6)
    for a, b in zip(sparse.model.parameters(), dense.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_full_cache_trainer_step_is_its_rows_kd_loss_to_the_bit(synth, cache, tmp_path):
    t = trainer(synth, tmp_path, alpha="0.5", cache=str(cache))
    n = len(t.indices)
    assert t.teacher.nbytes == n * C * 4 + N * 8  # full logits: the (n, C) float32 rows, as before
    x, y, index, view = first_batch(t)
    rows = t.teacher(x, index, view)
    assert torch.equal(rows, torch.from_numpy(LogitCache(str(cache)).logits(index.numpy())))
    before = copy.deepcopy(t.model)
    got = t.train_step(x, y, index, view)
    loss, ce, kl = kd_loss(before(x), rows, y, t.alpha, t.temperature)
    assert torch.equal(got[:3], torch.stack([loss, ce, kl]).detach() * len(y))


@pytest.mark.slow
def test_a_sparse_step_never_syncs_and_its_kd_term_costs_a_stated_number_of_operators(stores, synth, tmp_path):
    ce = trainer(synth, tmp_path / "ce", alpha="0")
    kd = trainer(synth, tmp_path / "kd", alpha="0.5", cache=str(stores["topk"]))
    ce_ops, kd_ops = step_ops(ce), step_ops(kd)
    assert not SYNCING & set(kd_ops), SYNCING & set(kd_ops)
    extra = sum(kd_ops.values()) - sum(ce_ops.values())
    assert 0 < extra <= KD_SPARSE_EXTRA_OPS, (extra, kd_ops - ce_ops)


def test_the_public_reader_and_the_trainers_are_one(stores, synth, tmp_path):
    import kdcache

    t = trainer(synth, tmp_path, alpha="0.5", cache=str(stores["topk"]))
    public = kdcache.TeacherTargets(stores["topk"], data=synth, rows=t.indices)
    index = torch.from_numpy(np.sort(t.indices)[::3].copy())
    for a, b in zip(t.teacher(None, index), public(index)):
        assert a == b if isinstance(a, float) else torch.equal(a, b)
    assert public.nbytes == t.teacher.nbytes
