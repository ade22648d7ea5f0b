"""Multi-view caches (`kdcache dump --views K`): the teacher's outputs on K stored augmented views per
sample, and a trainer that shows the student exactly those views."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DUMP, SUBPROCESS_TIMEOUT, manifest, read_beton, run_cli

from kdcache.augment import apply_view, choose_view, view_params
from kdcache.beton import dataset_info
from kdcache.errors import UserError
from kdcache.store import LogitCache, open_store
from kdcache.store_writer import DIE_AFTER_ENV

VIEWS = 3


def dump_args(synth, ckpt, out, *extra):
    return ("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
            "--out", out, *DUMP, *extra)


@pytest.fixture(scope="module")
def multi(synth, ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "cache.zarr"
    run_cli(*dump_args(synth, ckpt, out, "--views", VIEWS, "--view-seed", 7))
    return out


def raw_images(synth):
    images, labels, index = read_beton(synth / "train.beton")
    order = np.argsort(index)
    return torch.from_numpy(images[order]).permute(0, 3, 1, 2).float(), labels[order]


def normalise(x, m):
    return (x - torch.tensor(m["mean"]).view(1, 3, 1, 1)) / torch.tensor(m["std"]).view(1, 3, 1, 1)


def test_views_are_a_function_of_seed_sample_and_view():
    index = np.arange(1000)
    table = view_params(3, index, 4)
    assert table.shape == (1000, 4, 3) and table.dtype == np.int8
    assert np.array_equal(table[500:], view_params(3, index[500:], 4))  # whatever the chunk
    assert np.array_equal(view_params(3, index, 2), table[:, :2])       # view v does not depend on K
    assert not np.array_equal(view_params(4, index, 4), table)
    assert set(np.unique(table[:, :, :2])) == set(range(-4, 5)) and set(np.unique(table[:, :, 2])) == {0, 1}
    assert 0.45 < table[:, :, 2].mean() < 0.55
    # every K epochs each sample shows each of its views once, in a sample-dependent order
    shown = np.stack([choose_view(0, epoch, index, 4) for epoch in range(8)])
    assert all(np.array_equal(np.sort(shown[e:e + 4], axis=0), np.tile(np.arange(4)[:, None], (1, 1000)))
               for e in (0, 4))
    assert len(np.unique(shown[0])) == 4 and np.array_equal(shown[4], shown[0])


def test_store_holds_the_teacher_on_each_stored_view(synth, ckpt, multi, tmp_path):
    from kdcache.models import load_checkpoint

    g = open_store(str(multi))
    attrs = g.attrs.asdict()
    assert attrs["views"] == VIEWS and attrs["view_seed"] == 7 and attrs["view_recipe"] == "pad4-crop-flip"
    table = g["view_params"][:]
    n = dataset_info(synth / "train.beton").size
    assert np.array_equal(table, view_params(7, np.arange(n), VIEWS))
    logits = g["logits"][:]
    assert logits.shape == (n, VIEWS, 4) and logits.dtype == np.float16
    # the teacher run directly on each view's pixels, made by the loader's own function
    raw, labels = raw_images(synth)
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        for v in range(VIEWS):
            want = model(normalise(apply_view(raw, torch.from_numpy(table[:, v])), manifest(synth)))
            np.testing.assert_allclose(logits[:, v].astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
    views_differ = np.abs(logits[:, 0].astype(np.float32) - logits[:, 1]).max(1) > 1e-2
    assert views_differ.mean() > 0.5
    # scores and accuracy stay those of the clean image: the same as a single-view dump's
    single = tmp_path / "single.zarr"
    run_cli(*dump_args(synth, ckpt, single))
    s = open_store(str(single))
    for name in ("el2n", "grand", "margin"):
        np.testing.assert_array_equal(g["scores"][name][:], s["scores"][name][:], err_msg=name)
    assert attrs["teacher_accuracy"] == s.attrs["teacher_accuracy"]
    cache = LogitCache(str(multi))
    assert cache.views == VIEWS and cache.bytes_per_sample == VIEWS * 4 * 2 + VIEWS * 3
    rows = cache.logits(np.array([5, 2]))
    assert rows.shape == (2, VIEWS, 4) and np.array_equal(rows, logits[[5, 2]].astype(np.float32))
    out = run_cli("info", multi).output
    assert f"{VIEWS * 11} per sample" in out and f"{VIEWS} stored views (pad4-crop-flip, seed 7)" in out


def test_topk_multiview_store_rebuilds_each_views_target(synth, ckpt, multi, tmp_path):
    out = tmp_path / "topk.zarr"
    run_cli(*dump_args(synth, ckpt, out, "--views", VIEWS, "--view-seed", 7, "--topk", 2, "--temperature", 2))
    full = open_store(str(multi))["logits"][:].astype(np.float32)
    rows = LogitCache(str(out)).logits(np.arange(len(full)))
    assert rows.shape == full.shape
    q = torch.softmax(torch.from_numpy(rows) / 2, -1).numpy()
    p = torch.softmax(torch.from_numpy(full) / 2, -1).numpy()
    top2 = np.sort(p, -1)[..., -2:]
    np.testing.assert_allclose(np.sort(q, -1)[..., -2:], top2, atol=2e-3)  # each view's own top 2


def test_sampled_multiview_store_draws_from_each_views_teacher(synth, ckpt, multi, tmp_path):
    from kdcache.sparse import sample_targets

    out = tmp_path / "sampled.zarr"
    run_cli(*dump_args(synth, ckpt, out, "--views", VIEWS, "--view-seed", 7, "--sample", 5,
                       "--temperature", 2, "--sample-seed", 3))
    g = open_store(str(out))
    full = open_store(str(multi))["logits"][:].astype(np.float32)
    n = len(full)
    assert g["sample_classes"].shape == (n, VIEWS, 4) and g["sample_counts"].shape == (n, VIEWS, 4)
    assert np.array_equal(g["view_params"][:], open_store(str(multi))["view_params"][:])
    assert (g["sample_counts"][:].sum(-1) == 5).all()  # every view of every sample: 5 draws
    # view v's draws come from the teacher's tempered distribution on view v (float16 logits here, so
    # a draw right at a class boundary may differ: allow a handful)
    p = torch.softmax(torch.from_numpy(full) / 2, -1).numpy()
    classes, counts = sample_targets(p, np.arange(n), 5, 3)
    rows = LogitCache(str(out)).logits(np.arange(n))
    want = np.zeros((n, VIEWS, 4))
    np.put_along_axis(want, classes, counts / 5, axis=-1)
    got = torch.softmax(torch.from_numpy(rows) / 2, -1).numpy()
    assert rows.shape == (n, VIEWS, 4) and (np.abs(got - want).max(-1) > 1e-6).mean() < 0.01
    # one view: the draws of a clean-view store of the same seed (a view's draws follow the sample's)
    one_view, _ = sample_targets(p[:, :1], np.arange(n), 5, 3)
    clean, _ = sample_targets(p[:, 0], np.arange(n), 5, 3)
    assert np.array_equal(one_view[:, 0], clean)


@pytest.mark.slow
def test_killed_multiview_dump_resumes_to_the_same_store(synth, ckpt, multi, tmp_path):
    out = tmp_path / "cache.zarr"
    args = dump_args(synth, ckpt, out, "--views", VIEWS, "--view-seed", 7)
    run = subprocess.run([sys.executable, "-m", "kdcache_cli.main", *map(str, args)],
                         env={**os.environ, DIE_AFTER_ENV: "2"}, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode == -9, run.stderr
    with pytest.raises(UserError, match="2 of 4 chunks missing"):
        LogitCache(str(out))
    run_cli(*args)
    a, b = open_store(str(out)), open_store(str(multi))
    for name in ("logits", "view_params", "labels", "scores/el2n"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    r = run_cli(*dump_args(synth, ckpt, out, "--views", 2, "--view-seed", 7), expect=2)
    assert "has another number of views (3, this dump: 2)" in r.output


def test_student_sees_exactly_the_stored_view_its_target_is_for(synth, multi, ckpt):
    from kdcache.loader import Batches
    from kdcache.models import load_checkpoint
    from kdcache.teachers import CachedTeacher

    info = dataset_info(synth / "train.beton")
    cache = LogitCache(str(multi), info)
    chosen = np.arange(1, 400, 3)
    cached = CachedTeacher(cache, chosen, info.size, torch.device("cpu"))
    assert np.array_equal(cached.views, cache.view_params())
    raw, _ = raw_images(synth)
    batches = Batches(info, batch_size=32, train=True, indices=chosen, seed=5, views=cached.views, num_workers=1)
    logits = open_store(str(multi))["logits"][:].astype(np.float32)
    model, _ = load_checkpoint(ckpt)
    for epoch in range(2):
        seen = []
        for x, _, index, view in batches:
            i = index.numpy()
            assert np.array_equal(view.numpy(), choose_view(5, epoch, i, VIEWS))
            want = normalise(apply_view(raw[i], torch.from_numpy(cached.views[i, view.numpy()])), manifest(synth))
            torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
            target = cached(x, index, view)
            assert np.array_equal(target.numpy(), logits[i, view.numpy()])
            with torch.no_grad():  # the teacher run on the replayed batch gives its stored outputs back
                torch.testing.assert_close(model(x), target, rtol=2e-3, atol=2e-3)
            seen.append(i)
        assert np.array_equal(np.sort(np.concatenate(seen)), chosen)


def test_training_from_a_multiview_cache(synth, multi, tmp_path):
    import json

    base = ("train", "--data", synth / "train.beton", "--fraction", 0.5, "--alpha", 0.9, "--epochs", 2,
            "--arch", "resnet8", "--batch-size", 32, "--workers", 1)
    run_cli(*base, "--cache", multi, "--out", tmp_path / "multi")
    cfg = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert cfg["teacher_targets"] == f"{VIEWS} stored views per sample (pad4-crop-flip), replayed to the student"
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1 and summary["cache_bytes_per_sample"] == VIEWS * 11
    r = run_cli(*base, "--cache", multi, "--no-augment", "--out", tmp_path / "clean", expect=2)
    assert "none for the clean image" in r.output and "Traceback" not in r.output


def test_view_mistakes_are_one_line_errors(synth, ckpt, multi, tmp_path):
    for extra, message in [(("--views", 0), "--views must be at least 1")]:
        r = run_cli(*dump_args(synth, ckpt, tmp_path / "s.zarr", *extra), expect=2)
        assert message in r.output and "Traceback" not in r.output
    # a multi-view store of another dataset
    run_cli("data", "synthetic", "--out", tmp_path / "other", "--num-train", 400, "--num-test", 200,
            "--num-classes", 4, "--image-size", 16, "--seed", 1, "--workers", 1)
    r = run_cli("train", "--data", tmp_path / "other" / "train.beton", "--cache", multi, "--alpha", 0.9,
                "--fraction", 0.5, "--epochs", 1, "--arch", "resnet8", "--workers", 1, "--out", tmp_path / "x",
                expect=2)
    assert "was made from another dataset" in r.output and not (tmp_path / "x").exists()


def test_a_store_made_before_views_existed_resumes(synth, ckpt, tmp_path):
    out = tmp_path / "old.zarr"
    run_cli(*dump_args(synth, ckpt, out))
    g = open_store(str(out), "r+")
    attrs = {k: v for k, v in g.attrs.asdict().items() if k not in ("views", "view_seed", "view_recipe")}
    g.attrs.put(attrs)  # as an earlier kdcache wrote it
    assert "views" not in open_store(str(out)).attrs
    run_cli(*dump_args(synth, ckpt, out))  # the same dump again: nothing to do, no refusal
    assert LogitCache(str(out)).views == 1
    r = run_cli(*dump_args(synth, ckpt, out, "--views", 2), expect=2)
    assert "has another number of views (1, this dump: 2)" in r.output
