"""Training throughput: CE only, cached KD, and online KD with a large and a small teacher.

All four runs use the real trainer (`kdcache.train.train`) on the same data, subset, student, batch size
and device, in one process; each reports the median images/s over its epochs after the first (FFCV
compiles its pipeline in the first); the modes run interleaved `--repeats` times and the best counts.
The teacher's own forward throughput is timed on the same batches.
Targets: cached KD >= 0.97 x CE-only; cached KD faster than online KD by at least the teacher's share of
the online step, i.e. 1 - online/cached >= teacher time / online step time.

    python benchmarks/bench_train.py                 # CIFAR-10 if ../shared has it, else synthetic
    python benchmarks/bench_train.py --samples 512 --epochs 3 --big-teacher resnet56   # a quick look

Writes benchmarks/results/bench_train.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time

import numpy as np
import torch
from common import RESULTS, default_data, machine

from kdcache.beton import dataset_info
from kdcache.device import resolve_device
from kdcache.dump import dump
from kdcache.loader import Batches
from kdcache.models import build_model, save_checkpoint
from kdcache.train import TrainConfig, train


def teacher_throughput(name: str, info: dict, indices: np.ndarray, dev: torch.device, batch_size: int) -> float:
    """Images/s of the teacher's forward pass alone (no grad, channels-last, autocast on GPU)."""
    torch.manual_seed(0)
    model = build_model(name, info.num_classes, info.image_size).to(dev, memory_format=torch.channels_last)
    model.eval()
    batches = Batches(info, batch_size=batch_size, train=True, device=dev, indices=indices, num_workers=-1)
    xs = [x for x, _, _, _ in batches]  # load first, so only the model is timed
    amp = dev.type == "cuda"
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
        model(xs[0])
        if amp:
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for x in xs:
            model(x)
        if amp:
            torch.cuda.synchronize(dev)
    return sum(len(x) for x in xs) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="train beton, or 'synthetic' (default: CIFAR-10 if present)")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--big-teacher", default="resnet50")
    p.add_argument("--small-teacher", default=None, help="default: the student's architecture")
    p.add_argument("--samples", type=int, default=2560, help="size of the random training subset")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each mode; the best counts")
    args = p.parse_args()

    dev = resolve_device(args.device)
    small = args.small_teacher or args.student
    beton = default_data(args.data, 20000)
    info = dataset_info(beton)
    n = min(args.samples, info.size)
    work = RESULTS / "bench_train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    indices = np.sort(np.random.default_rng(0).choice(info.size, n, replace=False))
    np.save(work / "indices.npy", indices)
    size = info.image_size
    for name in {args.big_teacher, small}:  # random-init teachers: throughput does not depend on weights
        torch.manual_seed(0)
        save_checkpoint(work / f"{name}.pt", build_model(name, info.num_classes, size), arch=name,
                        num_classes=info.num_classes, image_size=size)
    print(f"caching {small} logits for {info.size} samples ...", flush=True)
    dump(teacher=small, checkpoint=str(work / f"{small}.pt"), data=str(beton), out=str(work / "cache.zarr"),
         device=str(dev), progress=False)

    base = dict(data=str(beton), arch=args.student, indices=str(work / "indices.npy"), epochs=args.epochs,
                batch_size=args.batch_size, device=str(dev), eval_every=10**6, seed=0)
    modes = {
        "ce": dict(alpha="0"),
        "cached_kd": dict(alpha="0.9", cache=str(work / "cache.zarr")),
        "online_kd_big": dict(alpha="0.9", teacher_online=args.big_teacher,
                              teacher_checkpoint=str(work / f"{args.big_teacher}.pt")),
        "online_kd_small": dict(alpha="0.9", teacher_online=small, teacher_checkpoint=str(work / f"{small}.pt")),
    }
    runs = {mode: [] for mode in modes}
    for r in range(args.repeats):  # interleaved, so that drifting machine load hits every mode alike
        for mode, options in modes.items():
            print(f"--- {mode} (run {r + 1}/{args.repeats})", flush=True)
            summary = train(TrainConfig(out=str(work / f"{mode}-{r}"), **base, **options))
            runs[mode].append(summary["images_per_sec"])
    speed = {mode: max(v) for mode, v in runs.items()}
    teacher_ips = {t: teacher_throughput(t, info, indices, dev, args.batch_size) for t in {args.big_teacher, small}}

    def share(teacher: str, mode: str) -> dict:
        saving = 1 - speed[mode] / speed["cached_kd"]            # time cached KD saves per online step
        teacher_share = speed[mode] / teacher_ips[teacher]      # teacher forward time / online step time
        return {"teacher": teacher, "cached_over_online": speed["cached_kd"] / speed[mode],
                "saving": saving, "teacher_share": teacher_share, "met": saving >= 0.9 * teacher_share}

    result = {
        "benchmark": "train", "machine": machine(dev), "device": str(dev), "torch": torch.__version__,
        "python": platform.python_version(), "data": str(beton), "samples": n, "epochs": args.epochs,
        "batch_size": args.batch_size, "student": args.student, "images_per_sec": speed, "runs": runs,
        "teacher_forward_images_per_sec": teacher_ips,
        "cached_over_ce": speed["cached_kd"] / speed["ce"], "cached_over_ce_target": 0.97,
        "vs_online_big": share(args.big_teacher, "online_kd_big"),
        "vs_online_small": share(small, "online_kd_small"),
    }
    print(f"\n{args.student}, {n} samples, batch {args.batch_size}, {machine(dev)}")
    for mode, ips in speed.items():
        print(f"  {mode:16s} {ips:9.1f} img/s")
    print(f"  cached KD / CE only      {result['cached_over_ce']:.3f}  (target >= 0.97)")
    for key in ("vs_online_big", "vs_online_small"):
        r = result[key]
        print(f"  cached / online ({r['teacher']:9s}) {r['cached_over_online']:.2f}x: saves {r['saving']:.1%} "
              f"of the step; teacher share {r['teacher_share']:.1%} ({'met' if r['met'] else 'NOT met'})")
    out = RESULTS / "bench_train.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
