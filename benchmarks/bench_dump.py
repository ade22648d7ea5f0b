"""Dump throughput against bare teacher inference, in one run on the same data.

Bare inference is the dump's own loop without the store: the same FFCV loader, model, batch size,
inference_mode, channels-last and (on GPU) autocast. The dump is `kdcache.dump.dump` in full: scores,
host copies, chunk buffers, the background writer and the completion flags. Target: ratio >= 0.95.

    python benchmarks/bench_dump.py                      # CIFAR-10 if ../shared has it, else synthetic
    python benchmarks/bench_dump.py --data synthetic --synthetic-size 4096 --batch-size 128 --chunk-rows 512

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
from common import RESULTS, default_data, machine

from kdcache.beton import dataset_info
from kdcache.device import resolve_device
from kdcache.dump import dump
from kdcache.loader import Batches
from kdcache.models import build_model, save_checkpoint


def bare_inference(model, info: dict, dev: torch.device, batch_size: int, workers: int) -> float:
    """Samples per second of the teacher alone, fed by the same loader."""
    batches = Batches(info, batch_size=batch_size, train=False, device=dev, num_workers=workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for x, _, _, _ in batches:
            model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return info.size / (time.perf_counter() - start)


def full_dump(args, ckpt: Path, beton: Path, store: Path) -> float:
    start = time.perf_counter()
    dump(teacher=args.teacher, checkpoint=str(ckpt), data=str(beton), out=str(store), batch_size=args.batch_size,
         chunk_rows=args.chunk_rows, topk=args.topk, device=args.device, workers=args.workers, overwrite=True,
         progress=False)
    return dataset_info(beton).size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="train beton, or 'synthetic' (default: CIFAR-10 from ../shared if present, else synthetic)")
    p.add_argument("--synthetic-size", type=int, default=20000, help="training samples of the synthetic data")
    p.add_argument("--teacher", default=None,
                   help="model name, random init (default: resnet20 on CPU, resnet50 on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    args = p.parse_args()

    dev = resolve_device(args.device)
    args.teacher = args.teacher or ("resnet50" if dev.type == "cuda" else "resnet20")
    beton = default_data(args.data, args.synthetic_size)
    info = dataset_info(beton)
    work = RESULTS / "bench_dump"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, store = work / "teacher.pt", work / "cache.zarr"
    torch.manual_seed(0)
    model = build_model(args.teacher, info.num_classes, info.image_size)
    save_checkpoint(ckpt, model, arch=args.teacher, num_classes=info.num_classes, image_size=info.image_size)
    model = model.to(dev, memory_format=torch.channels_last).eval()

    print(f"{args.teacher} on {info.size} samples of {beton} ({info.image_size} px), batch {args.batch_size}, "
          f"{machine(dev)}")
    bare_inference(model, info, dev, args.batch_size, args.workers)  # warm-up: FFCV compiles its pipeline
    bare, dumped = [], []
    for _ in range(args.repeats):  # interleaved, so that drifting machine load hits both alike
        bare.append(bare_inference(model, info, dev, args.batch_size, args.workers))
        dumped.append(full_dump(args, ckpt, beton, store))
        print(f"  bare {bare[-1]:9.1f} samples/s   dump {dumped[-1]:9.1f} samples/s")
    ratio = max(dumped) / max(bare)
    print(f"bare inference {max(bare):.1f} samples/s, dump {max(dumped):.1f} samples/s, "
          f"ratio {ratio:.3f} (target >= 0.95)")

    result = {"benchmark": "dump", "machine": machine(dev), "device": str(dev), "torch": torch.__version__,
              "python": platform.python_version(), "teacher": args.teacher, "data": str(beton),
              "num_samples": info.size, "image_size": info.image_size, "batch_size": args.batch_size,
              "chunk_rows": args.chunk_rows, "topk": args.topk or None, "workers": args.workers,
              "bare_samples_per_s": max(bare), "dump_samples_per_s": max(dumped), "ratio": ratio,
              "runs": {"bare": bare, "dump": dumped}}
    out = RESULTS / "bench_dump.json"
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(store, ignore_errors=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
