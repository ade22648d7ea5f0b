import gzip
import pickle
import struct

import numpy as np
import pytest
from conftest import SHARED_CIFAR10, make_image_folder, manifest, read_beton, run_cli, run_console
from PIL import Image

from kdcache.sources import make_synthetic


def check_round_trip(out, images, labels, split="train"):
    got_images, got_labels, got_index = read_beton(out / f"{split}.beton")
    assert sorted(got_index.tolist()) == list(range(len(labels)))  # every index exactly once
    np.testing.assert_array_equal(got_labels, labels[got_index])
    if images is not None:
        np.testing.assert_array_equal(got_images, images[got_index])


def write_idx(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_cifar10(folder, rng, per_batch=20):
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        pickle.dump({b"data": data, b"labels": labels}, open(folder / name, "wb"))
        batches.append((data, labels))
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, open(folder / "batches.meta", "wb"))
    data = np.concatenate([b[0] for b in batches[:5]])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.concatenate([b[1] for b in batches[:5]])


def test_synthetic_round_trip(synth):
    src = make_synthetic(num_train=400, num_test=200, num_classes=4, image_size=16)
    check_round_trip(synth, src.train.images, src.train.labels)
    check_round_trip(synth, src.test.images, src.test.labels, "test")
    m = manifest(synth)
    assert m["num_classes"] == 4 and m["image_shape"] == [16, 16, 3]
    assert m["splits"]["train"]["size"] == 400 and m["splits"]["test"]["size"] == 200
    assert sum(m["splits"]["train"]["class_counts"]) == 400
    assert len(m["classes"]) == 4 and len(m["mean"]) == 3
    # the normalisation constants every model sees: the training pixels' per-channel mean and std
    pixels = src.train.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(m["mean"], pixels.mean(0), atol=1e-3)
    np.testing.assert_allclose(m["std"], pixels.std(0), atol=1e-3)


def test_fingerprint_stable_and_sensitive(tmp_path, synth):
    run_cli("data", "synthetic", "--out", tmp_path / "again", "--num-train", 400, "--num-test", 200,
            "--num-classes", 4, "--image-size", 16, "--workers", 1)
    assert manifest(tmp_path / "again")["fingerprint"] == manifest(synth)["fingerprint"]

    from kdcache.beton import fingerprint
    src = make_synthetic(num_train=50, num_test=10)
    before = fingerprint(src.train)
    src.train.labels[7] = (src.train.labels[7] + 1) % 10
    assert fingerprint(src.train) != before
    src.train.labels[7] = (src.train.labels[7] - 1) % 10
    assert fingerprint(src.train) == before
    src.train.images[3, 0, 0, 0] ^= 1
    assert fingerprint(src.train) != before


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=30)
    write_idx(tmp_path / "src", "train", train, train_labels)
    write_idx(tmp_path / "src", "t10k", train[:10], train_labels[:10])
    run_cli("data", "fashion-mnist", "--src", tmp_path / "src", "--out", tmp_path / "out", "--workers", 1)
    check_round_trip(tmp_path / "out", np.repeat(train[..., None], 3, axis=3), train_labels)
    m = manifest(tmp_path / "out")
    assert m["image_shape"] == [28, 28, 3] and m["classes"][0] == "T-shirt/top"


def test_cifar10_round_trip(tmp_path):
    images, labels = write_cifar10(tmp_path / "src", np.random.default_rng(1))
    run_cli("data", "cifar10", "--src", tmp_path / "src", "--out", tmp_path / "out", "--workers", 1)
    check_round_trip(tmp_path / "out", images, labels)
    assert manifest(tmp_path / "out")["classes"][:2] == ["c0", "c1"]


def test_cifar100_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "src").mkdir()
    splits = {}
    for name, n in (("train", 40), ("test", 24)):  # different data in each split: a swap would show
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n).tolist()
        pickle.dump({b"data": data, b"fine_labels": labels}, open(tmp_path / "src" / name, "wb"))
        splits[name] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)
    pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, open(tmp_path / "src" / "meta", "wb"))
    run_cli("data", "cifar100", "--src", tmp_path / "src", "--out", tmp_path / "out", "--workers", 1)
    for name, (images, labels) in splits.items():
        check_round_trip(tmp_path / "out", images, labels, name)
    assert manifest(tmp_path / "out")["num_classes"] == 100


