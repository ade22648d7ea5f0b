"""What a pruning study costs: N students trained (a) from one cache, the dump included, against (b) each
with an online teacher, on the same data. The cache pays for itself once enough students share one
teacher pass, which is what every study does (fractions x alphas x seeds).

Student costs are training seconds (the trainer's own clock: no start-up, no evaluation), on both
sides alike. The N students are the grid --fractions x --alphas x --seeds (3 x 2 x 2 = 12) of `--student` for
`--epochs` each, on random subsets of the training set. (a) is measured in full: the dump, then every
student from the cache. (b) is measured on one student per teacher (the smallest fraction) and scaled by
the images each other student trains on (online KD costs the same per image whatever the subset): a
resnet50 teacher runs ~55 img/s on this 2-core CPU, so timing all twelve would take hours. Likewise the
dump's time is measured on --dump-samples images and scaled to the whole training set. Target: (a) at
least 3x faster than (b) with resnet50 for N = 12. Break-even N: the number of students from which the
cache is cheaper.

    python benchmarks/bench_study.py                  # CIFAR-10 from ../shared, resnet8 students
    python benchmarks/bench_study.py --data synthetic --epochs 1 --dump-samples 256   # a quick look

Writes benchmarks/results/bench_study.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time

import torch
from common import RESULTS, beton_arrays, default_data, machine

from kdcache.beton import dataset_info
from kdcache.device import resolve_device
from kdcache.dump import dump
from kdcache.models import build_model, save_checkpoint
from kdcache.train import TrainConfig, train


def dump_seconds(teacher: str, ckpt, beton, work, samples: int, dev) -> float:
    """Seconds to dump the whole training set: timed on its first `samples` images, scaled by size."""
    from kdcache.beton import convert
    from kdcache.sources import Source, Split

    info = dataset_info(beton)
    n = min(samples, info.size)
    part = work / f"part-{n}"
    if not (part / "manifest.json").is_file():
        images, labels = beton_arrays(beton)
        split = Split(labels=labels[:n], images=images[:n])
        convert(Source("part", [str(c) for c in range(info.num_classes)], split, split), part)
    start = time.perf_counter()
    dump(teacher=teacher, checkpoint=str(ckpt), data=str(part / "train.beton"), out=str(work / f"part-{teacher}.zarr"),
         device=str(dev), overwrite=True, progress=False)
    return (time.perf_counter() - start) * info.size / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="train beton, or 'synthetic' (default: CIFAR-10 if present)")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teachers", default="resnet50,resnet8", help="online teachers to compare against")
    p.add_argument("--fractions", default="0.02,0.05,0.1")
    p.add_argument("--alphas", default="0.5,0.9")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dump-samples", type=int, default=2000, help="images the dump is timed on (then scaled)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    dev = resolve_device(args.device)
    beton = default_data(args.data, 20000)
    info = dataset_info(beton)
    work = RESULTS / "bench_study"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teachers = args.teachers.split(",")
    for name in teachers:  # random-init teachers: cost does not depend on the weights
        torch.manual_seed(0)
        save_checkpoint(work / f"{name}.pt", build_model(name, info.num_classes, info.image_size), arch=name,
                        num_classes=info.num_classes, image_size=info.image_size)
    grid = list(itertools.product(map(float, args.fractions.split(",")), args.alphas.split(","),
                                  map(int, args.seeds.split(","))))
    base = dict(data=str(beton), arch=args.student, epochs=args.epochs, batch_size=args.batch_size,
                device=str(dev), eval_every=10**6, overwrite=True)

    result = {"benchmark": "study", "machine": machine(dev), "students": len(grid), "student": args.student,
              "epochs": args.epochs, "grid": {"fractions": args.fractions, "alphas": args.alphas,
                                              "seeds": args.seeds}, "by_teacher": {}}
    for teacher in teachers:
        result["by_teacher"][teacher] = {"dump_seconds": dump_seconds(teacher, work / f"{teacher}.pt", beton, work,
                                                                      args.dump_samples, dev)}
    # a cached student reads numbers: its cost is the same whichever teacher wrote them, so one cache (of
    # the cheapest teacher) serves every student here
    cheapest = min(teachers, key=lambda t: result["by_teacher"][t]["dump_seconds"])
    cache = str(work / "cache.zarr")
    dump(teacher=cheapest, checkpoint=str(work / f"{cheapest}.pt"), data=str(beton), out=cache, device=str(dev),
         overwrite=True, progress=False)

    cached, images = [], []
    for f, alpha, seed in grid:  # training time proper (both sides alike: no start-up, no evaluation)
        s = train(TrainConfig(out=str(work / f"cached-{f}-{alpha}-{seed}"), fraction=f, alpha=alpha, seed=seed,
                              cache=cache, **base))
        cached.append(s["train_seconds"])
        images.append(s["num_selected"] * args.epochs)
    smallest = min(range(len(grid)), key=lambda i: images[i])
    f, alpha, seed = grid[smallest]
    for teacher in teachers:
        s = train(TrainConfig(out=str(work / f"online-{teacher}"), fraction=f, alpha=alpha, seed=seed,
                              teacher_online=teacher, teacher_checkpoint=str(work / f"{teacher}.pt"), **base))
        per_image = s["train_seconds"] / images[smallest]
        online = per_image * sum(images)
        r = result["by_teacher"][teacher]
        study_cached = r["dump_seconds"] + sum(cached)
        extra_per_student = (online - sum(cached)) / len(grid)  # what a student costs more online than cached
        r.update({"online_seconds_scaled": online, "online_seconds_per_image": per_image,
                  "cached_students_seconds": sum(cached), "cached_study_seconds": study_cached,
                  "speedup": online / study_cached,
                  "break_even_students": r["dump_seconds"] / extra_per_student if extra_per_student > 0 else None})
        print(f"{teacher:9s} cache: dump {r['dump_seconds']:7.0f} s + {len(grid)} students {sum(cached):6.0f} s = "
              f"{study_cached:7.0f} s   online: {online:7.0f} s (scaled from one student)   "
              f"{r['speedup']:.1f}x, break-even at {r['break_even_students'] or float('inf'):.1f} students", flush=True)
    result["target_speedup_resnet50"] = 3.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_study.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS / 'bench_study.json'}")


if __name__ == "__main__":
    main()
