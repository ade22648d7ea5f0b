"""Every GPU measurement in one prepared command, for the few minutes a GPU is lent (about 2-3 min on an
H200 at the default size), all with channels-last and bf16 autocast, written to one results file:

(a) the student's forward + backward images/s on synthetic tensors already on the device (the bound);
(b) `kdcache train` images/s, CE only;        (c) the same with cached KD;
(d) online KD, with resnet50 and with the student's own architecture as the teacher;
(e) `kdcache dump` samples/s against bare teacher inference;
(f) a test accuracy on real images (or the one (b) reaches), so that correctness on CUDA is seen too;
(g) cached KD from 4 stored views per sample (`dump --views 4`, replayed) against (c), and that dump's speed.
Targets: (c)/(b) >= 0.98, (c)/(d, resnet50) >= 2, (e) >= 0.97, (b)/(a) >= 0.95, (g)/(c) >= 0.95.

    python benchmarks/bench_gpu.py                        # CIFAR-10 from ../shared, resnet18 student
    python benchmarks/bench_gpu.py --device cpu --quick   # toy size: what `make test` runs, so it cannot rot

A lent GPU machine cannot reach ../shared and takes 64 MiB of files: there the speeds are measured on
CIFAR-10-size synthetic data (`--data synthetic`, 50,000 32 px images) and (f) on a real subset small
enough to travel, made here with `--make-real FILE.npz` (the first 10,000 CIFAR-10 training images and
2,000 test images) and given as `--real FILE.npz`.

Writes benchmarks/results/gpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_dump import bare_inference
from common import CIFAR10, RESULTS, default_data, machine

from kdcache.beton import dataset_info
from kdcache.device import resolve_device
from kdcache.dump import dump
from kdcache.models import build_model, load_teacher_checkpoint, save_checkpoint
from kdcache.train import TrainConfig, train

TARGETS = {"cached_over_ce": 0.98, "cached_over_online_resnet50": 2.0, "dump_over_bare": 0.97,
           "views_over_cached": 0.95,
           "trainer_over_bound": 0.95}


def bound(arch: str, info, dev: torch.device, batch_size: int, steps: int) -> float:
    """Images/s of the student's training step alone, on one synthetic batch already on the device."""
    torch.manual_seed(0)
    model = build_model(arch, info.num_classes, info.image_size).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch_size, 3, info.image_size, info.image_size, device=dev).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, info.num_classes, (batch_size,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: cuDNN picks its kernels
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return steps * batch_size / (time.perf_counter() - start)


def quick_data(folder: Path) -> Path:
    """256 synthetic 16 px images: small enough for resnet50 on a CPU."""
    from kdcache.beton import convert
    from kdcache.sources import make_synthetic

    if not (folder / "manifest.json").is_file():
        convert(make_synthetic(num_train=256, num_test=64, num_classes=4, image_size=16), folder, num_workers=1)
    return folder / "train.beton"


def make_real(out: Path, train: int = 10_000, test: int = 2_000) -> None:
    """A CIFAR-10 subset small enough to carry to a GPU machine: raw arrays (37 MB), since a beton
    of them takes more (FFCV writes whole pages per worker)."""
    from kdcache.sources import load_source

    src = load_source("cifar10", str(CIFAR10))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, classes=np.array(src.classes), train_images=src.train.images[:train],
             train_labels=src.train.labels[:train], test_images=src.test.images[:test],
             test_labels=src.test.labels[:test])
    print(f"-> {out}: {train} CIFAR-10 training and {test} test images")


def real_beton(npz: Path, work: Path) -> Path:
    """The beton of a subset written by make_real."""
    from kdcache.beton import convert
    from kdcache.sources import Source, Split

    if not (work / "real-data" / "manifest.json").is_file():
        a = np.load(npz)
        convert(Source("cifar10-subset", [str(c) for c in a["classes"]],
                       Split(labels=a["train_labels"], images=a["train_images"]),
                       Split(labels=a["test_labels"], images=a["test_images"])), work / "real-data")
    return work / "real-data" / "train.beton"


