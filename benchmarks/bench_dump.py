"""The dump's cost against bare teacher inference, at two dataset sizes: its fixed cost and its per-sample rate.

Each size is a synthetic dataset (what `kdcache data synthetic` makes, 32 px). Bare inference is the dump's
own loop without the store: a new FFCV loader (as a dump builds one), the same model, batch size,
inference_mode, channels-last and (on GPU) autocast. The dump is `kdcache.dump.dump` in full: loading and
hashing the checkpoint, creating the store, scores, host copies, chunk buffers, the background writer, the
completion flags and the final attributes. Both are timed end to end, interleaved over --repeats (the
fastest run counts), and a line is fitted through the two sizes: seconds = fixed + samples x per-sample.

    per_sample_ratio = bare per-sample time / dump per-sample time     goal >= 0.97
    fixed_overhead_s = dump fixed - bare fixed                         what the dump adds once, whatever N

The dump's phases (`kdcache.dump.dump(timings=...)`: teacher, store, loader, pass, drain, finish) are
reported per size and fitted the same way. On CPU the default teacher is small (resnet8) and torch runs one
thread: the host's share of a dump shows, and another process on a shared machine disturbs it less.

    python benchmarks/bench_dump.py                                # 2,000 and 20,000 images, resnet8 on CPU
    python benchmarks/bench_dump.py --sizes 1024 4096 --batch-size 128 --chunk-rows 512 --repeats 1

Writes benchmarks/results/bench_dump.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import RESULTS, machine

from kdcache.beton import convert, dataset_info
from kdcache.device import resolve_device
from kdcache.dump import dump
from kdcache.loader import Batches
from kdcache.models import build_model, save_checkpoint
from kdcache.sources import make_synthetic

GOAL = 0.97  # the dump's per-sample rate / bare inference's


def synthetic(samples: int, size: int) -> Path:
    out = RESULTS / "data" / (f"synthetic-{samples}" if size == 32 else f"synthetic-{samples}-{size}px")
    if not (out / "manifest.json").exists():
        convert(make_synthetic(num_train=samples, num_test=100, num_classes=10, image_size=size), out)
    return out / "train.beton"


def bare_seconds(model, info, dev: torch.device, batch_size: int, workers: int) -> float:
    """Seconds of the teacher alone over every sample, fed by a new loader of the same kind."""
    start = time.perf_counter()
    batches = Batches(info, batch_size=batch_size, train=False, device=dev, num_workers=workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    with torch.inference_mode(), autocast:
        for x, _, _, _ in batches:
            model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def bare_inference(model, info, dev: torch.device, batch_size: int, workers: int) -> float:
    """Samples per second of the teacher alone, fed by the same loader."""
    return info.size / bare_seconds(model, info, dev, batch_size, workers)


def dump_times(args, ckpt: Path, beton: Path, store: Path) -> tuple[float, dict]:
    """Seconds of one full `kdcache dump` into a new store (as a first dump: the last one is deleted untimed),
    and its phases."""
    shutil.rmtree(store, ignore_errors=True)
    phases: dict = {}
    start = time.perf_counter()
    dump(teacher=args.teacher, checkpoint=str(ckpt), data=str(beton), out=str(store), batch_size=args.batch_size,
         chunk_rows=args.chunk_rows, topk=args.topk, device=args.device, workers=args.workers, overwrite=True,
         progress=False, timings=phases)
    return time.perf_counter() - start, phases


def fit(points: dict[int, float]) -> dict:
    """The line seconds = fixed + n x per-sample through two (n, seconds) points."""
    (n1, t1), (n2, t2) = sorted(points.items())
    slope = (t2 - t1) / (n2 - n1)
    return {"fixed_s": t1 - slope * n1, "per_sample_us": slope * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], help="samples of the two synthetic sets")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--teacher", default=None,
                   help="model name, random init (default: resnet8 on CPU, resnet50 on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each mode and size; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: least disturbed by others)")
    args = p.parse_args()
    if args.sizes[0] == args.sizes[1]:
        p.error("--sizes must differ: the fit needs two sizes")

    dev = resolve_device(args.device)
    args.teacher = args.teacher or ("resnet50" if dev.type == "cuda" else "resnet8")
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    betons = {n: synthetic(n, args.image_size) for n in sorted(args.sizes)}
    infos = {n: dataset_info(b) for n, b in betons.items()}
    work = RESULTS / "bench_dump"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, store = work / "teacher.pt", work / "cache.zarr"
    torch.manual_seed(0)
    model = build_model(args.teacher, 10, args.image_size)
    save_checkpoint(ckpt, model, arch=args.teacher, num_classes=10, image_size=args.image_size)
    model = model.to(dev, memory_format=torch.channels_last).eval()

    threads = f", {args.threads} torch thread(s)" if dev.type == "cpu" else ""
    print(f"{args.teacher}, synthetic {args.image_size} px sets of {' and '.join(f'{n:,}' for n in betons)} "
          f"samples, batch {args.batch_size}, {machine(dev)}{threads}")
    small = min(betons)
    bare_seconds(model, infos[small], dev, args.batch_size, args.workers)  # warm-up: FFCV compiles, allocators
    dump_times(args, ckpt, betons[small], store)
    runs = {n: {"bare": [], "dump": [], "phases": []} for n in betons}
    for _ in range(args.repeats):  # interleaved, so that drifting machine load hits every mode and size alike
        for n, beton in betons.items():
            runs[n]["bare"].append(bare_seconds(model, infos[n], dev, args.batch_size, args.workers))
            seconds, phases = dump_times(args, ckpt, beton, store)
            runs[n]["dump"].append(seconds)
            runs[n]["phases"].append(phases)
            print(f"  {n:>7,} samples: bare {runs[n]['bare'][-1]:7.2f} s   dump {seconds:7.2f} s   phases "
                  + " ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    by_size = {}
    for n, r in runs.items():
        fastest = min(range(len(r["dump"])), key=r["dump"].__getitem__)
        bare, dumped = min(r["bare"]), r["dump"][fastest]
        by_size[str(n)] = {"bare_s": bare, "dump_s": dumped, "ratio": bare / dumped,
                           "bare_samples_per_s": n / bare, "dump_samples_per_s": n / dumped,
                           "phases_s": r["phases"][fastest],
                           "runs_s": {"bare": r["bare"], "dump": r["dump"]}}
    lines = {mode: fit({n: by_size[str(n)][f"{mode}_s"] for n in betons}) for mode in ("bare", "dump")}
    phase_names = by_size[str(small)]["phases_s"]
    phase_fit = {name: fit({n: by_size[str(n)]["phases_s"].get(name, 0.0) for n in betons}) for name in phase_names}
    per_sample_ratio = lines["bare"]["per_sample_us"] / lines["dump"]["per_sample_us"]
    fixed_overhead = lines["dump"]["fixed_s"] - lines["bare"]["fixed_s"]
    large = str(max(betons))

    print(f"fit: bare {lines['bare']['fixed_s']:.2f} s + {lines['bare']['per_sample_us']:.1f} us/sample, "
          f"dump {lines['dump']['fixed_s']:.2f} s + {lines['dump']['per_sample_us']:.1f} us/sample")
    print("dump phases: " + ", ".join(f"{k} {v['fixed_s']:.3f} s + {v['per_sample_us']:.2f} us/sample"
                                      for k, v in phase_fit.items()))
    print(f"per-sample rate, dump / bare: {per_sample_ratio:.3f} (goal >= {GOAL}); the dump's fixed overhead "
          f"{fixed_overhead:.2f} s; at {int(large):,} samples dump / bare {by_size[large]['ratio']:.3f}")

    result = {"benchmark": "dump", "machine": machine(dev), "device": str(dev), "torch": torch.__version__,
              "python": platform.python_version(), "teacher": args.teacher, "image_size": args.image_size,
              "batch_size": args.batch_size, "chunk_rows": args.chunk_rows, "topk": args.topk or None,
              "workers": args.workers, "threads": args.threads if dev.type == "cpu" else None,
              "repeats": args.repeats, "by_size": by_size, "fit": lines,
              "phases_fit": phase_fit, "per_sample_ratio": per_sample_ratio, "fixed_overhead_s": fixed_overhead,
              "goal_per_sample_ratio": GOAL, "met": per_sample_ratio >= GOAL,
              # the largest size, end to end (fixed costs included): the summary's first dump row
              "num_samples": int(large), "bare_samples_per_s": by_size[large]["bare_samples_per_s"],
              "dump_samples_per_s": by_size[large]["dump_samples_per_s"], "ratio": by_size[large]["ratio"]}
    out = RESULTS / "bench_dump.json"
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(store, ignore_errors=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
