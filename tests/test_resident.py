"""The resident data path gives the very batches the FFCV path gives."""
import numpy as np
import pytest
import torch

from kdcache.augment import view_params
from kdcache.beton import dataset_info
from kdcache.loader import Batches
from kdcache.resident import RESIDENT_BUDGET_BYTES, ResidentBatches, fits, resident_bytes


def batches_of(loader, epochs=2):
    return [[tuple(t.clone() if t is not None else None for t in batch) for batch in loader] for _ in range(epochs)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            for ta, tb in zip(batch_a, batch_b):
                if ta is None:
                    assert tb is None
                    continue
                assert ta.dtype == tb.dtype and ta.shape == tb.shape
                assert torch.equal(ta, tb)  # bit for bit, not close
            assert batch_a[0].is_contiguous(memory_format=torch.channels_last) == \
                batch_b[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["augmented", "clean", "views", "test", "subset-in-order"])
def test_resident_batches_are_bit_identical_to_ffcv_over_two_epochs(synth, kind):
    split = "test" if kind == "test" else "train"
    info = dataset_info(synth / f"{split}.beton")
    chosen = np.random.default_rng(1).choice(info.size, 150, replace=False)
    args = {"augmented": dict(train=True, indices=chosen, seed=3),
            "clean": dict(train=True, augment=False, indices=chosen, seed=4),
            "views": dict(train=True, indices=chosen, seed=5, views=view_params(9, np.arange(info.size), 3)),
            "test": dict(train=False),
            "subset-in-order": dict(train=False, indices=chosen)}[kind]
    ffcv = batches_of(Batches(info, batch_size=32, num_workers=1, **args))
    resident = ResidentBatches(info, batch_size=32, num_workers=1, **args)
    assert len(resident) == len(ffcv[0])
    got = batches_of(resident)
    assert_same_batches(got, ffcv)
    if args["train"]:
        assert not torch.equal(got[0][0][2], got[1][0][2])  # reshuffled: two epochs, two orders


def test_resident_resumes_at_the_epoch_it_is_told(synth):
    info = dataset_info(synth / "train.beton")
    ffcv = Batches(info, batch_size=64, train=True, seed=2, num_workers=1)
    ffcv.loader.next_epoch = 3
    resident = ResidentBatches(info, batch_size=64, train=True, seed=2, num_workers=1)
    resident.next_epoch = 3
    assert_same_batches(batches_of(resident, 1), batches_of(ffcv, 1))


def test_what_goes_resident(synth):
    info = dataset_info(synth / "train.beton")
    assert resident_bytes(info, 400) == 400 * (16 * 16 * 3 + 16)
    assert fits(info, 400)
    assert not fits(info, 400, budget=resident_bytes(info, 400) - 1)
    assert RESIDENT_BUDGET_BYTES >= resident_bytes(info, 50_000) * 20  # CIFAR-scale sets always fit
