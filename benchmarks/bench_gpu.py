"""Every GPU measurement in one prepared command, for the few minutes a GPU is lent (about 2-3 min on an
H200 at the default size), all with channels-last and bf16 autocast, written to one results file:

(a) the student's forward + backward images/s on synthetic tensors already on the device (the bound);
(b) `kdcache train` images/s, CE only;        (c) the same with cached KD;
(d) online KD, with resnet50 and with the student's own architecture as the teacher;
(e) `kdcache dump` samples/s against bare teacher inference;
(f) a test accuracy on real images (or the one (b) reaches), so that correctness on CUDA is seen too;
(g) cached KD from 4 stored views per sample (`dump --views 4`, replayed) against (c), and that dump's speed;
(h) the resnet50 forward bound, so that the attainable cached / online ratio, 1 + (a) / (h), is printed
    beside the measured one (the cache can at best save the teacher's forward);
(i) host syncs in a training step, counted under torch.cuda.set_sync_debug_mode("warn") (CPU: the
    synchronising operators, counted with TorchDispatchMode);
(j) the ring check: an epoch of the FFCV path, every batch kept while the GPU is busy, equals the
    resident path's bit for bit (a torn batch would differ); and (b) on the FFCV path, against (b).
Trainer modes run interleaved over --rounds (the best counts); the bounds are timed with CUDA events.
Targets: (c)/(b) >= 0.98, (c)/(d, resnet50) >= 0.9 of the attainable ratio, (e) >= 0.97, (b)/(a) >= 0.95,
(g)/(c) >= 0.95, no sync in the step, no torn batch.

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
import warnings
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

TARGETS = {"cached_over_ce": 0.98, "online_resnet50_of_attainable": 0.9, "dump_over_bare": 0.97,
           "views_over_cached": 0.95,
           "trainer_over_bound": 0.95}


def timed(dev: torch.device, fn, repeats: int) -> float:
    """Seconds per call of `fn`, after a warm-up: CUDA events on a GPU (no host timing of queued work)."""
    for _ in range(3):  # warm-up: cuDNN picks its kernels
        fn()
    if dev.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / repeats


def forward_bound(arch: str, info, dev: torch.device, batch_size: int, steps: int) -> float:
    """(h) Images/s of a teacher's forward alone (no grad, bf16 on CUDA), on one batch on the device."""
    torch.manual_seed(0)
    model = build_model(arch, info.num_classes, info.image_size).to(dev, memory_format=torch.channels_last).eval()
    x = torch.randn(batch_size, 3, info.image_size, info.image_size, device=dev).contiguous(
        memory_format=torch.channels_last)

    @torch.no_grad()
    def forward() -> None:
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            model(x)
    return batch_size / timed(dev, forward, steps)


