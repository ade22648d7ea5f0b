"""Host overhead per training step, on CPU: `kdcache train`'s step (FFCV path and resident path)
against the bare forward + backward + SGD step of the same model on in-memory tensors.

On tiny inputs (8 px images, resnet8) compute almost vanishes, so what a trainer step costs beyond the
bare step is per-step host work: the loader, copies, small kernels, Python. That work is what capped
training on a GPU at 38-46k img/s whatever the model (issue 25); here it is measured without a GPU.
Each trainer step is timed through the real epoch loop (`Trainer.train_epoch`: batches, teacher rows,
the step, the progress bar), after one untimed epoch; modes run interleaved over `--rounds` and the
median counts. Goal: overhead_ratio (resident step / bare step) at most 1.25.

    python benchmarks/bench_host.py                       # batch 16 and 128, ~1 min
    python benchmarks/bench_host.py --batch-sizes 128 --rounds 2

Writes benchmarks/results/host.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time

import torch
import torch.nn.functional as F
from common import RESULTS, machine

from kdcache.beton import convert
from kdcache.models import build_model
from kdcache.sources import make_synthetic
from kdcache.train import TrainConfig, Trainer, make_optimizer, validate

GOAL = 1.25  # resident step / bare step


def data(samples: int, size: int):
    out = RESULTS / "data" / f"synthetic-{samples}-{size}px"
    if not (out / "manifest.json").exists():
        convert(make_synthetic(num_train=samples, num_test=100, num_classes=10, image_size=size), out)
    return out / "train.beton"


def bare_epoch_us(arch: str, samples: int, size: int, batch: int) -> callable:
    """A function timing one epoch of the bare step (microseconds per step): in-memory channels-last
    tensors, forward, cross-entropy, backward, SGD, nothing else."""
    torch.manual_seed(0)
    model = build_model(arch, 10, size).to(memory_format=torch.channels_last).train()
    opt = make_optimizer(model, TrainConfig(data="", out=""))
    xs = [torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
          for _ in range(samples // batch)]
    ys = [torch.randint(0, 10, (batch,)) for _ in xs]

    def epoch() -> float:
        start = time.perf_counter()
        for x, y in zip(xs, ys):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / len(xs) * 1e6
    return epoch


def trainer_epoch_us(beton, arch: str, batch: int, path: str, work, workers: int) -> callable:
    """A function timing one epoch of `kdcache train`'s loop (microseconds per step) on `path`'s batches."""
    cfg = TrainConfig(data=str(beton), out=str(work / f"{path}-{batch}"), arch=arch, fraction=1.0, alpha="0",
                      epochs=10 ** 6, batch_size=batch, augment=False, bn_batches=0, device="cpu",
                      workers=workers, data_path=path, overwrite=True)
    info, test_info, alpha = validate(cfg)
    trainer = Trainer(cfg, info, test_info, alpha, torch.device("cpu"))
    epoch = iter(range(10 ** 6))

    def run() -> float:
        steps = trainer.step
        start = time.perf_counter()
        trainer.train_epoch(next(epoch))
        return (time.perf_counter() - start) / (trainer.step - steps) * 1e6
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed epochs of each mode; the median counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the least noise on a shared machine)")
    p.add_argument("--workers", type=int, default=1, help="FFCV loader threads of the FFCV path")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    beton = data(args.samples, args.image_size)
    work = RESULTS / "bench_host"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    by_batch = {}
    for batch in args.batch_sizes:
        modes = {"bare": bare_epoch_us(args.arch, args.samples, args.image_size, batch),
                 "ffcv": trainer_epoch_us(beton, args.arch, batch, "ffcv", work, args.workers),
                 "resident": trainer_epoch_us(beton, args.arch, batch, "resident", work, args.workers)}
        for run in modes.values():
            run()  # untimed: FFCV compiles its pipeline, allocators warm up
        times = {mode: [] for mode in modes}
        for _ in range(args.rounds):  # interleaved: drifting load from other work hits every mode alike
            for mode, run in modes.items():
                times[mode].append(run())
        us = {mode: statistics.median(t) for mode, t in times.items()}
        by_batch[str(batch)] = {
            "us_per_step": us, "runs_us": times,
            "images_per_sec": {mode: batch / t * 1e6 for mode, t in us.items()},
            "overhead_ratio": us["resident"] / us["bare"], "ffcv_ratio": us["ffcv"] / us["bare"],
            "host_us_per_step": {"resident": us["resident"] - us["bare"], "ffcv": us["ffcv"] - us["bare"]}}
    worst = max(r["overhead_ratio"] for r in by_batch.values())
    result = {"benchmark": "host", "machine": machine(torch.device("cpu")), "torch": torch.__version__,
              "python": platform.python_version(), "samples": args.samples, "image_size": args.image_size,
              "arch": args.arch, "threads": args.threads, "workers": args.workers, "rounds": args.rounds,
              "by_batch": by_batch, "overhead_ratio": worst, "goal": GOAL, "met": worst <= GOAL}
    print(f"\n{args.arch}, {args.samples} synthetic {args.image_size} px images, {machine(torch.device('cpu'))}")
    print(f"  {'batch':>5s} {'bare us':>9s} {'resident':>9s} {'ffcv':>9s}  resident/bare  ffcv/bare")
    for batch, r in by_batch.items():
        u = r["us_per_step"]
        print(f"  {batch:>5s} {u['bare']:9.0f} {u['resident']:9.0f} {u['ffcv']:9.0f}  {r['overhead_ratio']:13.2f}  "
              f"{r['ffcv_ratio']:9.2f}")
    print(f"  overhead_ratio (worst batch) {worst:.2f}: goal <= {GOAL} ({'met' if result['met'] else 'NOT met'})")
    out = RESULTS / "host.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
