"""Dataset sources: read each supported on-disk layout into plain arrays (or file lists).

Every source yields a `Source` with a train and a test `Split`. In-memory sources hold images as
(N, H, W, 3) uint8; the image-folder source holds file paths and is decoded by the beton writer.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Split:
    labels: np.ndarray                      # (N,) int64
    images: np.ndarray | None = None        # (N, H, W, 3) uint8, for in-memory sources
    paths: list[str] = field(default_factory=list)  # image files, for the image-folder source

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    name: str
    classes: list[str]
    train: Split
    test: Split


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} folder not found: {path}")
    return path


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # any unpickling failure means the file is not what we expect
        raise UserError(f"cannot read {path}: not a CIFAR python-pickle batch ({type(e).__name__})")


def _cifar_split(batches: list[dict], label_key: bytes, path: Path) -> Split:
    try:
        data = np.concatenate([b[b"data"] for b in batches])
        labels = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
    except (KeyError, ValueError) as e:
        raise UserError(f"malformed CIFAR batch in {path}: {e}")
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise UserError(f"malformed CIFAR batch in {path}: data shape {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> NHWC
    return Split(labels=labels, images=np.ascontiguousarray(images, dtype=np.uint8))


def load_cifar10(src: Path) -> Source:
    src = _require_dir(src, "CIFAR-10")
    if (src / "cifar-10-batches-py").is_dir():
        src = src / "cifar-10-batches-py"
    train = _cifar_split([_unpickle(src / f"data_batch_{i}") for i in range(1, 6)], b"labels", src)
    test = _cifar_split([_unpickle(src / "test_batch")], b"labels", src)
    meta = _unpickle(src / "batches.meta")
    classes = [c.decode() for c in meta.get(b"label_names", [])] or [str(i) for i in range(10)]
    return Source("cifar10", classes, train, test)


def load_cifar100(src: Path) -> Source:
    src = _require_dir(src, "CIFAR-100")
    if (src / "cifar-100-python").is_dir():
        src = src / "cifar-100-python"
    train = _cifar_split([_unpickle(src / "train")], b"fine_labels", src)
    test = _cifar_split([_unpickle(src / "test")], b"fine_labels", src)
    meta = _unpickle(src / "meta")
    classes = [c.decode() for c in meta.get(b"fine_label_names", [])] or [str(i) for i in range(100)]
    return Source("cifar100", classes, train, test)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}")
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise UserError(f"malformed IDX file {path}: bad magic number")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"malformed IDX file {path}: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _idx_split(src: Path, prefix: str) -> Split:
    images = _read_idx(src / f"{prefix}-images-idx3-ubyte.gz", 0x00000803)
    labels = _read_idx(src / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{src}: {len(images)} {prefix} images but {len(labels)} labels")
    # Grey images become 3-channel so every model and pipeline sees one image format.
    return Split(labels=labels, images=np.ascontiguousarray(np.repeat(images[..., None], 3, axis=3)))


def load_idx(name: str, src: Path) -> Source:
    src = _require_dir(src, name)
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return Source(name, classes, _idx_split(src, "train"), _idx_split(src, "t10k"))


def _folder_split(root: Path, classes: list[str] | None) -> tuple[Split, list[str]]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes is None:
        classes = found
        if not classes:
            raise UserError(f"no class folders in {root}")
    elif found != classes:
        raise UserError(f"{root} has classes {sorted(set(found) ^ set(classes))} that the other split lacks")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"empty class folder: {root / name}")
        paths += files
        labels += [label] * len(files)
    return Split(labels=np.asarray(labels, dtype=np.int64), paths=paths), classes


def load_imagefolder(src: Path) -> Source:
    src = _require_dir(src, "image")
    test_dir = next((src / d for d in ("val", "test") if (src / d).is_dir()), None)
    if not (src / "train").is_dir() or test_dir is None:
        raise UserError(f"{src} must hold train/ and val/ (or test/), each with one folder per class")
    train, classes = _folder_split(src / "train", None)
    test, _ = _folder_split(test_dir, classes)
    return Source("imagefolder", classes, train, test)


def make_synthetic(num_train: int = 1000, num_test: int = 500, num_classes: int = 10,
                   image_size: int = 32, seed: int = 0) -> Source:
    """A deterministic dataset with learnable structure: each class is a smooth colour pattern,
    each sample a randomly shifted, noisy copy of its class pattern."""
    if min(num_train, num_test, num_classes, image_size) < 1:
        raise UserError("synthetic sizes must be positive")
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    reps = -(-(image_size + 8) // 4)
    patterns = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)  # blocky, shift-tolerant

    def split(n: int) -> Split:
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        dx, dy = rng.integers(0, 8, size=(2, n))
        images = np.stack([patterns[c, y:y + image_size, x:x + image_size] for c, x, y in zip(labels, dx, dy)])
        images = images + rng.normal(0, 40, size=images.shape)
        return Split(labels=labels.astype(np.int64), images=np.clip(images, 0, 255).astype(np.uint8))

    return Source("synthetic", [f"class{i}" for i in range(num_classes)], split(num_train), split(num_test))


def load_source(name: str, src: str | None, **synthetic_options) -> Source:
    """Read the named source; `src` is its folder (None for the default where there is one)."""
    if name == "synthetic":
        return make_synthetic(**synthetic_options)
    if name == "fashion-mnist" and src is None:
        src = FASHION_MNIST_DIR
    if src is None:
        raise UserError(f"source {name} needs --src FOLDER")
    loaders = {"cifar10": load_cifar10, "cifar100": load_cifar100, "imagefolder": load_imagefolder,
               "fashion-mnist": lambda p: load_idx("fashion-mnist", p), "mnist": lambda p: load_idx("mnist", p)}
    return loaders[name](Path(src))


SOURCES = ["cifar10", "cifar100", "fashion-mnist", "mnist", "imagefolder", "synthetic"]
