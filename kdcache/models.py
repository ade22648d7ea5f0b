"""The model registry shared by teachers and students, and the checkpoint format.

Names are the CIFAR ResNets of He et al. (resnet20/32/44/56/110, plus the resnet8 that distillation
papers use as a small student) and torchvision's classification
models by their torchvision names. Inputs of 64 px or less get a small-image stem (3x3 stride-1
first convolution, no max-pool), as CIFAR ResNets do.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .files import atomic

SMALL_IMAGE = 64
CIFAR_RESNETS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
ARCH_HELP = ("a CIFAR ResNet (" + ", ".join(CIFAR_RESNETS) + ") or any torchvision classifier by its name "
             "(e.g. resnet18, resnet50; small images get a small-image stem)")


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
    """A fresh (or torchvision-pretrained) model for `num_classes` classes and `image_size` inputs."""
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
                            device: torch.device | str = "cpu") -> nn.Module:
    """A teacher checkpoint checked against what it must match: its architecture, the dataset's
    classes and image size. One validator for the dump and for an online teacher."""
    model, meta = load_checkpoint(path, "cpu")
    if meta["arch"] != arch:
        raise UserError(f"teacher {arch} asked for, but {path} holds a {meta['arch']}")
    if meta["num_classes"] != num_classes:
        raise UserError(f"{path} predicts {meta['num_classes']} classes but the dataset has {num_classes}")
    if meta["image_size"] != image_size:
        raise UserError(f"{path} was built for {meta['image_size']} px images but the dataset's are {image_size} px")
    return model.to(device, memory_format=torch.channels_last).eval()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
