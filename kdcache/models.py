"""The model registry shared by teachers and students, and the checkpoint format.

Names are the CIFAR ResNets of He et al. (resnet20/32/44/56/110, plus the resnet8 that distillation
papers use as a small student), torchvision's classification models by their torchvision names, and
timm's as `timm:NAME` (timm is an optional extra: pip install 'kdcache[timm]'). Torchvision inputs of
64 px or less get a small-image stem (3x3 stride-1 first convolution, no max-pool), as CIFAR ResNets do;
timm models are built as timm defines them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .files import atomic

SMALL_IMAGE = 64
CIFAR_RESNETS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
ARCH_HELP = ("a CIFAR ResNet (" + ", ".join(CIFAR_RESNETS) + "), any torchvision classifier by its name "
             "(e.g. resnet18, resnet50; small images get a small-image stem) or a timm model as timm:NAME "
             "(e.g. timm:resnet10t)")
TIMM = "timm:"


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet: 6n+2 layers, widths 16/32/64 (projection shortcuts)."""

    def __init__(self, n: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _small_stem(model: nn.Module) -> None:
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # the torchvision ResNet family
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # other families: no downsampling
    first.stride = (1, 1)


def model_names() -> list[str]:
    import torchvision
    return sorted(CIFAR_RESNETS) + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """A fresh (or torchvision- or timm-pretrained) model for `num_classes` classes and `image_size` inputs."""
    if name.startswith(TIMM):
        return _timm_model(name.removeprefix(TIMM), num_classes, pretrained)
    if name in CIFAR_RESNETS:
        if pretrained:
            raise UserError(f"{name} has no pretrained weights; pass --checkpoint")
        return CifarResNet(CIFAR_RESNETS[name], num_classes)
    import torchvision
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    if pretrained:
        model = _pretrained(name, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        _small_stem(model)
    return model


def _pretrained(name: str, num_classes: int) -> nn.Module:
    import socket

    import torchvision
    weights = torchvision.models.get_model_weights(name).DEFAULT
    n = len(weights.meta.get("categories") or [])
    if n != num_classes:
        raise UserError(f"pretrained {name} predicts {n} classes but the dataset has {num_classes}")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # offline: fail within seconds rather than hang
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as e:  # URLError, timeouts, HTTP errors: all mean the weights are out of reach
        raise UserError(f"cannot download pretrained weights for {name} ({type(e).__name__}: {e}); "
                        "without network access, pass --checkpoint")
    finally:
        socket.setdefaulttimeout(old)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm: models need timm, an optional extra: pip install 'kdcache[timm]'")
    return timm


def _timm_model(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise UserError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    import socket
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # offline: fail within seconds rather than hang
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001  (hub errors, timeouts, missing files: the weights are out of reach)
        raise UserError(f"cannot get pretrained weights for timm:{name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); without network access, pass --checkpoint")
    finally:
        socket.setdefaulttimeout(old)
    if model.num_classes != num_classes:
        raise UserError(f"pretrained timm:{name} predicts {model.num_classes} classes "
                        f"but the dataset has {num_classes}")
    return model


class Preprocessed(nn.Module):
    """A teacher that sees its own preprocessing: the loader's images (normalised with the dataset's mean
    and std, 0..255) are brought to the teacher's mean, std and input size. `preprocessing` is what a
    store records."""

    def __init__(self, model: nn.Module, data_mean, data_std, mean, std, input_size: int, image_size: int):
        super().__init__()
        self.model = model
        view = (1, 3, 1, 1)
        # x_teacher = (x * ds + dm - m) / s = x * scale + shift, in one multiply-add
        scale = torch.tensor(data_std) / torch.tensor(std)
        shift = (torch.tensor(data_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(view).float(), persistent=False)
        self.register_buffer("shift", shift.view(view).float(), persistent=False)
        self.input_size, self.image_size = input_size, image_size
        self.preprocessing = {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                              "input_size": input_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=self.input_size < x.shape[-1])
        return self.model(x)


def timm_preprocessing(model: nn.Module, args=None) -> tuple[list[float], list[float], int]:
    """(mean, std on 0..255, input side) a timm model expects: from the training arguments timm's train.py
    saves in its checkpoints where present, else from the model's pretrained config (what timm's scripts use)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    args = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    mean = args.get("mean") or cfg.get("mean", (0.485, 0.456, 0.406))
    std = args.get("std") or cfg.get("std", (0.229, 0.224, 0.225))
    size = args.get("img_size") or (args.get("input_size") or cfg.get("input_size", (3, 224, 224)))[-1]
    return [255 * v for v in mean], [255 * v for v in std], int(size)


def with_own_preprocessing(model: nn.Module, name: str, data_mean, data_std, image_size: int, args=None) -> nn.Module:
    """A timm teacher wrapped in its own preprocessing where it differs from the dataset's; other models as they are."""
    if not name.startswith(TIMM):
        return model
    mean, std, size = timm_preprocessing(model, args)
    same = np.allclose(mean, data_mean, atol=0.5) and np.allclose(std, data_std, atol=0.5) and size == image_size
    if same:
        model.preprocessing = {"mean": list(data_mean), "std": list(data_std), "input_size": image_size}
        return model
    return Preprocessed(model, data_mean, data_std, mean, std, size, image_size)


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier layer whose input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no final linear layer")
    return linears[-1]


def save_checkpoint(path: str | Path, model: nn.Module, *, arch: str, num_classes: int, image_size: int,
                    **meta) -> None:
    """Write a checkpoint `load_checkpoint` (and so `kdcache dump --checkpoint`) accepts, atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    with atomic(path) as tmp:
        torch.save({"arch": arch, "num_classes": num_classes, "image_size": image_size,
                    "state_dict": model.state_dict(), **meta}, tmp)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes; return it (in eval mode) and the checkpoint's metadata."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        arch, num_classes, size = ckpt["arch"], ckpt["num_classes"], ckpt["image_size"]
    except Exception as e:
        raise UserError(f"{path} is not a kdcache checkpoint ({type(e).__name__}: {e})")
    model = build_model(arch, num_classes, size)
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.to(device).eval(), ckpt


def load_teacher_checkpoint(path: str | Path, arch: str, num_classes: int, image_size: int,
                            device: torch.device | str = "cpu", *, mean=None, std=None) -> nn.Module:
    """A teacher checkpoint checked against what it must match: its architecture, the dataset's
    classes and image size. One validator for the dump and for an online teacher.

    `path` holds kdcache's own checkpoint (model.pt), or a plain state dict or timm checkpoint (`state_dict`,
    `state_dict_ema` or `model` inside) of the model `arch`. A timm teacher from a timm checkpoint sees its own
    preprocessing (its `preprocessing` attribute says which) given the dataset's `mean` and `std`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e})")
    if isinstance(ckpt, dict) and {"arch", "num_classes", "image_size", "state_dict"} <= ckpt.keys():
        model, meta = load_checkpoint(path, "cpu")
        if meta["arch"] != arch:
            raise UserError(f"teacher {arch} asked for, but {path} holds a {meta['arch']}")
        if meta["num_classes"] != num_classes:
            raise UserError(f"{path} predicts {meta['num_classes']} classes but the dataset has {num_classes}")
        if meta["image_size"] != image_size:
            raise UserError(f"{path} was built for {meta['image_size']} px images "
                             f"but the dataset's are {image_size} px")
        # kdcache trained it on the dataset's own preprocessing
    else:
        model = _from_state_dict(path, ckpt, arch, num_classes, image_size)
        if mean is not None:
            model = with_own_preprocessing(model, arch, mean, std, image_size,
                                           ckpt.get("args") if isinstance(ckpt, dict) else None)
    return model.to(device, memory_format=torch.channels_last).eval()


def _from_state_dict(path: Path, ckpt, arch: str, num_classes: int, image_size: int) -> nn.Module:
    state = ckpt
    if isinstance(ckpt, dict):
        state = next((ckpt[k] for k in ("state_dict_ema", "state_dict", "model")
                      if isinstance(ckpt.get(k), dict)), ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is neither a kdcache checkpoint nor a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    model = build_model(arch, num_classes, image_size)
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    weight = state.get(f"{name[0]}.weight") if name else None
    if weight is not None and weight.shape[0] != num_classes:
        raise UserError(f"{path} predicts {weight.shape[0]} classes but the dataset has {num_classes}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UserError(f"{path} does not hold a {arch}: {lines[1].strip() if len(lines) > 1 else e}")
    return model


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
