"""The distillation loss and the `--alpha auto` rule."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_TEMPERATURE = 4.0  # Hinton et al.'s range (2-5); the KD temperature when neither option nor cache sets one


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Returns (loss, ce, kl); kl is zero when there is no teacher. The T^2 factor keeps the soft term's
    gradient scale independent of T (Hinton et al. 2015). `teacher` holds logits, or any row whose
    softmax at T is the wanted target (what `LogitCache.logits` gives for a top-k cache).
    """
    student = student.float()
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if teacher is None or alpha == 0:
        return ce, ce, torch.zeros_like(ce)
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * t * t * kl, ce, kl


def auto_alpha(fraction: float) -> float:
    """Alpha for a kept fraction f: 0.5 at f = 1 rising linearly in log10(1/f) to 0.9 at f <= 0.1.

    Smaller subsets lean more on the teacher, the trend Ben-Baruch et al. (ICML 2025) report (best alpha
    near 1 at f = 0.1 and near 0.5 on the full data); 0.9 rather than 1 keeps some ground truth signal
    against a teacher's confident mistakes. See README.md for the calibration status.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return round(0.5 + 0.4 * min(1.0, math.log10(1 / fraction)), 4)
