"""kdcache's loader (FFCV) against the loader people use by default (torch DataLoader + torchvision), in
one run on the same data, augmentations, batch size and worker count.

Two paths:
- small images: CIFAR-10 (from ../shared, else synthetic), random crop with 4 px padding + flip;
- large images: a JPEG image folder made from the same images (upscaled), random-resized crop + flip.
kdcache's side is `kdcache.loader.Batches` in full: FFCV decoding and augmentation, the copy out of
FFCV's reused buffers, normalisation. The first epoch (FFCV compiles its pipeline) and the later ones
are timed apart. Target: later epochs >= 5x on 2 cores.

The image folder is also timed against FFCV's own RandomResizedCropRGBImageDecoder + RandomHorizontalFlip
(unseeded, the crop made inside FFCV's decoding threads), with the same copy and normalisation:
kdcache's seeded crops (`kdcache.crops`: boxes drawn for the epoch on the host, cut by FFCV's decoder
from a table) must keep at least 0.9x of its speed. The two alternate epoch by epoch, so that the
machine's drift falls on both.

    python benchmarks/bench_loader.py                         # 20,000 CIFAR-10 images, 2 workers
    python benchmarks/bench_loader.py --samples 2000 --epochs 2   # a quick look
    python benchmarks/bench_loader.py --only large --large-side 32   # the image folder alone, at 32 px

Writes benchmarks/results/bench_loader.json (with --only: loader-small.json or loader-large.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, beton_arrays, default_data, machine

from kdcache.beton import convert, dataset_info
from kdcache.loader import Batches
from kdcache.sources import load_source


def timed_epochs(make_iter, epochs: int) -> list[float]:
    """Images per second of each epoch of the iterable `make_iter()` returns."""
    speeds = []
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for batch in make_iter():
            seen += len(batch[1])
        speeds.append(seen / (time.perf_counter() - start))
    return speeds


class ArrayDataset(torch.utils.data.Dataset):
    """A torchvision-style dataset: (transform(PIL image), label) per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torch_loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, drop_last=False)


def compare(name: str, info, dataset, args) -> dict:
    indices = np.arange(min(args.samples, info.size))
    batches = Batches(info, batch_size=args.batch_size, train=True, indices=indices, num_workers=args.workers)
    ours = timed_epochs(lambda: batches, args.epochs)
    theirs = timed_epochs(lambda loader=torch_loader(dataset, args.batch_size, args.workers): loader, args.epochs)
    later = lambda s: float(np.median(s[1:])) if len(s) > 1 else s[0]  # noqa: E731
    result = {"kdcache_img_s": {"first_epoch": ours[0], "later_epochs": later(ours)},
              "torch_img_s": {"first_epoch": theirs[0], "later_epochs": later(theirs)},
              "ratio_later": later(ours) / later(theirs), "ratio_first": ours[0] / theirs[0],
              "samples": len(indices), "image_size": info.image_size}
    print(f"{name:6s} kdcache {later(ours):8.0f} img/s (first epoch {ours[0]:.0f})   torch DataLoader "
          f"{later(theirs):7.0f} img/s (first {theirs[0]:.0f})   ratio {result['ratio_later']:.1f}x", flush=True)
    return result


