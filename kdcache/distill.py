"""The distillation loss, for dense and sparse teacher targets, and the `--alpha auto` rule."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import UserError


class SparseTargets(NamedTuple):
    """A batch's sparse teacher targets at `temperature`: each row's target distribution gives `classes`
    their `probs` and every other class `tail` (top-k: the remaining mass shared equally; sampled: 0)."""
    classes: torch.Tensor   # (B, K) int64
    probs: torch.Tensor     # (B, K) float32
    tail: torch.Tensor      # (B, 1) float32
    temperature: float

    def dense(self, num_classes: int) -> torch.Tensor:
        """The (B, C) float32 target distribution these rows stand for."""
        q = self.tail.expand(len(self.classes), num_classes).clone()
        return q.scatter_(1, self.classes, self.probs)


def sparse_kl(student: torch.Tensor, target: SparseTargets) -> torch.Tensor:
    """batchmean KL(q || softmax(student / T)) of sparse targets q, without a dense (B, C) target:
    sum_k p_k (log p_k - s_k) + tail * ((C - K) log tail - (sum_all s - sum_k s_k)), s = log_softmax,
    0 log 0 = 0 (a sampled row's padding, a tail of 0)."""
    s = torch.log_softmax(student.float() / target.temperature, dim=1)
    s_k = s.gather(1, target.classes)
    p, tail = target.probs, target.tail.squeeze(1)
    others = student.shape[1] - target.classes.shape[1]
    kept = (torch.xlogy(p, p) - p * s_k).sum(1)
    rest = s.sum(1) - s_k.sum(1)
    return (kept + others * torch.xlogy(tail, tail) - tail * rest).sum() / len(student)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | SparseTargets | None, labels: torch.Tensor, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * CE(student, y) + alpha * T^2 * KL(q || softmax(student/T)), q = softmax(teacher/T).

    Returns (loss, ce, kl); kl is zero when there is no teacher. The T^2 factor keeps the soft term's
    gradient scale independent of T (Hinton et al. 2015). `teacher` holds logits (or any rows whose softmax
    at T is the wanted target), or `SparseTargets` (a top-k or sampled cache's, exact at their own
    temperature only, which must be T): their KL is computed from the K classes and the tail's mass, without
    a dense (B, C) target, and equals that of their dense expansion.
    """
    student = student.float()
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if teacher is None or alpha == 0:
        return ce, ce, torch.zeros_like(ce)
    t = temperature
    if isinstance(teacher, SparseTargets):
        if abs(teacher.temperature - t) > 1e-9:
            raise UserError(f"these targets are exact at temperature {teacher.temperature:g} only, the loss "
                            f"uses {t:g}: build the loss with TeacherTargets.loss()")
        kl = sparse_kl(student, teacher)
    else:
        kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                      reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * t * t * kl, ce, kl


def kd_step(model: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor | SparseTargets | None,
            labels: torch.Tensor, alpha: float, temperature: float, label_smoothing: float = 0.0,
            amp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The differentiable part of a training step as one function: the student's forward (under autocast
    to `amp`, if any) and `kd_loss`, CE and KD term together. Returns (loss, ce, kl, logits).

    One function, so that `torch.compile` compiles model and loss as one graph (the loss's two dozen
    small kernels fuse into the backward's). Eager, it computes exactly what `kd_loss` does on the
    model's output, operation for operation: a run gives the same numbers through either."""
    with autocast(x.device.type, amp):
        logits = model(x)
    loss, ce, kl = kd_loss(logits, teacher, labels, alpha, temperature, label_smoothing)
    return loss, ce, kl, logits


def autocast(device_type: str, amp: torch.dtype | None):
    """Autocast to `amp`; without one, no context at all (entering a disabled autocast costs host time
    every step, for nothing)."""
    return nullcontext() if amp is None else torch.autocast(device_type, amp)


ALPHA_FLAT_UNTIL = 0.05  # kept fractions down to this one take alpha 0.5 ...
ALPHA_MAX_AT = 0.01      # ... rising linearly in log10(1/f) to 0.9 at this one and below


def auto_alpha(fraction: float) -> float:
    """Alpha for a kept fraction f: 0.5 from f = 1 down to f = 0.05, rising linearly in log10(1/f) to
    0.9 at f <= 0.01 (0.73 at f = 0.02).

    Calibrated on CIFAR-10 (`make paper`, resnet8 students, resnet20 teacher, two seeds): alpha 0.5 was
    the best or within noise of the best at 2%, 5% and 10% kept, and 0.9 beat it only at 2%, within
    noise; 0.9 at 10% cost 1.2 points. Ben-Baruch et al. (ICML 2025) report the same direction (the
    smaller the subset, the more weight on the teacher); 0.9 rather than 1 keeps some ground truth
    against a teacher's confident mistakes. The evidence: the first paper-cpu study's report
    (`git show 2f792bf:results/paper-cpu/report.md`).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rise = math.log10(ALPHA_FLAT_UNTIL / fraction) / math.log10(ALPHA_FLAT_UNTIL / ALPHA_MAX_AT)
    return round(0.5 + 0.4 * min(1.0, max(0.0, rise)), 4)
