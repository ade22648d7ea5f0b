"""Dump a teacher from any PyTorch model and map-style dataset, without FFCV: the store `kdcache dump` writes
(chunks written as they fill and resumed after a crash, scores, labels, keys, fingerprints), from
`dataset[i] = (x, y)` with `x` already as the model wants it (your transform is the teacher's preprocessing).

    kdcache.dump_dataset(model, dataset, "cache.zarr", data="data")   # rows checked against `kdcache data`'s
    kdcache.dump_dataset(model, dataset, "cache.zarr", keys=paths)    # or keyed by your own sample keys
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import __version__, store
from .errors import UserError
from .store_writer import _finish, _Sink, autocast, prepare_store, store_attrs, store_targets


@dataclass(frozen=True)
class _Split:
    """What a store records of the dataset it was made from (the fields `store.root_attrs` reads)."""
    size: int
    num_classes: int
    train_fingerprint: str
    manifest: dict


def dump_dataset(model: nn.Module, dataset: Dataset, out: str | Path, *, data: str | Path | None = None,
                 keys: Sequence[str] | None = None, classes: Sequence[str] | None = None, teacher: str | None = None,
                 batch_size: int = 256, chunk_rows: int = 4096, topk: int | None = None, temperature: float = 4.0,
                 sample: int | None = None, sample_seed: int = 0, device: str = "cpu", workers: int = 0,
                 overwrite: bool = False) -> dict:
    """Write the teacher-logit store of `model` over every item of `dataset` (row i = dataset[i]) to `out`,
    resuming a matching unfinished one. `data`: the `kdcache data` folder the dataset is in index order of
    (its fingerprints and keys are recorded, so the store serves `kdcache train` too); otherwise the store's
    fingerprint is that of the labels and `keys` (each item's key; positions where None). Returns the
    store's root attributes."""
    labels = _labels(dataset)
    split = _split(dataset, labels, data, keys, classes)
    topk, sample = topk or None, sample or None
    if chunk_rows % batch_size or batch_size < 1:
        raise UserError(f"chunk_rows ({chunk_rows}) must be a positive multiple of batch_size ({batch_size})")
    if topk is not None and not 0 < topk < split.num_classes:
        raise UserError(f"topk must be between 1 and {split.num_classes - 1}")
    if sample and topk:
        raise UserError("give either topk or sample, not both")
    targets = store_targets(topk=topk, temperature=temperature, sample=sample, sample_seed=sample_seed)
    dev = torch.device(device)
    model = model.to(dev).eval()
    attrs = store_attrs(split, targets, teacher=teacher or type(model).__name__, chunk_rows=chunk_rows,
                        checkpoint=None, checkpoint_sha256=_weights_sha256(model), source="dataset")
    group = prepare_store(str(out), attrs, overwrite)
    store.write_keys(group, split.manifest)
    done = group[store.CHUNKS_DONE][:]
    todo = np.flatnonzero(done == 0)
    if len(todo):
        _run(model, dataset, labels, group, todo, split, batch_size, chunk_rows, targets, dev, workers)
    _finish(group, str(out), split.size)
    return store.open_store(str(out), "r").attrs.asdict()


def _labels(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # one pass; datasets that list targets skip it
    return np.asarray(labels, dtype=np.int64)


def _split(dataset: Dataset, labels: np.ndarray, data, keys, classes) -> _Split:
    if data is not None:
        from .beton import dataset_info
        path = Path(data)
        info = dataset_info(path / "train.beton" if path.is_dir() else path)
        if info.size != len(dataset):
            raise UserError(f"the dataset has {len(dataset)} items, {info.path} {info.size}")
        from .beton import beton_labels
        wrong = np.flatnonzero(beton_labels(info.path) != labels)
        if len(wrong):
            raise UserError(f"{len(wrong)} of {len(labels)} labels disagree with {info.path} (first: item "
                            f"{int(wrong[0])}): the dataset is not in the order of `kdcache data`'s")
        return _Split(info.size, info.num_classes, info.train_fingerprint, info.manifest)
    if keys is not None and len(keys) != len(dataset):
        raise UserError(f"{len(keys)} keys for a dataset of {len(dataset)} items")
    classes = list(classes if classes is not None else getattr(dataset, "classes", None) or
                   [str(c) for c in range(int(labels.max()) + 1)])
    h = hashlib.sha256(labels.tobytes())
    for key in keys or ():
        h.update(str(key).encode() + b"\0")
    fingerprint = h.hexdigest()[:32]
    manifest = {"schema": 1, "source": "dataset", "num_classes": len(classes), "classes": classes,
                "splits": {"train": {"size": len(dataset), "fingerprint": fingerprint,
                                     "keys": [str(k) for k in keys] if keys is not None else "position"}},
                "fingerprint": fingerprint, "kdcache_version": __version__}
    return _Split(len(dataset), len(classes), fingerprint, manifest)


def _weights_sha256(model: nn.Module) -> str:
    """What identifies the teacher's weights, for resuming: a hash of its state dict."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(model, dataset, labels, group, todo, split, batch_size, chunk_rows, targets, dev, workers) -> None:
    n = split.size
    rows = np.concatenate([np.arange(k * chunk_rows, min((k + 1) * chunk_rows, n)) for k in todo])
    loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, shuffle=False, num_workers=workers)
    start = 0
    with _Sink(model, group, n, chunk_rows, split.num_classes, targets) as sink, torch.inference_mode(), autocast(dev):
        for x, y in loader:
            index = torch.from_numpy(rows[start:start + len(x)])
            start += len(x)
            y = torch.as_tensor(y, dtype=torch.long)
            sink.put(sink.outputs(x.to(dev), y.to(dev), []), y, index)
        sink.close()
