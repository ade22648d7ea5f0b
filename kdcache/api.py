"""The public API for a training loop of one's own: teacher targets by sample index, the distillation loss
as an `nn.Module`, a dataset wrapper that adds each item's index, and the index contract.

    targets = kdcache.TeacherTargets("cache.zarr", data="data", rows=subset, device="cuda")
    loss_fn = targets.loss(alpha=0.5)                      # the trainer's loss, at the store's temperature
    for x, y, index in DataLoader(kdcache.WithIndex(dataset), ...):
        loss = loss_fn(model(x), y, targets(index))

Top-k and sampled stores stay sparse on the device (classes + values, K per sample); only a full store's
rows (C per sample) are dense. See docs/api.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import store as S
from .config import DEFAULT_TEMPERATURE
from .contracts import Cache, SparseCache
from .distill import SparseTargets, kd_loss, sparse_kl  # noqa: F401  (sparse_kl: public here too)
from .errors import UserError

POSITION_KEYS = "position"  # the key of a sample of an in-memory source (CIFAR, MNIST): its position in the split
TAIL_FLOOR = 1e-12          # the smallest tail mass of a top-k row, as `LogitCache.logits` keeps it


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE(student, y) + alpha * T^2 * KL(target || softmax(student / T)): `kdcache train`'s
    loss, `kdcache.distill.kd_loss`, for dense targets and `SparseTargets` alike.
    After each call `ce` and `kl` hold that batch's two terms (detached), for logging."""

    def __init__(self, alpha: float = 0.5, temperature: float = DEFAULT_TEMPERATURE, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise UserError(f"temperature must be positive, got {temperature}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        self.ce = self.kl = None

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: torch.Tensor | SparseTargets | None = None) -> torch.Tensor:
        loss, ce, kl = kd_loss(student, teacher, labels, self.alpha, self.temperature, self.label_smoothing)
        self.ce, self.kl = ce.detach(), kl.detach()
        return loss


class TargetTable:
    """The one reader of a cache's targets in training, for `TeacherTargets` and the trainer's cached teacher:
    the targets of the samples `rows` are read once onto `device` as the cache stores them, and
    `table(index, view)` gathers a batch's, unchecked and without a host synchronisation.

    A full cache (temperature None), or any cache with `dense=True`: its (n, C) float32 rows, `Cache.logits`,
    and a batch is their (B, C) rows. A top-k or sampled cache: K classes (int16) and K float16
    log-probabilities or counts per sample, never an (n, C) table; a batch is `SparseTargets`, whose KL
    `kd_loss` computes without expanding them. A multi-view cache holds every stored view of each row."""

    def __init__(self, cache: Cache, rows: np.ndarray, num_samples: int, device: torch.device,
                 dense: bool = False):
        rows = np.asarray(rows, dtype=np.int64)
        self.num_classes, self.temperature = cache.num_classes, cache.temperature
        self.sparse = cache.temperature is not None and not dense
        position = torch.full((num_samples,), -1, dtype=torch.long)
        position[torch.from_numpy(rows)] = torch.arange(len(rows))
        self.position = position.to(device)
        tables = _sparse_tables(cache, rows) if self.sparse else {"dense": cache.logits(rows)}
        self.tables = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in tables.items()}

    @property
    def nbytes(self) -> int:
        """Bytes the tables take on the device, with the sample-index-to-row table."""
        return sum(t.numel() * t.element_size() for t in (*self.tables.values(), self.position))

    def __call__(self, index: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor | SparseTargets:
        return self.at(self.position[index], view)

    def at(self, pos: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor | SparseTargets:
        """The targets of the loaded rows `pos` (and their stored views)."""
        at = pos if view is None else (pos, view)
        if not self.sparse:
            return self.tables["dense"][at]
        classes = self.tables["classes"][at].long()
        if "logp" in self.tables:  # top-k: K log-probabilities; the rest of the mass shared by the C - K others
            p = self.tables["logp"][at].float().exp()
            mass = p.sum(1, keepdim=True)
            rest = (1 - mass).clamp_min(TAIL_FLOOR)
            total = mass + rest  # float16 rounding: renormalise, as softmax does on `LogitCache.logits` rows
            tail = rest / (self.num_classes - classes.shape[1]) / total
            return SparseTargets(classes, p / total, tail, self.temperature)
        counts = self.tables["counts"][at].float()
        probs = counts / counts.sum(1, keepdim=True)
        return SparseTargets(classes, probs, torch.zeros_like(probs[:, :1]), self.temperature)


def _sparse_tables(cache: SparseCache, rows: np.ndarray) -> dict[str, np.ndarray]:
    """A top-k or sampled cache's arrays of `rows`, in types torch gathers with: classes as a signed type
    (uint16 and uint32 are not indexable), counts as uint8 or int16."""
    stored = cache.sparse_targets(rows)
    index = np.int16 if cache.num_classes <= np.iinfo(np.int16).max + 1 else np.int32
    tables = {**stored, "classes": stored["classes"].astype(index)}
    if "counts" in stored:
        tables["counts"] = stored["counts"].astype(np.uint8 if stored["counts"].dtype == np.uint8 else np.int16)
    return tables


class TeacherTargets:
    """A teacher-logit store opened for training: the targets of the samples `rows` (store rows, i.e.
    sample indices; all by default) are read once onto `device`, and `targets(index)` returns a batch's.

    `data`: the data the store must belong to: a folder or beton of `kdcache data` (its training
    fingerprint is checked). Full stores give (B, C) float32 logits; top-k and sampled stores give
    `SparseTargets` (or, with `dense=True`, (B, C) rows whose softmax at the store's temperature is the
    target, `LogitCache.logits`), as `kdcache train`'s cached teacher does (one reader, `TargetTable`). A
    multi-view store needs
    each sample's stored view: `targets(index, view)`, whose crop and flip are `view_params[index, view]`.
    """

    def __init__(self, store: str | Path, *, data: str | Path | None = None, rows: Sequence[int] | None = None,
                 device: torch.device | str = "cpu", dense: bool = False):
        info = None
        if data is not None:
            from .beton import dataset_info
            path = Path(data)
            info = dataset_info(path / "train.beton" if path.is_dir() else path)
        self.cache = S.LogitCache(str(store), info)
        self.url = self.cache.url
        self.num_samples, self.num_classes = self.cache.num_samples, self.cache.num_classes
        self.views = self.cache.views
        # full logits serve any temperature; top-k and sampled targets are exact at the dump's only
        self.temperature = self.cache.temperature
        self.device = torch.device(device)
        rows = np.arange(self.num_samples) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
        _check_range(rows, self.num_samples, "rows")
        if len(np.unique(rows)) != len(rows):
            raise UserError("rows holds a sample more than once")
        self.rows = rows
        self.view_params = self.cache.view_params() if self.views > 1 else None
        self.table = TargetTable(self.cache, rows, self.num_samples, self.device, dense)
        self.sparse = self.table.sparse

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64: the label of every store row, as the dump read it."""
        return self.cache.labels()

    @property
    def nbytes(self) -> int:
        """Bytes the loaded targets take on the device (with the index-to-row table)."""
        return self.table.nbytes

    def loss(self, alpha: float = 0.5, temperature: float | None = None, label_smoothing: float = 0.0
             ) -> DistillationLoss:
        """The distillation loss for these targets; a top-k or sampled store serves its own temperature only."""
        if self.temperature is not None and temperature not in (None, self.temperature):
            form = f"top-{self.cache.topk}" if self.cache.topk else f"sampled ({self.cache.sample} draws)"
            raise UserError(f"store {self.url} holds {form} targets at temperature {self.temperature:g}, exact "
                            f"only there: use temperature {self.temperature:g} (or dump again with "
                            f"--temperature {temperature:g})")
        return DistillationLoss(alpha, temperature or self.temperature or DEFAULT_TEMPERATURE, label_smoothing)

    def __call__(self, index: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor | SparseTargets:
        """The targets of the samples `index` (B,) (and, for a multi-view store, their stored views (B,))."""
        if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dim() != 1:
            raise UserError("a batch's sample indices must be a 1-D integer tensor: wrap the dataset in "
                            "kdcache.WithIndex so that each item is (x, y, index)")
        if (self.views > 1) != (view is not None):
            raise UserError(f"store {self.url} holds {self.views} stored views per sample: pass each sample's view "
                            "(its crop and flip are view_params[index, view])" if self.views > 1 else
                            f"store {self.url} holds one view per sample: pass no view")
        index = index.to(self.device, torch.long)
        pos = self.table.position[index.clamp(0, self.num_samples - 1)]
        bad = (index < 0) | (index >= self.num_samples) | (pos < 0)
        if bool(bad.any()):  # one host sync per batch: an out-of-range gather would crash the device instead
            i = int(index[bad][0])
            raise UserError(f"sample index {i} is " + (f"out of range (the store has {self.num_samples} samples)"
                            if not 0 <= i < self.num_samples else "not among the rows loaded"))
        return self.table.at(pos, None if view is None else view.to(self.device, torch.long))


def _check_range(index: np.ndarray, n: int, what: str) -> None:
    if len(index) and (index.min() < 0 or index.max() >= n):
        bad = int(index[(index < 0) | (index >= n)][0])
        raise UserError(f"{what}: sample index {bad} is out of range (the store has {n} samples)")


class WithIndex(Dataset):
    """Any map-style dataset whose items also carry their sample index: item i is (*dataset[i], rows[i]), so
    the default collate gives (x, y, index) batches. `rows` maps the dataset's items to store rows
    (`rows_for`); without it the item's position is its index (a dataset in the store's own order)."""

    def __init__(self, dataset: Dataset, rows: Sequence[int] | None = None):
        self.dataset = dataset
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None and len(self.rows) != len(dataset):
            raise UserError(f"rows has {len(self.rows)} entries for a dataset of {len(dataset)} items")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        index = i if self.rows is None else int(self.rows[i])
        return (*item, index) if isinstance(item, tuple) else (item, index)


def store_keys(store: str | Path) -> np.ndarray | None:
    """The keys of a store's samples in row order (the index contract), or None where the key is the row
    (in-memory sources such as CIFAR, and stores made before keys were recorded)."""
    group = S.open_store(str(store), "r")
    return np.array(group[S.KEYS][:].tolist(), dtype=object) if S.KEYS in group else None


def rows_for(store: str | Path | TeacherTargets, dataset=None, *, keys: Sequence[str] | None = None,
             labels: Sequence[int] | None = None) -> np.ndarray:
    """The store rows of a user's samples, by the index contract: for a torchvision `ImageFolder` on the
    split the store was dumped from (or any dataset with `.samples` and `.root`), each file's path under
    the root; for a list of `keys`, those keys; for any other dataset, its positions (CIFAR-style sources).
    Labels, where known (the dataset's, or `labels`), must agree with the store's (by class name where the
    dataset names its classes). Raises UserError on a missing key or a disagreeing label."""
    url = store.url if isinstance(store, TeacherTargets) else str(store)
    cache = store.cache if isinstance(store, TeacherTargets) else S.LogitCache(url)
    stored_labels = cache.labels()
    classes = (cache.attrs.get("manifest") or {}).get("classes")
    if dataset is not None and keys is None and hasattr(dataset, "samples") and hasattr(dataset, "root"):
        root = Path(dataset.root)
        keys = [Path(path).relative_to(root).as_posix() for path, _ in dataset.samples]
        if labels is None:
            labels = [label for _, label in dataset.samples]
    elif dataset is not None and labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is not None and dataset is not None and getattr(dataset, "classes", None) is not None and classes:
        names = list(dataset.classes)
        where = {name: i for i, name in enumerate(classes)}
        missing = [n for n in names if n not in where]
        if missing:
            raise UserError(f"the dataset's class {missing[0]!r} is not among store {url}'s classes")
        labels = [where[names[int(y)]] for y in labels]
    if keys is None:
        n = len(dataset) if dataset is not None else len(labels) if labels is not None else None
        if n is None:
            raise UserError("rows_for needs a dataset or a list of keys")
        if store_keys(url) is not None:
            raise UserError(f"store {url} is keyed by file path (an image folder): pass an ImageFolder on the "
                            "same split or its keys")
        if n > cache.num_samples:
            raise UserError(f"the dataset has {n} items, store {url} only {cache.num_samples}")
        rows = np.arange(n)
    else:
        have = store_keys(url)
        if have is None:
            raise UserError(f"store {url} records no file keys (an in-memory source, or made by an older "
                            "kdcache): its rows are the samples' positions")
        row_of = {k: i for i, k in enumerate(have)}
        rows = np.fromiter((row_of.get(str(k), -1) for k in keys), dtype=np.int64, count=len(keys))
        if (rows < 0).any():
            first = keys[int(np.flatnonzero(rows < 0)[0])]
            raise UserError(f"{int((rows < 0).sum())} of {len(keys)} samples are not in store {url} "
                            f"(first: {first!r}): it was made from another dataset or split")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        wrong = np.flatnonzero(stored_labels[rows] != labels)
        if len(wrong):
            i = int(wrong[0])
            what = keys[i] if keys is not None else f"item {i}"
            raise UserError(f"{len(wrong)} of {len(rows)} labels disagree with store {url} (first: {what}, "
                            f"label {labels[i]}, store {stored_labels[rows[i]]}): another dataset or class order")
    return rows
