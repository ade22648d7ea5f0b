"""The lean distillation trainer: one student (or teacher) on a pruned subset of a beton.

Teacher knowledge comes from the logit cache: the selected rows are read once into a device tensor
and looked up by each batch's sample indices, so a training step never runs a teacher nor reads the
store. `teacher_online` runs a teacher in the loop instead, as the baseline the cache must beat.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import __version__
from .beton import dataset_info, image_size
from .device import init_distributed, resolve_device
from .distill import auto_alpha, kd_loss
from .errors import UserError
from .files import write_json
from .loader import Batches
from .models import build_model, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    data: str
    out: str
    test: str | None = None
    arch: str = "resnet20"
    cache: str | None = None
    store: str | None = None            # where selection scores come from (default: the cache)
    fraction: float = 1.0
    method: str = "random"
    keep: str = "hard"
    class_balanced: bool = False
    indices: str | None = None          # an explicit selection (kdcache select --out), instead of method
    alpha: str = "auto"                 # a number in [0, 1] or "auto"
    temperature: float = 4.0
    epochs: int = 200
    steps: int | None = None            # fixed optimisation steps (equal-compute comparisons)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.02                # fraction of all steps spent warming up linearly
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: str = "bf16"                   # autocast dtype on CUDA: bf16, fp16 or off (CPU: always off)
    compile: bool = False
    workers: int = -1
    eval_every: int = 1
    teacher_online: str | None = None
    teacher_checkpoint: str | None = None
    record_dynamics: bool = False
    dynamics_store: str | None = None
    resume: bool = False


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Teacher:
    """Teacher logits for a batch: looked up in the cached rows, or computed by a model online."""

    def __init__(self, cfg: TrainConfig, info: dict, indices: np.ndarray, device: torch.device):
        self.model = None
        if cfg.teacher_online:
            self.model, meta = load_checkpoint(cfg.teacher_checkpoint, device)
            if meta["arch"] != cfg.teacher_online:
                raise UserError(f"--teacher-checkpoint holds a {meta['arch']}, not {cfg.teacher_online}")
            if meta["num_classes"] != info["num_classes"]:
                raise UserError(f"the teacher predicts {meta['num_classes']} classes, "
                                f"the dataset has {info['num_classes']}")
            self.model = self.model.to(memory_format=torch.channels_last)
            return
        from .store import LogitCache
        cache = LogitCache(cfg.cache, info)
        if cache.num_classes != info["num_classes"]:
            raise UserError(f"cache {cfg.cache} has {cache.num_classes} classes, "
                            f"the dataset has {info['num_classes']}")
        self.bytes_per_sample = cache.bytes_per_sample
        # Only the selected rows, once; then a batch is one gather on the device.
        self.rows = torch.from_numpy(cache.logits(indices)).to(device)
        self.position = torch.full((info["size"],), -1, dtype=torch.long)
        self.position[torch.from_numpy(indices)] = torch.arange(len(indices))
        self.position = self.position.to(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.model is not None:
            return self.model(x).float()
        return self.rows[self.position[index]]


def _validate(cfg: TrainConfig) -> tuple[dict, dict, float | None]:
    """Check every input before any training starts; return train info, test info, numeric alpha."""
    if not 0 < cfg.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.alpha != "auto":
        try:
            alpha = float(cfg.alpha)
        except ValueError:
            raise UserError(f"--alpha must be a number in [0, 1] or 'auto', got {cfg.alpha!r}")
        if not 0 <= alpha <= 1:
            raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    else:
        alpha = None
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError("--steps must be at least 1")
    info = dataset_info(cfg.data)
    test_path = cfg.test or str(Path(cfg.data).with_name("test.beton"))
    if not Path(test_path).is_file():
        raise UserError(f"test set not found: {test_path} (pass --test)")
    test_info = dataset_info(test_path)
    if test_info["fingerprint"] != info["fingerprint"]:
        raise UserError(f"{test_path} belongs to another dataset than {cfg.data}")
    if (alpha is None or alpha > 0) and not (cfg.cache or cfg.teacher_online):
        raise UserError(f"alpha {cfg.alpha} needs a teacher: pass --cache (or --teacher-online), or --alpha 0")
    if cfg.teacher_online and not cfg.teacher_checkpoint:
        raise UserError("--teacher-online needs --teacher-checkpoint")
    if cfg.teacher_online and cfg.cache:
        raise UserError("give either --cache or --teacher-online, not both")
    if cfg.amp not in ("bf16", "fp16", "off"):
        raise UserError(f"--amp must be bf16, fp16 or off, got {cfg.amp}")
    return info, test_info, alpha


def _select(cfg: TrainConfig, info: dict) -> tuple[np.ndarray, dict]:
    if cfg.indices:
        try:
            indices = np.unique(np.load(cfg.indices).astype(np.int64))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read indices from {cfg.indices}: {e}")
        if len(indices) == 0 or indices[0] < 0 or indices[-1] >= info["size"]:
            raise UserError(f"{cfg.indices} holds indices outside 0..{info['size'] - 1} (or none)")
        return indices, {"method": "file", "source": cfg.indices}
    from .selection import choose_subset
    return choose_subset(info, cfg.method, cfg.fraction, store=cfg.store or cfg.cache, keep=cfg.keep,
                         class_balanced=cfg.class_balanced, seed=cfg.seed)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, amp: torch.dtype | None) -> tuple[float, float]:
    """Test loss and accuracy over every sample of `batches`."""
    model.eval()
    loss = correct = count = 0
    with torch.inference_mode(), torch.autocast(batches.device.type, amp, enabled=amp is not None):
        for x, y, _ in batches:
            logits = model(x).float()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    return loss / count, correct / count


def lr_at(step: int, total: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero, per step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig) -> dict:
    """Train per `cfg`, writing config.json, metrics.jsonl, indices.npy, model.pt and summary.json
    into cfg.out; return the summary."""
    from tqdm import tqdm

    info, test_info, alpha = _validate(cfg)
    out = Path(cfg.out)
    if cfg.resume and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())  # finished already
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    owns_group = init_distributed(device)
    rank, world = _rank(), (dist.get_world_size() if dist.is_initialized() else 1)
    indices, selection = _select(cfg, info)
    fraction = len(indices) / info["size"]
    if alpha is None:
        alpha = auto_alpha(fraction)
    teacher = Teacher(cfg, info, indices, device) if alpha > 0 else None
    batch_size = min(cfg.batch_size, len(indices) // world)
    if batch_size < 2:
        raise UserError(f"{len(indices)} selected samples are too few to train on {world} process(es)")

    torch.manual_seed(cfg.seed)
    size = image_size(info)
    model = build_model(cfg.arch, info["num_classes"], size).to(device, memory_format=torch.channels_last)
    train_batches = Batches(info, batch_size=batch_size, train=True, augment=cfg.augment, device=device,
                            indices=indices, seed=cfg.seed, distributed=world > 1, num_workers=cfg.workers)
    test_batches = Batches(test_info, batch_size=512, train=False, device=device, num_workers=cfg.workers)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = int(cfg.warmup * total_steps)

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    start_epoch, step, elapsed = 0, 0, 0.0
    ckpt_path = out / "last.pt"
    selection_hash = hashlib.sha256(indices.tobytes()).hexdigest()
    config = {**dataclasses.asdict(cfg), "alpha_resolved": alpha, "fraction_kept": fraction,
              "num_selected": len(indices), "batch_size_used": batch_size, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "epochs_run": epochs, "world_size": world, "device": str(device),
              "dataset_fingerprint": info["fingerprint"], "train_fingerprint": info["split_fingerprint"],
              "cache_fingerprint": None, "selection": selection, "kdcache_version": __version__,
              "torch_version": torch.__version__, "command": shlex.join(sys.argv)}
    if cfg.cache:
        from .store import open_store
        config["cache_fingerprint"] = open_store(cfg.cache).attrs.get("fingerprint")
    if cfg.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["selection_hash"] != selection_hash or state["total_steps"] != total_steps:
            raise UserError(f"{out} holds a run with another selection or schedule; resume it with its own options")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, elapsed = state["epoch"], state["step"], state["elapsed"]
        train_batches.loader.next_epoch = start_epoch  # FFCV seeds each epoch's order with seed + epoch
        if rank == 0:  # drop metric lines written after the checkpoint
            lines = (out / "metrics.jsonl").read_text().splitlines()[:start_epoch]
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    elif rank == 0:
        (out / "metrics.jsonl").write_text("")
        (out / "summary.json").unlink(missing_ok=True)
    if rank == 0:
        write_json(out / "config.json", config)
        np.save(out / "indices.npy", indices)

    recorder = None
    if cfg.record_dynamics:
        from .dynamics import DynamicsRecorder
        recorder = DynamicsRecorder(cfg.dynamics_store or cfg.cache or str(out / "dynamics.zarr"), info, epochs,
                                    run=f"seed{cfg.seed}", device=device, resume=start_epoch > 0)

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    test_loss = test_acc = None
    for epoch in range(start_epoch, epochs):
        net.train()
        sums = torch.zeros(4, device=device)  # loss, ce, kl, correct (summed over samples)
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(train_batches, desc=f"epoch {epoch + 1}/{epochs}", disable=rank != 0, leave=False,
                   mininterval=1.0, dynamic_ncols=True)
        for x, y, index in bar:
            if step >= total_steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr)
            with torch.autocast(device.type, amp, enabled=amp is not None):
                target = teacher(x, index) if teacher is not None else None
                logits = net(x)
            loss, ce, kl = kd_loss(logits, target, y, alpha, cfg.temperature, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if recorder is not None:
                recorder.update(index, logits.detach(), y)
            n = len(y)
            sums += torch.stack([loss.detach() * n, ce.detach() * n, kl.detach() * n,
                                 (logits.detach().argmax(1) == y).sum()])
            seen += n
            step += 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sums[0].item() / seen:.3f}",
                                img_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(sums)
            seen_t = torch.tensor([seen], device=device)
            dist.all_reduce(seen_t)
            seen = int(seen_t.item())
        else:
            seen = max(seen, 1)
        if recorder is not None:
            recorder.end_epoch(epoch)
        elapsed += train_time
        last = epoch == epochs - 1
        evaluated = rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or last)
        if evaluated:
            test_loss, test_acc = evaluate(model, test_batches, amp)
        row = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"],
               "train_loss": sums[0].item() / seen, "train_ce": sums[1].item() / seen,
               "train_kl": sums[2].item() / seen, "train_acc": sums[3].item() / seen,
               "test_loss": test_loss if evaluated else None, "test_acc": test_acc if evaluated else None,
               "images_per_sec": seen / train_time, "elapsed": elapsed}
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                        "epoch": epoch + 1, "step": step, "elapsed": elapsed, "total_steps": total_steps,
                        "selection_hash": selection_hash}, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
            print(f"epoch {epoch + 1}/{epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                  f"test acc {f'{test_acc:.4f}' if evaluated else '-'}  "
                  f"{row['images_per_sec']:.0f} img/s", flush=True)
            if os.environ.get("KDCACHE_DIE_AFTER_EPOCH") == str(epoch + 1):  # test hook: a hard crash
                os.kill(os.getpid(), signal.SIGKILL)

    if recorder is not None:
        recorder.finish()
    summary = {}
    if rank == 0:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["images_per_sec"] for r in rows[1:]] or [rows[-1]["images_per_sec"]]  # epoch 1 JIT-compiles
        summary = {"test_acc": test_acc, "test_loss": test_loss,
                   "best_test_acc": max(r["test_acc"] for r in rows if r["test_acc"] is not None),
                   "train_acc": rows[-1]["train_acc"], "epochs": epochs, "steps": step, "alpha": alpha,
                   "fraction": fraction, "num_selected": len(indices), "images_per_sec": float(np.median(speeds)),
                   "train_seconds": elapsed, "arch": cfg.arch, "cache_bytes_per_sample":
                   getattr(teacher, "bytes_per_sample", None)}
        save_checkpoint(out / "model.pt", model, arch=cfg.arch, num_classes=info["num_classes"], image_size=size,
                        test_acc=test_acc, dataset_fingerprint=info["fingerprint"], config=config)
        write_json(out / "summary.json", summary)  # last: its presence marks a finished run
        ckpt_path.unlink(missing_ok=True)
    if owns_group:
        dist.barrier()
        dist.destroy_process_group()
    return summary

