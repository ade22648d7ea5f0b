"""timm models as timm:NAME: built, loaded from plain state dicts and timm checkpoints (class count and
architecture checked), dumped with their own preprocessing (recorded in the store), refused in one line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SUBPROCESS_TIMEOUT, manifest, read_beton, run_cli

from kdcache.errors import UserError
from kdcache.models import build_model, load_teacher_checkpoint, timm_preprocessing
from kdcache.store import LogitCache

timm = pytest.importorskip("timm")


def test_timm_names_build_and_unknown_names_are_refused():
    model = build_model("timm:resnet10t", 4, 16)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(UserError, match="unknown timm model 'resnet10tt'"):
        build_model("timm:resnet10tt", 4, 16)


def test_without_timm_a_timm_name_says_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"pip install 'kdcache\[timm\]'"):
        build_model("timm:resnet10t", 4, 16)


def test_preprocessing_comes_from_the_checkpoints_args_else_the_pretrained_config():
    model = timm.create_model("resnet10t", num_classes=4)
    mean, std, size = timm_preprocessing(model)
    assert size == model.pretrained_cfg["input_size"][-1]
    assert np.allclose(mean, [255 * v for v in model.pretrained_cfg["mean"]])
    args = {"img_size": 24, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert timm_preprocessing(model, args) == ([127.5] * 3, [63.75] * 3, 24)


def test_checkpoints_are_checked_for_class_count_and_architecture(tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(UserError, match="predicts 10 classes but the dataset has 4"):
        load_teacher_checkpoint(tmp_path / "ten.pth", "timm:resnet10t", 4, 16)
    torch.save({"state_dict": build_model("resnet8", 4, 16).state_dict()}, tmp_path / "r8.pth")
    with pytest.raises(UserError, match="does not hold a timm:resnet10t"):
        load_teacher_checkpoint(tmp_path / "r8.pth", "timm:resnet10t", 4, 16)
    # a plain state dict of a kdcache architecture loads too, with DDP's prefix
    r8 = build_model("resnet8", 4, 16)
    torch.save({f"module.{k}": v for k, v in r8.state_dict().items()}, tmp_path / "ddp.pth")
    loaded = load_teacher_checkpoint(tmp_path / "ddp.pth", "resnet8", 4, 16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded(x), r8.eval()(x), atol=1e-6)  # channels-last: the same up to rounding


def test_a_timm_checkpoint_dumps_with_its_own_preprocessing(synth, tmp_path):
    """The store holds the timm model's outputs on images normalised with its own mean and std and resized to
    its input size (from the checkpoint's args, as timm's train.py saves them), to float16 precision."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    args = {"img_size": 24, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    torch.save({"arch": "resnet10t", "state_dict": model.state_dict(), "args": args}, tmp_path / "t.pth")
    out = tmp_path / "c.zarr"
    run_cli("dump", "--teacher", "timm:resnet10t", "--checkpoint", tmp_path / "t.pth", "--data", synth / "train.beton",
            "--out", out, "--batch-size", 50, "--chunk-rows", 100, "--workers", 1)
    cache = LogitCache(out)
    assert cache.attrs["teacher_preprocessing"] == {"mean": [127.5, 102.0, 76.5], "std": [51.0, 63.75, 76.5],
                                                    "input_size": 24}
    images, _, index = read_beton(synth / "train.beton")
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(args["mean"]).view(1, 3, 1, 1) * 255) / (torch.tensor(args["std"]).view(1, 3, 1, 1) * 255)
    with torch.no_grad():
        want = model(F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False))
    have = torch.from_numpy(cache.logits(index[:64]))
    assert torch.allclose(have, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    # a kdcache-format teacher keeps the dataset's own preprocessing, and says so
    own = LogitCache(_kdcache_teacher_store(synth, tmp_path)).attrs["teacher_preprocessing"]
    assert manifest(synth)["mean"] == own["mean"]


def _kdcache_teacher_store(synth, tmp_path):
    from kdcache.models import save_checkpoint
    save_checkpoint(tmp_path / "k.pt", build_model("timm:resnet10t", 4, 16), arch="timm:resnet10t", num_classes=4,
                    image_size=16)
    out = tmp_path / "k.zarr"
    run_cli("dump", "--teacher", "timm:resnet10t", "--checkpoint", tmp_path / "k.pt", "--data",
            synth / "train.beton", "--out", out, "--batch-size", 100, "--chunk-rows", 200, "--workers", 1)
    return out


@pytest.mark.slow
def test_pretrained_offline_fails_in_one_line(synth):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    exe = ROOT / ".venv" / "bin" / "kdcache" if (ROOT / ".venv").exists() else "kdcache"
    result = subprocess.run([str(exe), "dump", "--teacher", "timm:resnet10t", "--pretrained", "--data",
                             str(synth / "train.beton"), "--out", str(synth.parent / "never.zarr")],
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pretrained weights for timm:resnet10t" in lines[0] and "--checkpoint" in lines[0]


@pytest.mark.slow
def test_a_plain_state_dict_says_what_it_sees_and_data_preprocessing_keeps_the_datasets(synth, tmp_path):
    """A plain state dict carries no preprocessing: timm's pretrained config decides, and the dump says so
    in a line rather than resizing silently; `--teacher-preprocessing data` keeps the dataset's own, and a
    store made one way is not resumed the other way."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    args = ("dump", "--teacher", "timm:resnet10t", "--checkpoint", tmp_path / "plain.pth", "--data",
            synth / "train.beton", "--batch-size", 100, "--chunk-rows", 200, "--workers", 1)
    size = model.pretrained_cfg["input_size"][-1]
    r = run_cli(*args, "--out", tmp_path / "auto.zarr")
    assert f"teacher timm:resnet10t sees {size} px inputs (the data's are 16)" in r.output
    assert LogitCache(tmp_path / "auto.zarr").attrs["teacher_preprocessing"]["input_size"] == size
    r = run_cli(*args, "--out", tmp_path / "data.zarr", "--teacher-preprocessing", "data")
    assert "sees" not in r.output
    cache = LogitCache(tmp_path / "data.zarr")
    assert cache.attrs["teacher_preprocessing"] == {"mean": manifest(synth)["mean"], "std": manifest(synth)["std"],
                                                    "input_size": 16}
    images, _, index = read_beton(synth / "train.beton")
    x = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float()
    mean, std = (torch.tensor(manifest(synth)[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        want = model((x - mean) / std)
    have = torch.from_numpy(cache.logits(index[:32]))
    assert torch.allclose(have, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    r = run_cli(*args, "--out", tmp_path / "data.zarr", expect=2)  # auto now: another preprocessing
    assert "has another teacher preprocessing" in r.output and "Traceback" not in r.output


def test_an_online_timm_teacher_sees_what_its_cache_would(synth, tmp_path):
    """The online baseline of a cache must see the pixels the dump's teacher saw: the same
    --teacher-preprocessing rule (a plain state dict: timm's pretrained config unless `data`)."""
    from kdcache.beton import dataset_info
    from kdcache.config import TrainConfig
    from kdcache.models import Preprocessed
    from kdcache.teachers import make_teacher

    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), tmp_path / "plain.pth")
    info = dataset_info(synth / "train.beton")
    for choice, wrapped in (("auto", True), ("data", False)):
        cfg = TrainConfig(data=str(synth / "train.beton"), out=str(tmp_path / choice), alpha="0.5",
                          teacher_online="timm:resnet10t", teacher_checkpoint=str(tmp_path / "plain.pth"),
                          teacher_preprocessing=choice)
        teacher = make_teacher(cfg, info, np.arange(10), torch.device("cpu"))
        assert isinstance(teacher.model, Preprocessed) == wrapped
        assert teacher(torch.randn(2, 3, 16, 16), torch.arange(2)).shape == (2, 4)
