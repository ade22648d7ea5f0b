"""A model's test loss and accuracy, after BatchNorm statistics re-estimated for its current weights."""
from __future__ import annotations

import torch
import torch.nn as nn

from .loader import Batches


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, amp: torch.dtype | None) -> None:
    """Re-estimate every BatchNorm layer's running mean and variance over `batches` (an exact average,
    as torch.optim.swa_utils.update_bn does): evaluation then uses statistics of the current weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    with torch.autocast(batches.device.type, amp, enabled=amp is not None):
        for x, _, _, _ in batches:
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, amp: torch.dtype | None) -> tuple[float, float]:
    """Test loss and accuracy over every sample of `batches`."""
    model.eval()
    sums, count = torch.zeros(2, dtype=torch.float64, device=batches.device), 0
    with torch.inference_mode(), torch.autocast(batches.device.type, amp, enabled=amp is not None):
        for x, y, _, _ in batches:
            logits = model(x).float()
            sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum")  # summed on the device: no
            sums[1] += (logits.argmax(1) == y).sum()                             # wait for it per batch
            count += len(y)
    loss, correct = sums.tolist()
    return loss / count, correct / count
