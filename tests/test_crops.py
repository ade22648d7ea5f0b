"""Image folders' random-resized crops (`kdcache.crops`): drawn as torchvision draws them, seeded per
sample, and stored as crop views (`kdcache dump --views K`) that the trainer replays exactly."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT, kill_at, make_image_folder, make_teacher, run_cli

from kdcache import crops
from kdcache.beton import dataset_info
from kdcache.errors import UserError
from kdcache.store import LogitCache, open_store

VIEWS = 3
DUMP = ("--batch-size", 8, "--chunk-rows", 16, "--workers", 1)
TRAIN = ("--arch", "resnet8", "--batch-size", 16, "--workers", 1, "--epochs", 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny image folder (48 training images of several shapes) stored at 32 px; models see 28 px."""
    root = tmp_path_factory.mktemp("folder")
    make_image_folder(root / "src", np.random.default_rng(0), counts=(("cat", 24), ("dog", 24)))
    run_cli("data", "imagefolder", "--src", root / "src", "--out", root / "data", "--max-side", 32, "--workers", 1)
    return root / "data"


@pytest.fixture(scope="module")
def teacher(folder, tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", 0, "resnet8", 2, 28)


def dump_args(folder, teacher, out, *extra):
    return ("dump", "--teacher", "resnet8", "--checkpoint", teacher, "--data", folder / "train.beton",
            "--out", out, *DUMP, *extra)


@pytest.fixture(scope="module")
def multi(folder, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "cache.zarr"
    run_cli(*dump_args(folder, teacher, out, "--views", VIEWS, "--view-seed", 7))
    return out


def test_boxes_follow_torchvision_and_stay_inside():
    from torchvision.transforms import RandomResizedCrop

    n, (H, W) = 40000, (300, 400)
    u = crops.uniforms(0, np.arange(n), 2 * crops.ATTEMPTS + 2)
    ours = crops.boxes(u, np.full(n, H), np.full(n, W))
    torch.manual_seed(0)
    image = torch.empty(3, H, W)
    theirs = np.array([RandomResizedCrop.get_params(image, list(crops.SCALE), list(crops.RATIO))
                       for _ in range(n)])
    for boxes in (ours, theirs):
        assert (boxes[:, 2:] > 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= H).all() and (boxes[:, 1] + boxes[:, 3] <= W).all()
    scale = [b[:, 2] * b[:, 3] / (H * W) for b in (ours, theirs)]
    ratio = [b[:, 3] / b[:, 2] for b in (ours, theirs)]
    for a, b in (scale, ratio):  # the same distribution: means and deciles within 1%
        assert a.mean() == pytest.approx(b.mean(), rel=0.01)
        np.testing.assert_allclose(np.quantile(a, np.linspace(0.1, 0.9, 9)),
                                   np.quantile(b, np.linspace(0.1, 0.9, 9)), rtol=0.01, atol=0.002)
    # inside SCALE up to torchvision's rounding of each side to whole pixels (its own boxes go below 0.08 too):
    # h w >= (th - 1/2)(tw - 1/2) with th tw >= 0.08 H W and th <= h + 1/2, tw <= w + 1/2
    h, w = ours[:, 2], ours[:, 3]
    assert (h * w >= crops.SCALE[0] * H * W - 0.5 * (h + w + 1)).all() and scale[0].max() <= 1
    assert math.log(3 / 4) - 0.05 < np.log(ratio[0]).min() and np.log(ratio[0]).max() < math.log(4 / 3) + 0.05
    # extreme shapes fall back as torchvision does: the largest centred box whose ratio fits
    for h, w in ((10, 1000), (1000, 10), (7, 9)):
        got = crops.boxes(u[:200], np.full(200, h), np.full(200, w))
        assert (got[:, 0] >= 0).all() and (got[:, 0] + got[:, 2] <= h).all() and (got[:, 1] + got[:, 3] <= w).all()
    assert crops.boxes(u[:1], [10], [1000]).tolist() == [[0, 493, 10, 13]]
    assert crops.boxes(u[:1], [1000], [10]).tolist() == [[493, 0, 13, 10]]
    # encoded as normalised uint16 corners: inside the image, non-empty, and a function of the sample only
    sizes = np.random.default_rng(1).integers(20, 500, size=(2, 1000))
    p = crops.draw(3, 5, np.arange(1000), *sizes)
    assert p.dtype == np.uint16 and (p[:, 0] < p[:, 2]).all() and (p[:, 1] < p[:, 3]).all()
    assert np.array_equal(crops.draw(3, 5, np.arange(500, 1000), *sizes[:, 500:]), p[500:])
    assert not np.array_equal(crops.draw(3, 6, np.arange(1000), *sizes), p)
    assert 0.45 < p[:, 4].mean() < 0.55


def cut(info, table):
    """Every sample's crops as the dump makes them: {sample index: (V, C, H, W) raw float pixels}."""
    from kdcache.loader import Batches

    out = {}
    for x, _, index, _ in Batches(info, batch_size=16, train=False, crops=table, normalise=False, num_workers=1):
        out.update(zip(index.tolist(), x))
    return out


def test_the_decoder_cuts_the_box_and_flips(folder):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from kdcache.beton import CROP_RATIO

    info = dataset_info(folder / "train.beton")
    heights, widths = crops.image_sizes(info.path)
    assert set(heights.tolist()) | set(widths.tolist()) > {32}  # images of several shapes
    # the centre crop, cut from the table, is FFCV's own centre crop to the pixel (the one-view dump's)
    centre, flipped = crops.centre(heights, widths, CROP_RATIO), crops.centre(heights, widths, CROP_RATIO)
    flipped[:, 4] = 1
    got = cut(info, np.stack([centre, flipped, crops.draw(0, 0, np.arange(info.size), heights, widths)], axis=1))
    loader = Loader(info.path, batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((28, 28), ratio=CROP_RATIO)],
                               "label": [IntDecoder()], "index": [IntDecoder()]})
    for x, _, index in loader:
        for k, image in zip(np.asarray(index).ravel().tolist(), np.asarray(x)):
            want = torch.from_numpy(image).permute(2, 0, 1).float()
            assert got[k].shape == (3, 3, 28, 28)
            assert torch.equal(got[k][0], want) and torch.equal(got[k][1], want.flip(2))  # and mirrored
    assert any(not torch.equal(got[k][2], got[k][0]) for k in got)  # a random box is another picture