def real_run(npz: Path, student: str, dev: torch.device, epochs: int, workers: int, work: Path) -> dict:
    """(f) CE training on real images to a test accuracy: correctness on the device, not speed."""
    beton = real_beton(npz, work)
    print(f"--- real run: {student} on {beton}, {epochs} epochs", flush=True)
    return train(TrainConfig(data=str(beton), arch=student, fraction=1.0, epochs=epochs, batch_size=256, alpha="0",
                             device=str(dev), eval_every=epochs, seed=0, workers=workers, overwrite=True,
                             out=str(work / "real")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true",
                   help="toy size (synthetic 16 px data, resnet8): a check that it runs")
    p.add_argument("--student", default=None, help="default: resnet18 (resnet8 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="per trainer run (default 5; 2 with --quick): the\n"
                   "first epoch JIT-compiles, the median of the others is the speed")
    p.add_argument("--batch-size", type=int, default=None, help="default 512 (32 with --quick)")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--data", default=None,
                   help="train beton, or 'synthetic' (default: CIFAR-10 from ../shared if there, else synthetic)")
    p.add_argument("--real", default=None, help="(f) on this .npz of real images (default: the CE run of (b))")
    p.add_argument("--real-epochs", type=int, default=15)
    p.add_argument("--real-arch", default=None, help="(f)'s network (default: the student)")
    p.add_argument("--make-real", default=None, metavar="NPZ", help="write the CIFAR-10 subset for --real; exit")
    p.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = p.parse_args()
    if args.make_real:
        return make_real(Path(args.make_real))
    dev = resolve_device(args.device)
    student = args.student or ("resnet8" if args.quick else "resnet18")
    epochs, batch = args.epochs or (2 if args.quick else 5), args.batch_size or (32 if args.quick else 512)
    beton = quick_data(Path(args.out).with_name("gpu-quick-data")) if args.quick else default_data(args.data, 50_000)
    info = dataset_info(beton)
    work = Path(args.out).with_name("gpu-work")
    work.mkdir(parents=True, exist_ok=True)
    teachers = {}
    for name in ("resnet50", student):  # random-init teachers: speed does not depend on the weights
        torch.manual_seed(0)
        teachers[name] = work / f"{name}.pt"
        save_checkpoint(teachers[name], build_model(name, info.num_classes, info.image_size), arch=name,
                        num_classes=info.num_classes, image_size=info.image_size)
    print(f"{student} student on {info.size} samples ({info.image_size} px), batch {batch}, {machine(dev)}", flush=True)

    # (e) first: it also writes the cache (c) reads
    teacher = load_teacher_checkpoint(teachers[student], student, info.num_classes, info.image_size, dev)
    bare_inference(teacher, info, dev, batch, args.workers)  # FFCV compiles its pipeline
    bare = bare_inference(teacher, info, dev, batch, args.workers)

    def timed_dump(name: str, **options) -> float:
        """Samples/s of one `kdcache dump` of the teacher into work/name."""
        start = time.perf_counter()
        dump(teacher=student, checkpoint=str(teachers[student]), data=str(beton), out=str(work / name),
             batch_size=batch, chunk_rows=batch * 8, device=str(dev), workers=args.workers, overwrite=True,
             progress=False, **options)
        return info.size / (time.perf_counter() - start)

    # the first builds and JIT-compiles its loader, as the first bare pass did
    first_dump, dumped = timed_dump("cache.zarr"), timed_dump("cache.zarr")
    # a cache of stored views (kdcache dump --views K): its dump runs the teacher K + 1 times
    views = 2 if args.quick else 4
    dumped_views = timed_dump("cache-views.zarr", views=views)

    a = bound(student, info, dev, batch, steps=5 if args.quick else 50)
    base = dict(data=str(beton), arch=student, fraction=1.0, epochs=epochs, batch_size=batch, device=str(dev),
                eval_every=10**6, seed=0, workers=args.workers, overwrite=True)
    modes = {"ce": dict(alpha="0"), "cached_kd": dict(alpha="0.9", cache=str(work / "cache.zarr")),
             f"cached_kd_views{views}": dict(alpha="0.9", cache=str(work / "cache-views.zarr")),
             "online_kd_resnet50": dict(alpha="0.9", teacher_online="resnet50",
                                        teacher_checkpoint=str(teachers["resnet50"])),
             f"online_kd_{student}": dict(alpha="0.9", teacher_online=student,
                                          teacher_checkpoint=str(teachers[student]))}
    summaries = {}
    for mode, options in modes.items():
        print(f"--- {mode}", flush=True)
        summaries[mode] = train(TrainConfig(out=str(work / mode), **base, **options))
    speed = {mode: s["images_per_sec"] for mode, s in summaries.items()}
    if args.real:
        arch = args.real_arch or student
        real = real_run(Path(args.real), arch, dev, args.real_epochs, args.workers, work)
        accuracy = {"data": args.real, "arch": arch, "samples": real["num_selected"], "epochs": args.real_epochs,
                    "test_acc": real["test_acc"], "images_per_sec": real["images_per_sec"]}
    else:
        accuracy = {"data": str(beton), "arch": student, "samples": info.size, "epochs": epochs,
                    "test_acc": summaries["ce"]["test_acc"]}
    ratios = {"cached_over_ce": speed["cached_kd"] / speed["ce"],
              "cached_over_online_resnet50": speed["cached_kd"] / speed["online_kd_resnet50"],
              f"cached_over_online_{student}": speed["cached_kd"] / speed[f"online_kd_{student}"],
              "dump_over_bare": dumped / bare, "trainer_over_bound": speed["ce"] / a,
              "views_over_cached": speed[f"cached_kd_views{views}"] / speed["cached_kd"]}
    result = {"benchmark": "gpu", "machine": machine(dev), "device": str(dev), "torch": torch.__version__,
              "python": platform.python_version(), "quick": args.quick, "student": student, "data": str(beton),
              "samples": info.size, "batch_size": batch, "epochs": epochs,
              "bound_images_per_sec": a, "images_per_sec": speed, "bare_samples_per_sec": bare,
              "dump_samples_per_sec": dumped, "first_dump_samples_per_sec": first_dump, "views": views,
              "dump_views_samples_per_sec": dumped_views,
              "ratios": ratios, "targets": TARGETS,
              "met": {k: ratios[k] >= t for k, t in TARGETS.items()},
              "accuracy": accuracy}
    print(f"\n(a) bound {a:9.0f} img/s")
    for mode, ips in speed.items():
        print(f"    {mode:24s} {ips:9.0f} img/s")
    print(f"(e) dump {dumped:.0f} samples/s vs bare {bare:.0f} (first dump of the process: {first_dump:.0f}); "
          f"with {views} stored views {dumped_views:.0f}")
    print(f"(f) test accuracy {accuracy['test_acc']:.4f}: {accuracy['arch']}, {accuracy['epochs']} CE epochs on "
          f"{accuracy['samples']} samples of {accuracy['data']}")
    for key, target in TARGETS.items():
        print(f"    {key:30s} {ratios[key]:7.3f}  target >= {target}  {'met' if result['met'][key] else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
