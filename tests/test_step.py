"""The training step: one function for model and loss, no host synchronisation, a handful of operators
for the KD term, and batches that outlive the loader's buffers."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdcache.distill import kd_loss, kd_step
from kdcache.models import build_model

# Operators that make the host wait for the device (a value read back, or an output whose size depends on data).
SYNCING = {"item", "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero",
           "repeat_interleave", "allclose"}
KD_EXTRA_OPS = 25  # the KD term's whole price: its forward, backward and teacher-row gather (24 in torch 2.14), for
                  # dense targets; sparse ones: test_sparse_trainer.py's KD_SPARSE_EXTRA_OPS (60)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("teacher", [True, False])
def test_kd_step_equals_kd_loss_in_value_and_gradient(teacher):
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 16)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    target = torch.randn(8, 10) if teacher else None
    loss, ce, kl, logits = kd_step(model, x, target, y, 0.7, 3.0, 0.1)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = kd_loss(model(x), target, y, 0.7, 3.0, 0.1)
    want[0].backward()
    for a, b in zip((loss, ce, kl), want):
        assert torch.equal(a, b)  # the same operations: the same bits
    for g, p in zip(got, model.parameters()):
        assert torch.equal(g, p.grad)
    assert kl.item() > 0 if teacher else kl.item() == 0


def trainer(synth, tmp_path, **options):
    from kdcache.train import TrainConfig, Trainer, validate

    cfg = TrainConfig(data=str(synth / "train.beton"), out=str(tmp_path), arch="resnet8", fraction=0.5,
                      epochs=1, batch_size=32, workers=1, **options)
    info, test_info, alpha = validate(cfg)
    return Trainer(cfg, info, test_info, alpha, torch.device("cpu"))


def step_ops(t) -> Counter:
    """The operators of one training step: the batch's gathers on the device, teacher rows, forward,
    loss, backward, optimiser."""
    batches = iter(t.train_batches)
    next(batches)  # the epoch's order and draws upload once, before the first batch
    with Ops() as ops:
        x, y, index, view = next(batches)
        t.train_step(x, y, index, view)
    return ops.count


@pytest.mark.slow
def test_a_step_never_syncs_and_kd_adds_a_handful_of_operators(synth, cache, tmp_path):
    from kdcache.resident import ResidentBatches

    ce = trainer(synth, tmp_path / "ce", alpha="0")
    kd = trainer(synth, tmp_path / "kd", alpha="0.5", cache=str(cache))
    assert isinstance(kd.train_batches, ResidentBatches)  # small images: resident by default
    ce_ops, kd_ops = step_ops(ce), step_ops(kd)
    for ops in (ce_ops, kd_ops):
        assert not SYNCING & set(ops), SYNCING & set(ops)
    extra = sum(kd_ops.values()) - sum(ce_ops.values())
    assert 0 < extra <= KD_EXTRA_OPS, (extra, kd_ops - ce_ops)


def test_progress_is_read_one_window_late():
    from kdcache.train import LateProgress

    progress = LateProgress(torch.device("cpu"))
    sums = torch.tensor([1.0, 2.0])
    assert progress.swap(sums) is None  # nothing before the first window has passed
    sums += 1
    assert progress.swap(sums) == [1.0, 2.0]  # the previous window's values, not today's
    assert progress.swap(sums) == [2.0, 3.0]


def test_a_staged_copy_never_aliases_its_source():
    from kdcache.loader import staged

    ring = torch.arange(12, dtype=torch.uint8).view(3, 4)
    copy = staged(ring, pin=False)
    ring.fill_(0)  # the loader refills its slot
    assert torch.equal(copy, torch.arange(12, dtype=torch.uint8).view(3, 4))


def test_batches_stay_intact_after_later_batches_arrive(synth):
    """FFCV reuses its output buffers: every batch kept must still hold its own pixels at the epoch's end."""
    from kdcache.beton import dataset_info
    from kdcache.loader import Batches

    info = dataset_info(synth / "test.beton")
    raw = Batches(info, batch_size=16, train=False, num_workers=1, normalise=False)
    kept = list(raw)  # not cloned: what the trainer holds while later batches are decoded
    fresh = [tuple(t.clone() for t in batch[:3]) for batch in raw]  # cloned as each arrives
    assert len(kept) == len(fresh) > 2
    for a, b in zip(kept, fresh):
        for ta, tb in zip(a[:3], b):
            assert torch.equal(ta, tb)
    assert torch.equal(torch.cat([b[2] for b in kept]), torch.arange(info.size))
