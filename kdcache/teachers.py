"""Teachers: one call signature, (images, sample indices, stored view) -> logits, the contract
`kdcache.contracts.Teacher` states: rows looked up in a cache, or a model run in the loop."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .beton import DatasetInfo
from .config import TrainConfig
from .contracts import Cache, Teacher
from .crops import view_recipe
from .errors import UserError
from .models import load_teacher_checkpoint


class CachedTeacher:
    """Looks a batch's teacher rows up by sample index (and stored view): the selected rows of the cache
    are read once into a device tensor, so a step is one gather."""

    def __init__(self, cache: Cache, indices: np.ndarray, num_samples: int, device: torch.device):
        self.bytes_per_sample = cache.bytes_per_sample
        self.temperature = cache.temperature  # the only one a top-k cache serves exactly
        self.rows = torch.from_numpy(cache.logits(indices)).to(device)  # (n, C), or (n, K, C) with K views
        # the (N, K, 3) view table of a multi-view cache: what the student's loader must show
        self.views = cache.view_params() if cache.views > 1 else None
        position = torch.full((num_samples,), -1, dtype=torch.long)
        position[torch.from_numpy(indices)] = torch.arange(len(indices))
        self.position = position.to(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.position[index]
        return self.rows[rows] if view is None else self.rows[rows, view]


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
        return OnlineTeacher(load_teacher_checkpoint(cfg.teacher_checkpoint, cfg.teacher_online, info.num_classes,
                                                     info.image_size, device))
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