def test_seeded_crops_are_reproducible(folder):
    from kdcache.loader import Batches

    info = dataset_info(folder / "train.beton")
    heights, widths = crops.image_sizes(info.path)
    everyone = np.arange(info.size)
    # what each epoch must show: the seeded boxes of (seed 3, epoch, sample), cut by the dump's code
    want = [cut(info, crops.draw(3, epoch, everyone, heights, widths)[:, None]) for epoch in range(2)]
    runs = []
    for _ in range(2):
        b = Batches(info, batch_size=16, train=True, seed=3, num_workers=1, normalise=False)
        epochs = []
        for epoch in range(2):
            seen = {}
            for x, _, index, _ in b:
                i = index.numpy()
                assert x.shape == (len(i), 3, 28, 28)
                assert all(torch.equal(xk, want[epoch][k][0]) for k, xk in zip(i.tolist(), x))  # whatever the batch
                seen.update(zip(i.tolist(), x))
            epochs.append(seen)
        runs.append(epochs)
    for k in runs[0][0]:
        assert torch.equal(runs[0][0][k], runs[1][0][k]) and torch.equal(runs[0][1][k], runs[1][1][k])
    assert any(not torch.equal(runs[0][0][k], runs[0][1][k]) for k in runs[0][0])  # a new crop each epoch


