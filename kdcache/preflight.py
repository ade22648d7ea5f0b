"""Every input of a training run checked before any training starts, and the run's subset: chosen here
from `TrainConfig`'s selection options, or read from `kdcache select`'s indices."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .beton import DatasetInfo, dataset_info
from .config import DATA_PATHS, SelectOptions, TrainConfig
from .errors import UserError


def validate(cfg: TrainConfig) -> tuple[DatasetInfo, DatasetInfo, float | None]:
    """Check every input before any training starts; return train info, test info, numeric alpha."""
    chosen = [f"--{name.replace('_', '-')}" for name in ("fraction", "method", "keep", "class_balanced")
              if getattr(cfg, name) not in (None, False)]
    if cfg.indices and chosen:
        raise UserError(f"--indices gives the subset; drop {', '.join(chosen)} (or drop --indices)")
    if cfg.fraction is not None and not 0 < cfg.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {cfg.fraction}")
    alpha = _alpha(cfg.alpha)
    for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.bn_batches < 0:
        raise UserError(f"--bn-batches must be 0 (off) or more, got {cfg.bn_batches}")
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError("--steps must be at least 1")
    if cfg.temperature is not None and not cfg.temperature > 0:
        raise UserError(f"--temperature must be positive, got {cfg.temperature}")
    info = dataset_info(cfg.data)
    test_path = cfg.test or str(Path(cfg.data).with_name("test.beton"))
    if not Path(test_path).is_file():
        raise UserError(f"test set not found: {test_path} (pass --test)")
    test_info = dataset_info(test_path)
    if test_info.dataset_fingerprint != info.dataset_fingerprint:
        raise UserError(f"{test_path} belongs to another dataset than {cfg.data}")
    if (alpha is None or alpha > 0) and not (cfg.cache or cfg.teacher_online):
        raise UserError(f"alpha {cfg.alpha} needs a teacher: pass --cache (or --teacher-online), or --alpha 0")
    if cfg.teacher_online and not cfg.teacher_checkpoint:
        raise UserError("--teacher-online needs --teacher-checkpoint")
    if cfg.teacher_online and cfg.cache:
        raise UserError("give either --cache or --teacher-online, not both")
    if cfg.data_path not in DATA_PATHS:
        raise UserError(f"--data-path must be one of {', '.join(DATA_PATHS)}, got {cfg.data_path!r}")
    if cfg.amp not in ("bf16", "fp16", "off"):
        raise UserError(f"--amp must be bf16, fp16 or off, got {cfg.amp}")
    return info, test_info, alpha


def _alpha(text: str) -> float | None:
    """The numeric alpha, or None for auto."""
    if text == "auto":
        return None
    try:
        alpha = float(text)
    except ValueError:
        raise UserError(f"--alpha must be a number in [0, 1] or 'auto', got {text!r}")
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    return alpha


def select_subset(cfg: TrainConfig, info: DatasetInfo, labels: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """The sorted sample indices to train on, and how they were chosen."""
    if cfg.indices:
        try:
            indices = np.unique(np.load(cfg.indices).astype(np.int64))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read indices from {cfg.indices}: {e}")
        _check_sidecar(cfg.indices, info)
        if len(indices) == 0 or indices[0] < 0 or indices[-1] >= info.size:
            raise UserError(f"{cfg.indices} holds indices outside 0..{info.size - 1} (or none)")
        return indices, {"method": "file", "source": cfg.indices}
    from .selection import choose_subset
    d = SelectOptions()
    return choose_subset(info, cfg.method or d.method, d.fraction if cfg.fraction is None else cfg.fraction,
                         store=cfg.store or cfg.cache, keep=cfg.keep or d.keep, class_balanced=cfg.class_balanced,
                         seed=cfg.seed, ccs_beta=cfg.ccs_beta, ccs_strata=cfg.ccs_strata, ccs_score=cfg.ccs_score,
                         labels=labels)


def _check_sidecar(indices: str, info: DatasetInfo) -> None:
    """Indices chosen on another dataset are refused: `kdcache select` records the training split's
    fingerprint beside them. A bare .npy without a sidecar is taken on trust."""
    from .selection import sidecar_path
    path = sidecar_path(indices)
    if not path.is_file():
        return
    try:
        have = json.loads(path.read_text()).get("train_fingerprint")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}")
    if have is not None and have != info.train_fingerprint:
        raise UserError(f"{indices} were selected from another dataset (train fingerprint {have}, "
                        f"expected {info.train_fingerprint} for {info.path})")
