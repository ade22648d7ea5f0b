import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from kdcache_cli.main import cli

from kdcache.beton import read_beton  # noqa: F401  (the test modules' reader, shared with benchmarks)
from kdcache.train import DIE_AFTER_ENV as TRAIN_DIE_AFTER_ENV

# The suite runs on the CPU, also on a workstation with a GPU: fixtures compare runs exactly against CPU
# runs. (Set before anything initialises CUDA; a test about CUDA would have to say so and skip without it.)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# A hung subprocess (a gloo rendezvous, say) fails its test in minutes instead of eating CI's budget.
SUBPROCESS_TIMEOUT = 180

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar-10-batches-py"


def run_cli(*args: str, expect: int = 0):
    """Invoke the CLI in-process; assert the exit status; return the click Result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def run_console(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would."""
    exe = Path(sys.executable).with_name("kdcache")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A small synthetic dataset converted to betons: 400 train / 200 test, 4 classes, 16 px."""
    out = tmp_path_factory.mktemp("synth")
    run_cli("data", "synthetic", "--out", out, "--num-train", 400, "--num-test", 200,
            "--num-classes", 4, "--image-size", 16, "--workers", 1)
    return out


def make_image_folder(root: Path, rng, counts=(("cat", 3), ("dog", 4))) -> None:
    """A tiny image folder (train/ and val/, one folder per class) of random PNGs of several sizes."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for name, n in counts:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, size=(40 + k, 50, 3), dtype=np.uint8)).save(
                    root / split / name / f"{k}.png")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="session")
def teacher(synth, tmp_path_factory) -> Path:
    """A resnet20 teacher trained briefly on `synth` (its run folder; model.pt inside)."""
    out = tmp_path_factory.mktemp("teacher")
    run_cli("train", "--data", synth / "train.beton", "--out", out, "--fraction", 1, "--alpha", 0,
            "--epochs", 3, "--arch", "resnet20", "--batch-size", 32, "--workers", 1, "--lr", 0.05)
    return out


def make_teacher(path: Path, seed: int, arch: str = "resnet20", num_classes: int = 4, image_size: int = 16) -> Path:
    """A seeded, untrained checkpoint (for `synth` by default) whose outputs differ clearly per sample."""
    import torch
    from torch import nn

    from kdcache.models import build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(arch, num_classes, image_size)
    with torch.no_grad():  # random BatchNorm statistics, so that outputs differ clearly per sample
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2)
        model.fc.weight.mul_(20)
    save_checkpoint(path, model, arch=arch, num_classes=num_classes, image_size=image_size)
    return path


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """`make_teacher`'s seed-0 checkpoint: a teacher file for dump tests that need no trained teacher."""
    return make_teacher(tmp_path_factory.mktemp("ckpt") / "teacher.pt", seed=0)


# 400 samples of `synth` in chunks of 128: four chunks, the last one partial
DUMP = ("--batch-size", 64, "--chunk-rows", 128, "--workers", 1)


@pytest.fixture(scope="session")
def cache(synth, teacher, tmp_path_factory) -> Path:
    """The teacher's logits and scores dumped from `synth`."""
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", teacher / "model.pt", "--data",
            synth / "train.beton", "--out", out, "--batch-size", 64, "--chunk-rows", 128, "--workers", 1)
    return out


def kill_at(args: list, out, point: str) -> None:
    """Run `kdcache *args --out out` in a process that SIGKILLs itself at `point` (see kdcache.train.DIE_AFTER_ENV)."""
    p = subprocess.run([sys.executable, "-m", "kdcache_cli.main", *map(str, args), "--out", str(out)],
                       env={**os.environ, TRAIN_DIE_AFTER_ENV: point}, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == -9, p.stderr[-2000:]


def make_folder_store(root: Path) -> Path:
    """A tiny image folder `src` (3 classes, 5 + 2 images each, 20 px), converted into `data` (16 px crops),
    and dumped into `c.zarr` by a resnet8 saved untrained."""
    import numpy as np
    import torch
    from PIL import Image

    from kdcache.models import build_model, save_checkpoint
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            (root / "src" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / "src" / split / c / f"{i:03d}.png")
    run_cli("data", "imagefolder", "--src", root / "src", "--out", root / "data", "--max-side", 18, "--crop-side", 16,
            "--workers", 1)
    torch.manual_seed(0)
    save_checkpoint(root / "t.pt", build_model("resnet8", 3, 16), arch="resnet8", num_classes=3, image_size=16)
    run_cli("dump", "--teacher", "resnet8", "--checkpoint", root / "t.pt", "--data", root / "data" / "train.beton",
            "--out", root / "c.zarr", "--batch-size", 5, "--chunk-rows", 5, "--workers", 1)
    return root
