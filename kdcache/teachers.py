"""Teachers: one call signature, (images, sample indices, stored view) -> targets, the contract
`kdcache.contracts.Teacher` states: a cache's targets looked up (dense logits or sparse), or a model run in
the loop."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .api import TargetTable
from .beton import DatasetInfo
from .config import TrainConfig
from .contracts import Cache, Teacher
from .crops import view_recipe
from .distill import SparseTargets
from .errors import UserError
from .models import load_teacher_checkpoint


class CachedTeacher:
    """Looks a batch's teacher targets up by sample index (and stored view), through the public API's reader
    (`kdcache.api.TargetTable`): the selected rows of the cache are read once onto the device, so a step is a
    gather. A full cache gives (B, C) float32 logits; a top-k or sampled cache stays sparse on the device (K
    classes and values per sample) and gives `SparseTargets`, which `kd_loss` takes as they are."""

    def __init__(self, cache: Cache, indices: np.ndarray, num_samples: int, device: torch.device):
        self.bytes_per_sample = cache.bytes_per_sample
        self.temperature = cache.temperature  # the only one a top-k cache serves exactly
        self.targets = TargetTable(cache, indices, num_samples, device)
        # the (N, K, 3) view table of a multi-view cache: what the student's loader must show
        self.views = cache.view_params() if cache.views > 1 else None

    @property
    def nbytes(self) -> int:
        """Bytes the targets take on the device, with the sample-index-to-row table."""
        return self.targets.nbytes

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, index: torch.Tensor,
                 view: torch.Tensor | None = None) -> torch.Tensor | SparseTargets:
        return self.targets(index, view)


class OnlineTeacher:
    """Runs the teacher on the batch: the baseline a cache must match."""

    bytes_per_sample = temperature = views = None

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x).float()  # on the student's own view


def make_teacher(cfg: TrainConfig, info: DatasetInfo, indices: np.ndarray, device: torch.device) -> Teacher:
    if cfg.teacher_online:
        own = cfg.teacher_preprocessing == "auto"  # as the dump does: a cache and its online baseline see alike
        return OnlineTeacher(load_teacher_checkpoint(cfg.teacher_checkpoint, cfg.teacher_online, info.num_classes,
                                                     info.image_size, device, mean=info.mean if own else None,
                                                     std=info.std if own else None))
    from .store import LogitCache
    cache = LogitCache(cfg.cache, info)
    if cache.num_classes != info.num_classes:
        raise UserError(f"cache {cfg.cache} has {cache.num_classes} classes, the dataset has {info.num_classes}")
    if cache.temperature is not None and cfg.temperature not in (None, cache.temperature):
        form = f"top-{cache.topk}" if cache.topk else f"sampled ({cache.sample} draws)"
        raise UserError(f"cache {cfg.cache} holds {form} targets at temperature {cache.temperature:g}, "
                        f"exact only there: train with --temperature {cache.temperature:g} (or dump again with "
                        f"--temperature {cfg.temperature:g})")
    if cache.views > 1 and not cfg.augment:
        raise UserError(f"cache {cfg.cache} holds targets for {cache.views} augmented views and none for the "
                        "clean image: train with augmentation on (drop --no-augment), or use a single-view cache")
    if cache.views > 1 and cache.view_recipe != view_recipe(info):
        raise UserError(f"cache {cfg.cache} holds views made by another recipe ({cache.view_recipe}) than this "
                        f"data's ({view_recipe(info)}): dump it again from {cfg.data}")
    return CachedTeacher(cache, indices, info.size, device)
