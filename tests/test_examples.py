"""The examples run as a user runs them, on tiny data."""
import csv
import subprocess
import sys

import pytest
from conftest import ROOT, SUBPROCESS_TIMEOUT, make_folder_store

pytestmark = pytest.mark.slow  # each test spawns the example as a process


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder_store(tmp_path_factory.mktemp("examples"))


def _run(script, *args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT, cwd=cwd, env={"OMP_NUM_THREADS": "1",
                                                                        "CUDA_VISIBLE_DEVICES": "",
                                                                        "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("script", ["own_loop.py", "lightning_module.py"])
def test_examples_help_lists_their_options(script):
    result = _run(script, "--help")
    assert result.returncode == 0
    for option in ("--data", "--cache", "--fraction", "--epochs", "--arch"):
        assert option in result.stdout
    assert ("--out" in result.stdout) == (script == "lightning_module.py")


def test_own_loop_trains_on_an_image_folder_joined_by_keys(folder):
    result = _run("own_loop.py", "--data", folder / "src", "--cache", folder / "c.zarr", "--fraction", 0.6,
                  "--epochs", 2, "--arch", "resnet8", "--batch-size", 4, "--workers", 0)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["epoch=1", "epoch=2"]
    # 9 of 15 images kept, 2 batches of 4 an epoch (drop_last)
    accuracy = float(lines[-1].removeprefix("test_acc="))
    assert lines[-1].startswith("test_acc=")
    assert any(abs(accuracy - i / 6) < 1e-4 for i in range(7))  # 6 images


def test_own_loop_refuses_a_store_of_another_folder_in_one_line(folder, tmp_path):
    import shutil
    shutil.copytree(folder / "src", tmp_path / "src")
    (tmp_path / "src" / "train" / "ant" / "000.png").rename(tmp_path / "src" / "train" / "ant" / "new.png")
    result = _run("own_loop.py", "--data", tmp_path / "src", "--cache", folder / "c.zarr", "--epochs", 1,
                  "--workers", 0)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "1 of 15 samples are not in store" in result.stderr and "'ant/new.png'" in result.stderr


def test_lightning_module_trains_on_the_kept_subset_quietly(folder, tmp_path):
    pytest.importorskip("lightning")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = _run("lightning_module.py", "--data", folder / "src", "--cache", folder / "c.zarr", "--fraction", 0.6,
                  "--epochs", 2, "--arch", "resnet8", "--batch-size", 3, "--workers", 0, "--out", tmp_path / "out",
                  cwd=cwd)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout  # one line an epoch and the accuracy: no banner, no progress bar
    # every epoch trained on exactly the 9 store rows of round(0.6 * 15) kept (3 batches of 3, none dropped);
    # a row outside them would have been refused by TeacherTargets
    assert [line.split()[:2] for line in lines[:-1]] == [["epoch=1", "samples=9"], ["epoch=2", "samples=9"]]
    assert lines[-1].startswith("test_acc=")
    accuracy = float(lines[-1].removeprefix("test_acc="))
    assert 0 <= accuracy <= 1 and any(abs(accuracy - i / 6) < 1e-4 for i in range(7))  # 6 test images
    assert "available:" not in result.stdout + result.stderr  # Lightning's device banner is silenced
    assert list(cwd.iterdir()) == []  # no lightning_logs/ or checkpoints in the working directory
    with open(tmp_path / "out" / "metrics.csv") as f:  # the CSV log went into --out
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("loss")}
    assert epochs == {"0", "1"}
