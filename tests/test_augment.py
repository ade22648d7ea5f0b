"""The small-image augmentation: crop with 4 px zero padding + flip, drawn from (seed, epoch, index)."""

import numpy as np
import pytest
import torch
from conftest import run_cli

from kdcache.augment import crop_flip, draw
from kdcache.run_folder import read_metrics


def test_crop_flip_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, size=(6, 3, 8, 10)).astype(np.float32)  # no zeros: the border shows
    dy, dx, flip = np.array([-4, 0, 4, 2, -1, 3]), np.array([4, 0, -4, -2, 1, 0]), np.array([0, 1, 0, 1, 1, 0], bool)
    got = crop_flip(torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flip)).numpy()
    for b in range(6):
        padded = np.pad(x[b], ((0, 0), (4, 4), (4, 4)))
        want = padded[:, 4 + dy[b]:4 + dy[b] + 8, 4 + dx[b]:4 + dx[b] + 10]
        np.testing.assert_array_equal(got[b], want[:, :, ::-1] if flip[b] else want)
    # dy = -4, dx = 4: the window starts 4 rows above the image and 4 columns into it, so its top rows and
    # right columns come from the zero border
    assert (got[0, :, :4, :] == 0).all() and (got[0, :, :, -4:] == 0).all() and (got[0, :, 4:, :-4] > 0).all()


def test_draws_are_uniform_and_a_function_of_seed_epoch_and_index():
    index = np.arange(45000)
    dy, dx, flip = draw(0, 3, index)
    for shift in (dy, dx):
        counts = np.bincount(shift + 4, minlength=9)
        assert len(counts) == 9 and (np.abs(counts / len(index) - 1 / 9) < 0.01).all()
    assert abs(flip.mean() - 0.5) < 0.01
    again = draw(0, 3, index[::-1])
    assert all(np.array_equal(a[::-1], b) for a, b in zip(again, (dy, dx, flip)))  # batch order irrelevant
    assert not np.array_equal(draw(0, 4, index)[0], dy) and not np.array_equal(draw(1, 3, index)[0], dy)


@pytest.mark.parametrize("augment", ["--augment", "--no-augment"])
@pytest.mark.slow
def test_the_same_command_twice_gives_the_same_run(synth, tmp_path, augment):
    args = ["train", "--data", synth / "train.beton", "--fraction", 0.5, "--alpha", 0, "--epochs", 2, augment,
            "--arch", "resnet8", "--batch-size", 32, "--workers", 1, "--eval-every", 2]
    runs = []
    for name in ("a", "b"):
        run_cli(*args, "--out", tmp_path / name)
        runs.append(read_metrics(tmp_path / name))
    for a, b in zip(*runs):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == b[key], key
    run_cli(*args, "--seed", 1, "--out", tmp_path / "c")
    other = read_metrics(tmp_path / "c")[0]
    assert other["train_loss"] != runs[0][0]["train_loss"]
