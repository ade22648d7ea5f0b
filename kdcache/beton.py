"""Write a `Source` into FFCV `.beton` files plus a JSON manifest, and read the manifest back.

Each beton has three fields: `image`, `label`, and `index` (the sample's position in the full split,
the key that joins logits, scores and selections). The manifest's fingerprints let later stages
refuse to join a cache with the wrong dataset.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import UserError
from .files import atomic, now, write_json
from .sources import Source, Split

MANIFEST = "manifest.json"
STATS_SAMPLE = 2000  # image folders: the training images the channel mean and std are measured on
CROP_RATIO = 224 / 256  # image folders: the side models see over the stored side (ImageNet's centre crop)
LARGE_SIDE = 224        # ... and the side they see once the stored side is 256 px or more


def fingerprint(split: Split) -> str:
    """SHA-256 of the labels and the image bytes (file bytes for image folders), in index order."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    if split.images is not None:
        h.update(np.ascontiguousarray(split.images).tobytes())
    for path in split.paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:32]


def sample_keys(split: Split) -> list[str] | str:
    """The index contract: each sample's key, in index order. An image folder's sample is its path under the
    split root (`class/file.jpg`, what torchvision's ImageFolder lists); an in-memory source's (CIFAR, MNIST)
    is its position in the official split, written as "position"."""
    if not split.paths:
        return "position"
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in split.paths]


class _Indexed:
    """The indexable dataset FFCV's writer reads: (image, label, index) per sample."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if self.split.images is not None:
            image = self.split.images[i]
        else:
            from PIL import Image
            with Image.open(self.split.paths[i]) as im:
                image = np.asarray(im.convert("RGB"))
        return image, int(self.split.labels[i]), i


def write_beton(split: Split, path: Path, *, jpeg: bool, max_side: int | None,
                jpeg_quality: int, num_workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image_field = (RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality)
                   if jpeg else RGBImageField(write_mode="raw"))
    with atomic(path) as tmp:  # a beton under its final name is always complete
        writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField(), "index": IntField()},
                               num_workers=num_workers)
        writer.from_indexed_dataset(_Indexed(split))


def pixel_stats(split: Split, block: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..255) of a split's pixels, in blocks (no float64 copy of the whole
    set); for an image folder, of a seeded sample of STATS_SAMPLE images at their stored size."""
    if split.images is not None:
        blocks = (split.images[i:i + block] for i in range(0, len(split.images), block))
    else:
        from PIL import Image
        pick = np.random.default_rng(0).permutation(len(split.paths))[:STATS_SAMPLE]
        blocks = (np.asarray(Image.open(split.paths[i]).convert("RGB"))[None] for i in sorted(pick))
    n, total, squares = 0, np.zeros(3), np.zeros(3)
    for images in blocks:
        pixels = images.reshape(-1, 3).astype(np.float64)
        n, total, squares = n + len(pixels), total + pixels.sum(0), squares + (pixels * pixels).sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0))
    return mean.round(3).tolist(), std.round(3).tolist()


def convert(source: Source, out_dir: str | Path, *, max_side: int = 256, jpeg_quality: int = 90,
            num_workers: int = -1, src: str | None = None, crop_side: int | None = None) -> dict:
    """Write train.beton, test.beton and manifest.json into `out_dir`; return the manifest."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}")
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is written last: its presence means done

    jpeg = source.train.images is None
    splits = {}
    for name, split in (("train", source.train), ("test", source.test)):
        if len(split) == 0:
            raise UserError(f"the {name} split of {source.name} is empty")
        write_beton(split, out / f"{name}.beton", jpeg=jpeg, max_side=max_side,
                    jpeg_quality=jpeg_quality, num_workers=num_workers)
        counts = np.bincount(split.labels, minlength=len(source.classes))
        splits[name] = {"file": f"{name}.beton", "size": len(split), "fingerprint": fingerprint(split),
                        "class_counts": counts.tolist(), "keys": sample_keys(split)}

    mean, std = pixel_stats(source.train)
    manifest = {
        "schema": 1,
        "source": source.name,
        "src": str(src) if src else None,
        "num_classes": len(source.classes),
        "classes": source.classes,
        "image_shape": None if jpeg else list(source.train.images.shape[1:]),
        "max_side": max_side if jpeg else None,
        "crop_side": (crop_side or default_crop(max_side)) if jpeg else None,
        "mean": mean,
        "std": std,
        "splits": splits,
        "fingerprint": hashlib.sha256((splits["train"]["fingerprint"] + splits["test"]["fingerprint"])
                                      .encode()).hexdigest()[:32],
        "kdcache_version": __version__,
        "created": now(),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def default_crop(max_side: int) -> int:
    """The side models see of images stored at `max_side`: ImageNet's 224 from 256 px up, else 7/8."""
    return LARGE_SIDE if max_side >= 256 else int(max_side * CROP_RATIO)