def test_imagefolder_round_trip(tmp_path):
    make_image_folder(tmp_path / "src", np.random.default_rng(3))
    run_cli("data", "imagefolder", "--src", tmp_path / "src", "--out", tmp_path / "out", "--max-side", 32,
            "--workers", 1)
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(tmp_path / "out" / "train.beton"), batch_size=16, num_workers=1, drop_last=False,
                    order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()],
                               "index": [IntDecoder()]})
    (x, y, i), = list(loader)
    assert x.shape == (7, 16, 16, 3)
    assert y.ravel().tolist() == [0, 0, 0, 1, 1, 1, 1] and i.ravel().tolist() == list(range(7))
    m = manifest(tmp_path / "out")
    assert m["classes"] == ["cat", "dog"] and m["image_shape"] is None and m["max_side"] == 32
    # its own channel statistics (not ImageNet's), over the training images as stored on disk
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3)
                             for p in sorted((tmp_path / "src" / "train").rglob("*.png"))]).astype(np.float64)
    np.testing.assert_allclose(m["mean"], pixels.mean(0), atol=1e-3)
    np.testing.assert_allclose(m["std"], pixels.std(0), atol=1e-3)
    from kdcache.beton import dataset_info
    assert m["crop_side"] == 28 and dataset_info(tmp_path / "out" / "train.beton").image_size == 28  # 7/8 of 32
    run_cli("data", "imagefolder", "--src", tmp_path / "src", "--out", tmp_path / "crop", "--max-side", 32,
            "--crop-side", 24, "--workers", 1)
    assert dataset_info(tmp_path / "crop" / "train.beton").image_size == 24
    r = run_cli("data", "imagefolder", "--src", tmp_path / "src", "--out", tmp_path / "bad", "--max-side", 32,
                "--crop-side", 40, expect=2)
    assert "--crop-side must be between 8 and --max-side (32), got 40" in r.output


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared CIFAR-10 absent")
@pytest.mark.slow
def test_real_cifar10(tmp_path):
    run_cli("data", "cifar10", "--src", SHARED_CIFAR10.parent, "--out", tmp_path)
    from kdcache.sources import load_cifar10
    src = load_cifar10(SHARED_CIFAR10)
    check_round_trip(tmp_path, src.train.images, src.train.labels)
    m = manifest(tmp_path)
    assert m["splits"]["train"]["size"] == 50000 and m["splits"]["test"]["size"] == 10000
    assert m["splits"]["train"]["class_counts"] == [5000] * 10
    assert abs(m["mean"][0] - 125.3) < 0.5


@pytest.mark.slow
def test_bad_inputs(tmp_path):
    r = run_console("data", "cifar10", "--src", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip() == f"error: CIFAR-10 folder not found: {tmp_path / 'missing'}"
    assert "Traceback" not in r.stderr

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data_batch_1").write_bytes(b"not a pickle")
    r = run_cli("data", "cifar10", "--src", tmp_path / "bad", "--out", tmp_path / "o", expect=2)
    assert "not a CIFAR python-pickle batch" in r.output

    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\0\0garbage"))
    r = run_cli("data", "mnist", "--src", tmp_path / "idx", "--out", tmp_path / "o", expect=2)
    assert "bad magic number" in r.output

    make_image_folder(tmp_path / "imgs", np.random.default_rng(0))
    (tmp_path / "imgs" / "train" / "bird").mkdir()
    (tmp_path / "imgs" / "val" / "bird").mkdir()
    r = run_cli("data", "imagefolder", "--src", tmp_path / "imgs", "--out", tmp_path / "o", expect=2)
    assert "empty class folder" in r.output and "bird" in r.output

    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("data", "synthetic", "--out", blocker / "sub", expect=2)
    assert r.output.startswith("error: cannot write to")


def test_interrupted_conversion_leaves_no_finished_files(tmp_path, monkeypatch):
    import kdcache.beton as beton

    calls = []

    def crash_on_test(split, path, **kw):
        calls.append(path.name)
        if path.name == "test.beton":
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(split, path, **kw)

    real = beton.write_beton
    monkeypatch.setattr(beton, "write_beton", crash_on_test)
    with pytest.raises(KeyboardInterrupt):
        beton.convert(make_synthetic(num_train=20, num_test=10), tmp_path, num_workers=1)
    assert calls == ["train.beton", "test.beton"]
    assert not (tmp_path / "test.beton").exists() and not (tmp_path / "manifest.json").exists()
    from kdcache.errors import UserError
    with pytest.raises(UserError, match="no manifest.json"):
        beton.dataset_info(tmp_path / "train.beton")