@pytest.mark.slow  # spawns a process that kills itself
def test_seeded_crops_train_identically_and_resume(folder, tmp_path):
    args = ["train", "--data", folder / "train.beton", "--alpha", 0, *TRAIN]
    run_cli(*args, "--out", tmp_path / "a")
    run_cli(*args, "--out", tmp_path / "b")
    kill_at(args, tmp_path / "killed", "1")
    run_cli(*args, "--out", tmp_path / "killed", "--resume")
    weights = [torch.load(tmp_path / r / "model.pt", weights_only=False)["state_dict"] for r in ("a", "b", "killed")]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
        torch.testing.assert_close(weights[2][k].float(), weights[0][k].float(), rtol=1e-4, atol=1e-5)


def test_the_student_sees_the_view_its_stored_row_is_for(folder, teacher, multi):
    from kdcache.augment import choose_view
    from kdcache.loader import Batches
    from kdcache.models import load_checkpoint
    from kdcache.train import CachedTeacher

    info = dataset_info(folder / "train.beton")
    cache = LogitCache(str(multi), info)
    assert cache.view_recipe == crops.recipe(28, 32) == open_store(str(multi)).attrs["view_recipe"]
    table = cache.view_params()
    assert table.shape == (info.size, VIEWS, 5) and table.dtype == np.uint16
    heights, widths = crops.image_sizes(info.path)
    assert np.array_equal(table, crops.view_params(7, np.arange(info.size), VIEWS, heights, widths))
    chosen = np.arange(1, info.size, 2)
    cached = CachedTeacher(cache, chosen, info.size, torch.device("cpu"))
    # the dump's pixels: each sample's stored views, cut by the dump's decoder from the stored table
    dumped = cut(info, table)
    logits = open_store(str(multi))["logits"][:].astype(np.float32)
    model, _ = load_checkpoint(teacher)
    batches = Batches(info, batch_size=8, train=True, indices=chosen, seed=5, views=cached.views, num_workers=1)
    for epoch in range(2):
        for x, _, index, view in batches:
            i, v = index.numpy(), view.numpy()
            assert np.array_equal(v, choose_view(5, epoch, i, VIEWS))
            want = batches.normalise(torch.stack([dumped[k][vk] for k, vk in zip(i.tolist(), v.tolist())]))
            assert torch.equal(x, want)
            target = cached(x, index, view)
            assert np.array_equal(target.numpy(), logits[i, v])
            with torch.no_grad():  # the teacher run on the replayed batch gives its stored rows back
                torch.testing.assert_close(model(x), target, rtol=2e-3, atol=2e-3)
    assert not np.array_equal(logits[:, 0], logits[:, 1])  # the views are other pictures