@dataclass(frozen=True)
class DatasetInfo:
    """One split of a converted dataset, as its manifest describes it.

    Three fingerprints, one meaning each: `split_fingerprint` is this split's (images and labels),
    `train_fingerprint` the training split's (what stores and selections are made from and checked
    against), `dataset_fingerprint` the whole dataset's, train and test (what `kdcache data` prints)."""

    path: str                       # this split's .beton
    split: str                      # "train" or "test"
    size: int                       # samples in this split
    source: str
    num_classes: int
    classes: list
    image_shape: list | None        # (H, W, 3) of small in-memory images; None for image folders (JPEG)
    max_side: int | None            # image folders: the longest stored side
    crop_side: int | None           # image folders: the side models see (a crop of the stored image)
    mean: list                      # per-channel pixel mean and std (0..255) used to normalise
    std: list
    split_fingerprint: str
    train_fingerprint: str
    dataset_fingerprint: str
    manifest: dict                  # the manifest as written, recorded in stores made from this dataset

    @property
    def small(self) -> bool:
        """Small images (CIFAR-like) are stored raw at full size; image folders as JPEG."""
        return self.image_shape is not None

    @property
    def image_size(self) -> int:
        """The side length models see: the stored side for small images, a centre-crop size for image folders."""
        if self.small:
            return int(self.image_shape[0])
        return self.crop_side or default_crop(self.max_side or 256)


def dataset_info(beton: str | Path) -> DatasetInfo:
    """The description of the dataset split a beton holds, from the manifest beside it. Raises
    UserError for a missing beton or manifest."""
    beton = Path(beton)
    if not beton.is_file():
        raise UserError(f"beton file not found: {beton}")
    mpath = beton.parent / MANIFEST
    if not mpath.is_file():
        raise UserError(f"no {MANIFEST} next to {beton}: convert the data with `kdcache data` first")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{mpath} is not valid JSON")
    for name, split in m["splits"].items():
        if split["file"] == beton.name:
            return DatasetInfo(
                path=str(beton), split=name, size=split["size"], source=m["source"],
                num_classes=m["num_classes"], classes=m["classes"], image_shape=m["image_shape"],
                max_side=m.get("max_side"), crop_side=m.get("crop_side"), mean=m["mean"], std=m["std"],
                split_fingerprint=split["fingerprint"],
                train_fingerprint=m["splits"]["train"]["fingerprint"], dataset_fingerprint=m["fingerprint"],
                manifest=m)
    raise UserError(f"{beton} is not listed in {mpath}")


def beton_labels(beton: str | Path) -> np.ndarray:
    """All labels of a beton in sample-index order, read from its metadata table (no image decoding)."""
    from ffcv.reader import Reader

    meta = Reader(str(beton)).metadata
    labels = np.empty(len(meta), dtype=np.int64)
    labels[meta["f2"]] = meta["f1"]  # fields: f0 image, f1 label, f2 index
    return labels


def read_beton(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (raw image, label, sample index) of a small-image beton, in stored order, one process: the
    very pixels the loaders decode (tests and benchmarks compare against them)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    images, labels, index = zip(*((np.array(x), np.array(y).ravel(), np.array(i).ravel()) for x, y, i in loader))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(index)
