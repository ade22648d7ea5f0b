"""kdcache train --tensorboard: the metrics rows also as TensorBoard scalars, one step an epoch."""
import sys

import numpy as np
import pytest
from conftest import kill_at, run_cli

from kdcache.run_folder import read_metrics

ARGS = ["--alpha", 0, "--epochs", 2, "--no-augment", "--arch", "resnet8", "--batch-size", 32, "--workers", 1,
        "--tensorboard"]


def scalars(out) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard reads OUT/tensorboard (a restart's orphaned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}


def _args(synth, tmp_path):
    np.save(tmp_path / "first128.npy", np.arange(128))
    return ["train", "--data", synth / "train.beton", "--indices", tmp_path / "first128.npy", *ARGS]


def test_tensorboard_holds_the_metrics_rows(synth, tmp_path):
    pytest.importorskip("tensorboard")
    run_cli(*_args(synth, tmp_path), "--out", tmp_path / "run")
    rows, board = read_metrics(tmp_path / "run"), scalars(tmp_path / "run")
    assert {"train_loss", "train_acc", "test_acc", "test_loss", "lr", "images_per_sec"} <= set(board)
    assert not {"epoch", "step", "first_in_process"} & set(board)
    for tag in ("train_loss", "test_acc", "lr"):
        assert [step for step, _ in board[tag]] == [1, 2]
        assert [value for _, value in board[tag]] == pytest.approx([row[tag] for row in rows], rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_logs_each_epoch_once(synth, tmp_path):
    """Killed between epoch 2's metrics and its checkpoint: the resumed run redoes epoch 2, and TensorBoard
    shows the redone epoch's values only, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    args = _args(synth, tmp_path)
    kill_at(args, tmp_path / "run", "2:metrics")
    run_cli(*args, "--out", tmp_path / "run", "--resume")
    rows, board = read_metrics(tmp_path / "run"), scalars(tmp_path / "run")
    assert [step for step, _ in board["train_loss"]] == [1, 2]
    assert [value for _, value in board["train_loss"]] == pytest.approx([row["train_loss"] for row in rows], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_and_leaves_nothing(synth, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` meets when it is missing
    r = run_cli(*_args(synth, tmp_path), "--out", tmp_path / "run", expect=2)
    assert "--tensorboard needs the tensorboard package: pip install 'kdcache[tensorboard]'" in r.output
    assert r.output.strip().count("\n") == 0 and not (tmp_path / "run").exists()