def small_images(args, beton: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    from torchvision import transforms as T

    info = dataset_info(beton)
    n = min(args.samples, info.size)
    transform = T.Compose([T.RandomCrop(info.image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([m / 255 for m in info.mean], [s / 255 for s in info.std])])
    return compare("small", info, ArrayDataset(images[:n], labels[:n], transform), args)


def _loader(info, batch_size: int, workers: int, indices: np.ndarray, seed: int, image: list):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    return Loader(info.path, batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM, seed=seed,
                  indices=indices, drop_last=False, pipelines={
                      "image": [*image, ToTensor(), ToTorchImage(channels_last=True)],
                      "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]})


def _normalised(info, loader):
    """Epochs of `loader` with `Batches`' copy and normalisation (on the CPU)."""
    from kdcache.loader import to_device

    device = torch.device("cpu")
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)

    def epoch():
        for images, labels, index in loader:
            x = to_device(images, device, copy=False).float()
            x = x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
            yield x, to_device(labels.reshape(-1), device), to_device(index.reshape(-1), device), None
    return epoch


def ffcv_rrc(info, batch_size: int, workers: int, indices: np.ndarray, seed: int):
    """FFCV's own random-resized crop + flip (unseeded, made in its decoding threads) with `Batches`' copy
    and normalisation: what image-folder training ran before kdcache's seeded crops."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip

    size = info.image_size
    image = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
    return _normalised(info, _loader(info, batch_size, workers, indices, seed, image))


def seeded_against_ffcv(info, args) -> dict:
    """kdcache's seeded random-resized crops against FFCV's own, epochs alternating."""
    indices = np.arange(min(args.large_samples, info.size))
    ours = Batches(info, batch_size=args.batch_size, train=True, indices=indices, num_workers=args.workers)
    contenders = {"seeded": lambda: ours, "ffcv": ffcv_rrc(info, args.batch_size, args.workers, indices, seed=0)}
    speeds = {k: [] for k in contenders}
    for _ in range(args.epochs):
        for name, make in contenders.items():
            speeds[name] += timed_epochs(make, 1)
    later = {k: float(np.median(v[1:])) if len(v) > 1 else v[0] for k, v in speeds.items()}
    result = {f"{k}_img_s": {"first_epoch": v[0], "later_epochs": later[k], "epochs": v} for k, v in speeds.items()}
    result.update({"ratio_later": later["seeded"] / later["ffcv"], "target_ratio": 0.9, "samples": len(indices),
                   "image_size": info.image_size, "stored_side": info.max_side})
    print(f"large  seeded RRC {later['seeded']:8.0f} img/s (first epoch {speeds['seeded'][0]:.0f})   FFCV's RRC "
          f"{later['ffcv']:7.0f} img/s (first {speeds['ffcv'][0]:.0f})   ratio {result['ratio_later']:.2f}x "
          "(target >= 0.9)", flush=True)
    return result


def large_images(args, images: np.ndarray, labels: np.ndarray) -> dict:
    """The same images as an image folder of JPEGs, upscaled to `--large-side` px."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    folder = RESULTS / "data" / f"jpeg-{args.large_samples}-{args.large_side}"
    if not (folder / "beton" / "manifest.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        for split, rows in (("train", range(args.large_samples)), ("val", range(50))):
            for i in rows:
                path = folder / split / f"c{labels[i]}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).resize((args.large_side, args.large_side)).save(path, quality=90)
        convert(load_source("imagefolder", str(folder)), folder / "beton", max_side=args.large_side,
                num_workers=args.workers)
    info = dataset_info(folder / "beton" / "train.beton")
    transform = T.Compose([T.RandomResizedCrop(info.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([m / 255 for m in info.mean], [s / 255 for s in info.std])])
    result = compare("large", info, ImageFolder(str(folder / "train"), transform), args)
    result["seeded_vs_ffcv_rrc"] = seeded_against_ffcv(info, args)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a train beton, or 'synthetic' (default: CIFAR-10 if present)")
    p.add_argument("--samples", type=int, default=20000, help="small images per epoch")
    p.add_argument("--large-samples", type=int, default=2000, help="JPEG images per epoch")
    p.add_argument("--large-side", type=int, default=128, help="stored side of the JPEGs (models see 7/8 of it)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="the same for both loaders")
    p.add_argument("--epochs", type=int, default=3, help="the first is timed apart (FFCV compiles then)")
    p.add_argument("--only", choices=("small", "large"), default=None, help="one path only")
    args = p.parse_args()
    torch.set_num_threads(args.workers)
    beton = default_data(args.data, args.samples)
    images, labels = beton_arrays(beton)
    small = small_images(args, beton, images, labels) if args.only != "large" else None
    large = large_images(args, images, labels) if args.only != "small" else None
    result = {"benchmark": "loader", "machine": machine(torch.device("cpu")), "batch_size": args.batch_size,
              "workers": args.workers, "epochs": args.epochs, "small": small, "large": large,
              "target_ratio": 5.0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    # one path alone goes beside the full result, not over it (summary.py reads bench_*.json: both paths)
    path = RESULTS / ("bench_loader.json" if args.only is None else f"loader-{args.only}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