def sync_count(cfg: TrainConfig, dev: torch.device, steps: int = 5) -> int:
    """(i) Host syncs in `steps` training steps (data, teacher rows, forward, loss, backward, optimiser)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kdcache.train import Trainer, validate

    info, test_info, alpha = validate(cfg)
    trainer = Trainer(cfg, info, test_info, alpha, dev)
    batches = iter(trainer.train_batches)
    trainer.train_step(*next(batches))  # the first step may set things up
    syncing = {"item", "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.overloadpacket.__name__ in syncing
            return func(*args, **(kwargs or {}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with Count():
                for _, batch in zip(range(steps), batches):
                    trainer.train_step(*batch)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    return cuda_syncs + Count.n


def ring_check(info, dev: torch.device, batch_size: int, workers: int) -> dict:
    """(j) An epoch of the FFCV path with every batch kept (not cloned) while the GPU is kept busy, so
    that asynchronous copies lag behind FFCV's refills: each must equal the resident path's batch."""
    from kdcache.loader import Batches
    from kdcache.resident import ResidentBatches

    options = dict(batch_size=batch_size, train=True, device=dev, seed=1, num_workers=workers)
    ffcv, resident = Batches(info, **options), ResidentBatches(info, **options)
    side = 2048 if dev.type == "cuda" else 64  # a CPU copies synchronously: nothing to race there
    busy = torch.randn(side, side, device=dev)
    kept = []
    for batch in ffcv:
        kept.append(batch)
        for _ in range(4):
            busy = busy @ busy / side  # queued work: the copies of later batches wait behind it
    torn = sum(not all(torch.equal(a, b) for a, b in zip(k[:3], r[:3])) for k, r in zip(kept, resident))
    return {"batches": len(kept), "torn": torn}


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

    return batch_size / timed(dev, step, steps)


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
    p.add_argument("--rounds", type=int, default=None, help="interleaved runs of every trainer mode; the best "
                   "counts (default 2; 1 with --quick)")
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
    r50 = forward_bound("resnet50", info, dev, batch, steps=2 if args.quick else 30)
    attainable = 1 + a / r50  # cached / online at best: the online step is the student's plus the teacher's
    base = dict(data=str(beton), arch=student, fraction=1.0, epochs=epochs, batch_size=batch, device=str(dev),
                eval_every=10**6, seed=0, workers=args.workers, overwrite=True)
    modes = {"ce": dict(alpha="0"), "cached_kd": dict(alpha="0.9", cache=str(work / "cache.zarr")),
             f"cached_kd_views{views}": dict(alpha="0.9", cache=str(work / "cache-views.zarr")),
             "online_kd_resnet50": dict(alpha="0.9", teacher_online="resnet50",
                                        teacher_checkpoint=str(teachers["resnet50"])),
             f"online_kd_{student}": dict(alpha="0.9", teacher_online=student,
                                          teacher_checkpoint=str(teachers[student])),
             "ce_ffcv": dict(alpha="0", data_path="ffcv")}
    summaries, runs = {}, {mode: [] for mode in modes}
    for r in range(args.rounds or (1 if args.quick else 2)):  # interleaved: drifting clocks hit every mode alike
        for mode, options in modes.items():
            print(f"--- {mode} (round {r + 1})", flush=True)
            summaries[mode] = train(TrainConfig(out=str(work / mode), **base, **options))
            runs[mode].append(summaries[mode]["images_per_sec"])
    speed = {mode: max(v) for mode, v in runs.items()}
    syncs = {mode: sync_count(TrainConfig(out=str(work / f"sync-{mode}"), **base, **modes[mode]), dev)
             for mode in ("ce", "cached_kd")}
    ring = ring_check(info, dev, batch, args.workers)
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
              "online_resnet50_of_attainable": speed["cached_kd"] / speed["online_kd_resnet50"] / attainable,
              "resident_over_ffcv": speed["ce"] / speed["ce_ffcv"],
              f"cached_over_online_{student}": speed["cached_kd"] / speed[f"online_kd_{student}"],
              "dump_over_bare": dumped / bare, "trainer_over_bound": speed["ce"] / a,
              "views_over_cached": speed[f"cached_kd_views{views}"] / speed["cached_kd"]}
    result = {"benchmark": "gpu", "machine": machine(dev), "device": str(dev), "torch": torch.__version__,
              "python": platform.python_version(), "quick": args.quick, "student": student, "data": str(beton),
              "samples": info.size, "batch_size": batch, "epochs": epochs,
              "bound_images_per_sec": a, "resnet50_forward_images_per_sec": r50,
              "attainable_cached_over_online_resnet50": attainable, "images_per_sec": speed, "runs": runs,
              "syncs_per_5_steps": syncs, "ring": ring, "bare_samples_per_sec": bare,
              "dump_samples_per_sec": dumped, "first_dump_samples_per_sec": first_dump, "views": views,
              "dump_views_samples_per_sec": dumped_views,
              "ratios": ratios, "targets": TARGETS,
              "met": {k: ratios[k] >= t for k, t in TARGETS.items()},
              "accuracy": accuracy}
    print(f"\n(a) bound {a:9.0f} img/s; (h) resnet50 forward {r50:9.0f} img/s")
    for mode, ips in speed.items():
        print(f"    {mode:24s} {ips:9.0f} img/s")
    print(f"(e) dump {dumped:.0f} samples/s vs bare {bare:.0f} (first dump of the process: {first_dump:.0f}); "
          f"with {views} stored views {dumped_views:.0f}")
    print(f"(f) test accuracy {accuracy['test_acc']:.4f}: {accuracy['arch']}, {accuracy['epochs']} CE epochs on "
          f"{accuracy['samples']} samples of {accuracy['data']}")
    print(f"    cached / online resnet50 {ratios['cached_over_online_resnet50']:.2f}x, attainable {attainable:.2f}x")
    print(f"    resident / FFCV path (CE) {ratios['resident_over_ffcv']:.3f}")
    print(f"(i) host syncs in 5 steps: {syncs}  (target 0)")
    print(f"(j) ring check: {ring['torn']} torn of {ring['batches']} batches  (target 0)")
    for key, target in TARGETS.items():
        print(f"    {key:30s} {ratios[key]:7.3f}  target >= {target}  {'met' if result['met'][key] else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
