"""Per-sample difficulty scores from one teacher forward pass (no backward pass).

Each score is a function of the logits, the label and, for GraNd, the penultimate features (the
input of the last linear layer), so `kdcache dump` computes them on the same batch it caches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .store import TEACHER_SCORE_NAMES

# name -> (higher_is_harder, description); the order is the column order `teacher_scores` stacks in.
TEACHER_SCORES = {
    "loss": (True, "cross-entropy of the teacher's prediction"),
    "margin": (False, ("true-class logit minus the largest other logit (a logit margin; DeepCore's margin is "
                       "the top-1 minus top-2 probability)")),
    "entropy": (True, "entropy of the teacher's softmax"),
    "el2n": (True, ("EL2N: ||softmax - onehot||_2 of the trained teacher (one model; Paul et al. 2021 average "
                    "early-training models of several seeds: see el2n_early)")),
    "grand": (True, ("GraNd of the trained teacher's last layer: ||softmax - onehot||_2 * sqrt(||h||^2 + 1), "
                     "h the penultimate features (+1 only with a bias); Paul et al. take all layers early in "
                     "training")),
}
assert tuple(TEACHER_SCORES) == TEACHER_SCORE_NAMES  # the store layout names them; this module describes them


def teacher_scores(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                   has_bias: bool) -> dict[str, torch.Tensor]:
    """Scores for a batch: `logits` (B, C), `labels` (B,), `features` (B, D) -> {name: (B,) float32}.

    GraNd restricted to the last layer is exact in closed form: the cross-entropy gradient with
    respect to W is (p - y) h^T and with respect to the bias p - y, so its norm is
    ||p - y|| * sqrt(||h||^2 + 1).
    """
    logits, features = logits.float(), features.float().flatten(1)
    labels = labels.long()
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    error = p - F.one_hot(labels, logits.shape[1]).to(p.dtype)
    el2n = error.norm(dim=1)
    h2 = features.pow(2).sum(1) + (1.0 if has_bias else 0.0)
    return {
        "loss": -log_p.gather(1, labels[:, None])[:, 0],
        "entropy": -(p * log_p).sum(1),  # log_p stays finite where p underflows to 0
        "margin": true - others.max(1).values,
        "el2n": el2n,
        "grand": el2n * h2.sqrt(),
    }
