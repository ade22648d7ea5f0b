"""The examples run as a user runs them, on tiny data."""
import subprocess
import sys

import pytest
from conftest import ROOT, SUBPROCESS_TIMEOUT
from test_api import make_folder_store


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder_store(tmp_path_factory.mktemp("examples"))


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT, env={"OMP_NUM_THREADS": "1",
                                                                        "CUDA_VISIBLE_DEVICES": "",
                                                                        "PATH": "/usr/bin:/bin"})


def test_own_loop_help_lists_its_options():
    result = _run("own_loop.py", "--help")
    assert result.returncode == 0
    for option in ("--data", "--cache", "--fraction", "--epochs", "--arch"):
        assert option in result.stdout


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
