"""The interfaces the trainer relies on, stated once: a logit cache (`kdcache.store.LogitCache`) and a
teacher (`kdcache.teachers.CachedTeacher`, `OnlineTeacher`). Test doubles satisfy the same protocols."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from .distill import SparseTargets


@runtime_checkable
class Cache(Protocol):
    """Teacher outputs by sample index, read once per run."""

    num_classes: int
    bytes_per_sample: int | None   # teacher output stored per sample (what `kdcache info` reports)
    temperature: float | None      # the one temperature a top-k or sampled cache serves exactly; None: any
    views: int                     # stored views per sample (1: the clean image's outputs)

    def logits(self, indices: np.ndarray) -> np.ndarray:
        """(n, C) float32 rows of these samples, or (n, views, C) with several views."""

    def view_params(self) -> np.ndarray:
        """(N, views, 3) int8: each stored view's (dy, dx, flip), what a student's loader must show."""


@runtime_checkable
class SparseCache(Cache, Protocol):
    """A cache of top-k or sampled targets (its `temperature` is not None), read as stored: K per sample."""

    def sparse_targets(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """These samples' `classes` (n, [views,] K) with their `logp` (top-k: float16 log-probabilities at
        `temperature`) or `counts` (sampled: the target is counts / their sum)."""


@runtime_checkable
class Teacher(Protocol):
    """One call signature for every teacher: (images, sample indices, stored view or None) -> targets: (B, C)
    logits, or a top-k or sampled cache's `SparseTargets` (K classes per sample, never a dense (B, C) table),
    which `kdcache.distill.kd_loss` takes alike."""

    bytes_per_sample: int | None   # None: no cache (a teacher run in the loop)
    temperature: float | None      # the temperature the targets are exact at; None: any
    views: np.ndarray | None       # the cache's (N, views, 3) view table when the student must see those views

    def __call__(self, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor | None = None
                 ) -> torch.Tensor | SparseTargets:
        ...
