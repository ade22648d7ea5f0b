"""What every benchmark shares: the default data, where results go, and the machine's description."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from kdcache.beton import convert
from kdcache.sources import load_source, make_synthetic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"


def default_data(kind: str | None, synthetic_size: int) -> Path:
    """A train beton: the one given, else CIFAR-10 converted once from ../shared, else synthetic."""
    if kind and kind != "synthetic":
        return Path(kind)
    if kind is None and CIFAR10.is_dir():
        out = RESULTS / "data" / "cifar10"
        if not (out / "manifest.json").exists():
            print(f"converting CIFAR-10 from {CIFAR10} into {out} (once)")
            convert(load_source("cifar10", str(CIFAR10)), out)
        return out / "train.beton"
    out = RESULTS / "data" / f"synthetic-{synthetic_size}"
    if not (out / "manifest.json").exists():
        convert(make_synthetic(num_train=synthetic_size, num_test=100, num_classes=10, image_size=32), out)
    return out / "train.beton"


def machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def beton_arrays(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image (N, H, W, 3) uint8 and label of a small-image beton, in sample-index order: the very
    pixels kdcache's loader reads, for a baseline loader or a smaller copy."""
    from kdcache.beton import read_beton

    images, labels, index = read_beton(beton)
    order = np.argsort(index)
    return images[order], labels[order]
