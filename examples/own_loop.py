"""Distil a student from a kdcache store in a plain PyTorch loop: any map-style dataset, any model (timm
ones as timm:NAME), a pruned subset.

    python examples/own_loop.py --data imgs/ --cache cache.zarr --fraction 0.1 --epochs 30 --arch resnet8

`--data` is an image folder with train/ and val/ (or test/), read with torchvision's ImageFolder and
joined to the store's rows by the index contract (each file's path under train/), or `cifar10:ROOT` /
`cifar100:ROOT` (torchvision's CIFAR datasets, whose rows are their positions). Prints one line per epoch,
and last `test_acc=<float>`.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import kdcache
from kdcache.config import WARMUP_FLOOR
from kdcache.distill import auto_alpha
from kdcache.models import ARCH_HELP, build_model
from kdcache.selection import select

SMALL = 64  # images up to this side: CIFAR's pad-4 crop + flip; larger: random-resized crop + flip


def parse(argv=None) -> argparse.Namespace:
    return parser(__doc__).parse_args(argv)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options, shared with examples/lightning_module.py; `doc`'s first paragraph is the description."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="image folder with train/ and val/, or cifar10:ROOT / cifar100:ROOT")
    p.add_argument("--cache", required=True, help="teacher-logit store from `kdcache dump` on the same training split")
    p.add_argument("--fraction", type=float, default=0.1, help="random fraction of the training set kept")
    p.add_argument("--indices", default=None, help="train on these store rows (.npy from `kdcache select`) instead "
                   "of a random --fraction")
    p.add_argument("--epochs", type=int, default=30, help="passes over the kept subset")
    p.add_argument("--arch", default="resnet8", help=f"student: {ARCH_HELP}")
    p.add_argument("--alpha", default="auto", help="KD weight in [0, 1], or auto (from the fraction)")
    p.add_argument("--temperature", type=float, default=None,
                   help="KD temperature [default: a top-k store's own, else 4]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov; warm-up, then cosine)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="seed for the subset, initialisation and data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    return p


def datasets_for(data: str, mean: list[float], std: list[float], size: int):
    """(train, test) datasets, normalised with the store's dataset statistics (0..255 in the manifest)."""
    norm = transforms.Normalize([m / 255 for m in mean], [s / 255 for s in std])
    if size <= SMALL:
        augment = [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()]
        plain = [transforms.Resize(size), transforms.CenterCrop(size)]
    else:
        augment = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        plain = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    train_tf = transforms.Compose([*augment, transforms.ToTensor(), norm])
    test_tf = transforms.Compose([*plain, transforms.ToTensor(), norm])
    name, _, root = data.partition(":")
    if name in ("cifar10", "cifar100") and root:
        base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

        class Cifar(base):
            """torchvision's CIFAR without its MD5 check, which re-saved copies fail; rows_for checks every
            label against the store instead."""
            def _check_integrity(self) -> bool:
                return True

        return Cifar(root, train=True, transform=train_tf), Cifar(root, train=False, transform=test_tf)
    from pathlib import Path
    test_dir = next((Path(data) / d for d in ("val", "test") if (Path(data) / d).is_dir()), Path(data) / "val")
    return datasets.ImageFolder(Path(data) / "train", train_tf), datasets.ImageFolder(test_dir, test_tf)


def kept_subset(args: argparse.Namespace):
    """(store, train_set, test_set, size, keep, rows): the store opened to read its description, the datasets,
    their image side, the positions `keep` of the kept training items and their store rows. Sets
    args.fraction to the kept share."""
    store = kdcache.TeacherTargets(args.cache, rows=[])  # opened once to read its description; loaded below
    manifest = store.cache.attrs["manifest"]
    size = manifest["image_shape"][0] if manifest.get("image_shape") else manifest["crop_side"]
    train_set, test_set = datasets_for(args.data, manifest["mean"], manifest["std"], size)

    # the index contract: the store row of every training item (refuses another dataset in one line)
    rows = kdcache.rows_for(store, train_set)
    if args.indices:  # positions of the dataset's items whose rows were selected
        keep = np.flatnonzero(np.isin(rows, np.load(args.indices)))
        args.fraction = len(keep) / len(rows)
    else:  # a random subset, as `kdcache train --method random --seed S` draws it
        keep = select("random", args.fraction, store.cache.labels()[rows], seed=args.seed)
    return store, train_set, test_set, size, keep, rows[keep]


def alpha_of(args: argparse.Namespace) -> float:
    """--alpha, or auto's from the kept fraction (kdcache train's rule)."""
    return auto_alpha(args.fraction) if args.alpha == "auto" else float(args.alpha)


def train_loader(args: argparse.Namespace, train_set, keep: np.ndarray, rows: np.ndarray) -> DataLoader:
    """The kept items with their store rows, batches of (x, y, index), shuffled by the seed."""
    return DataLoader(kdcache.WithIndex(Subset(train_set, keep), rows=rows),
                      batch_size=min(args.batch_size, len(keep)),
                      shuffle=True, drop_last=len(keep) % args.batch_size == 1,  # BatchNorm needs 2 a batch
                      num_workers=args.workers,
                      generator=torch.Generator().manual_seed(args.seed), persistent_workers=args.workers > 0)


def sgd(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD with Nesterov momentum, weight decay on weights only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                            {"params": no_decay, "weight_decay": 0}],
                           lr=args.lr, momentum=0.9, nesterov=True)


def lr_factor(total: int):
    """The learning rate's factor at each step of `total`: kdcache train's linear warm-up, then cosine to 0."""
    warmup = max(int(0.02 * total), min(WARMUP_FLOOR, total // 4))
    return lambda step: ((step + 1) / warmup if step < warmup else
                         0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def main(argv=None) -> float:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    store, train_set, test_set, size, keep, rows = kept_subset(args)
    targets = kdcache.TeacherTargets(args.cache, rows=rows, device=device)  # the kept rows, on the device once
    loss_fn = targets.loss(alpha=alpha_of(args), temperature=args.temperature)

    model = build_model(args.arch, store.num_classes, size).to(device)
    opt = sgd(model, args)
    loader = train_loader(args, train_set, keep, rows)
    factor = lr_factor(args.epochs * len(loader))
    step, seen, start = 0, 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y, index in loader:
            lr = args.lr * factor(step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y, targets(index))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(x)
        print(f"epoch={epoch + 1} loss={loss.item():.4f} ce={loss_fn.ce.item():.4f} kl={loss_fn.kl.item():.4f} "
              f"img_per_s={seen / (time.perf_counter() - start):.0f}", flush=True)
    accuracy = evaluate(model, DataLoader(test_set, batch_size=512, num_workers=args.workers), device)
    print(f"test_acc={accuracy:.4f}")
    return accuracy


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / total


if __name__ == "__main__":
    import sys

    from kdcache.errors import UserError
    try:
        main()
    except UserError as e:  # a user's mistake: one line, as kdcache's CLI says it
        sys.exit(f"error: {e}")