@pytest.mark.slow  # spawns a process that kills itself
def test_killed_crop_view_dump_resumes_identical(folder, teacher, multi, tmp_path):
    out = tmp_path / "cache.zarr"
    args = dump_args(folder, teacher, out, "--views", VIEWS, "--view-seed", 7)
    run = subprocess.run([sys.executable, "-m", "kdcache_cli.main", *map(str, args)],
                         env={**os.environ, "KDCACHE_DIE_AFTER_CHUNKS": "1"}, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode == -9, run.stderr
    with pytest.raises(UserError, match="2 of 3 chunks missing"):
        LogitCache(str(out))
    run_cli(*args)
    a, b = open_store(str(out)), open_store(str(multi))
    for name in ("logits", "view_params", "labels", "scores/el2n"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_topk_crop_views_hold_each_views_tempered_top_k(folder, teacher, multi, tmp_path):
    out = tmp_path / "top.zarr"
    run_cli(*dump_args(folder, teacher, out, "--views", VIEWS, "--view-seed", 7, "--topk", 1, "--temperature", 2))
    top, full = open_store(str(out)), open_store(str(multi))
    np.testing.assert_array_equal(top["view_params"][:], full["view_params"][:])  # the same crops
    logits = torch.from_numpy(full["logits"][:].astype(np.float32))
    values, classes = torch.log_softmax(logits / 2, dim=-1).topk(1, dim=-1)
    assert top["topk_values"].shape == (len(logits), VIEWS, 1)
    np.testing.assert_array_equal(top["topk_indices"][:], classes.numpy())
    np.testing.assert_allclose(top["topk_values"][:].astype(np.float32), values.numpy(), rtol=2e-3, atol=2e-3)
    assert LogitCache(str(out)).bytes_per_sample == VIEWS * (2 + 1 + 2 * 5)  # float16 + uint8 class + box
    # the clean image of a view dump is FFCV's centre crop, so its scores are a one-view dump's
    one = tmp_path / "one.zarr"
    run_cli(*dump_args(folder, teacher, one))
    for name in ("scores/el2n", "scores/margin", "labels"):
        np.testing.assert_array_equal(open_store(str(one))[name][:], full[name][:], err_msg=name)


@pytest.mark.slow
def test_training_from_crop_views_and_its_mistakes(folder, teacher, multi, tmp_path):
    base = ("train", "--data", folder / "train.beton", "--alpha", 0.9, *TRAIN)
    run_cli(*base, "--cache", multi, "--out", tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    recipe = crops.recipe(28, 32)
    assert cfg["teacher_targets"] == f"{VIEWS} stored views per sample ({recipe}), replayed to the student"
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["cache_bytes_per_sample"] == VIEWS * (2 * 2 + 2 * 5)  # float16 logits + uint16 boxes

    def refused(*args, message):
        r = run_cli(*args, expect=2)
        assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1

    refused(*dump_args(folder, teacher, tmp_path / "s.zarr", "--views", 0), message="--views must be at least 1")
    refused(*base, "--cache", multi, "--no-augment", "--out", tmp_path / "clean", message="none for the clean image")
    # the same images converted for 24 px crops: the 28 px views are another recipe's
    src = json.loads((folder / "manifest.json").read_text())["src"]
    run_cli("data", "imagefolder", "--src", src, "--out", tmp_path / "d24", "--max-side", 32, "--crop-side", 24,
            "--workers", 1)
    refused("train", "--data", tmp_path / "d24" / "train.beton", "--cache", multi, "--alpha", 0.9, *TRAIN,
            "--out", tmp_path / "x", message="holds views made by another recipe")
    assert not (tmp_path / "x").exists()
    # ... and stored at 36 px: 28 px crops of the same boxes, but cut from other pixels
    run_cli("data", "imagefolder", "--src", src, "--out", tmp_path / "d36", "--max-side", 36, "--crop-side", 28,
            "--workers", 1)
    refused("train", "--data", tmp_path / "d36" / "train.beton", "--cache", multi, "--alpha", 0.9, *TRAIN,
            "--out", tmp_path / "x", message="holds views made by another recipe")
    # views of another dataset
    run_cli("data", "synthetic", "--out", tmp_path / "other", "--num-train", 48, "--num-test", 16,
            "--num-classes", 2, "--image-size", 16, "--workers", 1)
    refused("train", "--data", tmp_path / "other" / "train.beton", "--cache", multi, "--alpha", 0.9, *TRAIN,
            "--out", tmp_path / "y", message="was made from another dataset")
    # crops larger than the stored images allow (a manifest that says so)
    m = json.loads((tmp_path / "d24" / "manifest.json").read_text())
    m["crop_side"] = 40
    (tmp_path / "d24" / "manifest.json").write_text(json.dumps(m))
    refused("train", "--data", tmp_path / "d24" / "train.beton", "--alpha", 0, *TRAIN, "--out", tmp_path / "z",
            message="crops of 40 px are larger than its images allow")
    refused("dump", "--teacher", "resnet8", "--checkpoint", teacher, "--data", tmp_path / "d24" / "train.beton",
            "--out", tmp_path / "z.zarr", "--views", 2, *DUMP, message="crops of 40 px are larger than its images")
