"""The lean distillation trainer: one student (or teacher) on a pruned subset of a beton.

Teacher knowledge comes from the logit cache: the selected rows are read once into a device tensor
and looked up by each batch's sample indices, so a training step never runs a teacher nor reads the
store. `teacher_online` runs a teacher in the loop instead, as the baseline the cache must beat.

`train(cfg)` validates the configuration, joins torchrun's process group if there is one, and hands
the rest to a `Trainer`, whose construction names each step of setting up a run and whose `fit` is
the epoch loop.
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
from .beton import DatasetInfo
from .config import DEFAULT_TEMPERATURE, WARMUP_FLOOR, TrainConfig
from .crops import view_recipe
from .device import init_distributed, rank, resolve_device, world_size
from .distill import auto_alpha, autocast, kd_step
from .errors import UserError
from .evaluation import evaluate, recalibrate_bn
from .files import atomic, save_npy, write_json, write_lines
from .loader import Batches
from .models import build_model, save_checkpoint
from .preflight import select_subset, validate
from .resident import ResidentBatches, make_batches
from .run_folder import CHECKPOINT, METRICS, SUMMARY, check_out, read_metrics
from .teachers import CachedTeacher, OnlineTeacher, make_teacher

# What training computes, beyond its options: bump it with any change that alters results (sweeps hash it,
# so that a study never mixes runs of two trainers). 2: augmentation drawn per sample on the device,
# BatchNorm statistics re-estimated before evaluation, a warm-up floor. 3: image folders' random-resized crops
# seeded and cut by FFCV's decoder from a per-epoch table; top-k and sampled caches' targets kept sparse on
# the device (K classes and values per sample, the KL from them and the tail's mass) instead of expanded to
# dense float32 rows (the same loss to float rounding; full-logit caches' numbers unchanged). 4: BatchNorm
# statistics re-estimated over augmented training batches (were clean ones).
TRAINER_REVISION = 4
DIE_AFTER_ENV = "KDCACHE_DIE_AFTER_EPOCH"  # tests: SIGKILL after epoch N ("N") or between its metrics line
                                           # and its checkpoint ("N:metrics"): a hard crash at that point


def _crash_point(point: str) -> None:
    if os.environ.get(DIE_AFTER_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# --- the pieces of a run -------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        total = cfg.steps or cfg.epochs * steps_per_epoch
        warmup = max(int(cfg.warmup * total), min(WARMUP_FLOOR, total // 4)) if cfg.warmup > 0 else 0
        return cls(steps_per_epoch, total, math.ceil(total / steps_per_epoch), warmup)


def lr_at(step: int, total: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero, per step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; weight decay on weights, not on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def train(cfg: TrainConfig) -> dict:
    """Train per `cfg`, writing config.json, metrics.jsonl, indices.npy, model.pt and summary.json
    into cfg.out; return the summary (empty on ranks other than 0)."""
    info, test_info, alpha = validate(cfg)
    finished = check_out(cfg)
    if finished is not None:
        return finished
    device = resolve_device(cfg.device)
    owns_group = init_distributed(device)
    try:
        return Trainer(cfg, info, test_info, alpha, device).fit()
    finally:
        if owns_group:
            dist.destroy_process_group()


PROGRESS_EVERY = 20  # steps between progress-bar updates


class LateProgress:
    """The progress bar's numbers, one window late, so that the loop never waits for the device: each
    window's sums are copied to the host asynchronously and read at the next window, if the copy is done
    by then (an `.item()` would wait for every step queued so far, draining the pipeline)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: tuple[torch.Tensor, object, float] | None = None
        self.at = 0.0  # perf_counter when the sums last returned were taken

    def swap(self, sums: torch.Tensor) -> list[float] | None:
        """Snapshot `sums`; return the previous snapshot's values if ready, else None."""
        ready = None
        if self.pending is not None:
            host, event, at = self.pending
            if event is None or event.query():
                ready, self.at = host.tolist(), at
        if self.cuda:
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True).copy_(sums, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = sums.clone(), None
        self.pending = host, event, time.perf_counter()
        return ready


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'kdcache[tensorboard]'") from None
    return SummaryWriter


class Trainer:
    """One run. Built in pipeline order: the subset, the teacher, the student and its data, the
    schedule and optimiser, the run's record (or the checkpoint it resumes), the dynamics recorder."""

    def __init__(self, cfg: TrainConfig, info: DatasetInfo, test_info: DatasetInfo, alpha: float | None,
                 device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.out = Path(cfg.out)  # created only once every check has passed: a refused run leaves nothing
        self.rank, self.world = rank(), world_size()
        labels = self._labels()
        self.indices, self.selection = select_subset(cfg, info, labels)
        self.fraction = len(self.indices) / info.size
        self.alpha = auto_alpha(self.fraction) if alpha is None else alpha
        self.teacher = make_teacher(cfg, info, self.indices, device) if self.alpha > 0 else None
        own = self.teacher.temperature if self.teacher else None  # the one a top-k cache serves exactly
        self.temperature = cfg.temperature or own or DEFAULT_TEMPERATURE
        self.batch_size = self._batch_size()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.arch, info.num_classes, info.image_size).to(
            device, memory_format=torch.channels_last)
        self.views = self.teacher.views if self.teacher else None  # a multi-view cache's: shown exactly as stored
        self.train_batches = make_batches(info, path=cfg.data_path, batch_size=self.batch_size, train=True,
                                          augment=cfg.augment, device=device, indices=self.indices, seed=cfg.seed,
                                          views=self.views, distributed=self.world > 1, num_workers=cfg.workers)
        self.test_batches = make_batches(test_info, path=cfg.data_path, batch_size=cfg.eval_batch_size, train=False,
                                         device=device, num_workers=cfg.workers)
        self.bn_batches = self._bn_batches()
        self.schedule = Schedule.of(cfg, len(self.train_batches))
        self.opt = make_optimizer(self.model, cfg)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.config = self._describe()
        self.selection_hash = hashlib.sha256(self.indices.tobytes()).hexdigest()
        self.test_loss = self.test_acc = None
        self.start_epoch, self.step, self.elapsed = self._restore_or_start()
        self.recorder = self._recorder(labels)
        self.net = self._wrap(self.model)
        self.kd_step = torch.compile(kd_step) if cfg.compile else kd_step  # model and loss: one graph

    def _labels(self) -> np.ndarray | None:
        """The training labels, read once for whoever needs them (a selection, the dynamics recorder)."""
        if self.cfg.indices and not self.cfg.record_dynamics:
            return None
        from .beton import beton_labels
        return beton_labels(self.info.path)

    def _targets(self) -> str:
        """What the soft targets describe, for config.json."""
        if self.teacher is None:
            return "none (no teacher)"
        if isinstance(self.teacher, OnlineTeacher):
            return "the teacher run on the student's own view"
        if self.views is not None:
            return f"{self.views.shape[1]} stored views per sample ({view_recipe(self.info)}), replayed to the student"
        return "the clean image" + (" (the student sees augmented views of it)" if self.cfg.augment else "")

    def _batch_size(self) -> int:
        batch_size = min(self.cfg.batch_size, len(self.indices) // self.world)
        if batch_size < 2:
            raise UserError(f"{len(self.indices)} selected samples are too few to train on {self.world} process(es)")
        return batch_size

    def _bn_batches(self) -> Batches | ResidentBatches | None:
        """A fixed, seeded part of the training subset, augmented as training augments it, for re-estimating
        BatchNorm statistics (a loader of its own: drawing from the training loader would advance its epochs).
        Augmented, because the layers after each BatchNorm were trained on the statistics of augmented batches:
        statistics of clean images (black pad-4 borders absent) cost KD students on CIFAR-10 2% 4.4 points."""
        n = min(len(self.indices), self.cfg.bn_batches * self.batch_size)
        if n == 0:
            return None
        part = np.random.default_rng(self.cfg.seed).choice(self.indices, n, replace=False)
        return make_batches(self.info, path=self.cfg.data_path, batch_size=self.batch_size, train=False,
                            augment=self.cfg.augment, seed=self.cfg.seed, device=self.device, indices=part,
                            num_workers=self.cfg.workers)

    def _describe(self) -> dict:
        """What config.json records: the options as given plus everything they resolved to."""
        s, cfg = self.schedule, self.cfg
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp, "off")
        return {**dataclasses.asdict(cfg), "alpha_resolved": self.alpha, "temperature_resolved": self.temperature,
                "amp_resolved": amp, "teacher_targets": self._targets(),
                "fraction_kept": self.fraction,
                "num_selected": len(self.indices), "batch_size_used": self.batch_size,
                "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps, "epochs_run": s.epochs,
                "world_size": self.world, "device": str(self.device),
                "dataset_fingerprint": self.info.dataset_fingerprint, "train_fingerprint": self.info.train_fingerprint,
                "cache_fingerprint": self.info.train_fingerprint if isinstance(self.teacher, CachedTeacher) else None,
                "selection": self.selection, "kdcache_version": __version__, "torch_version": torch.__version__,
                "command": shlex.join(sys.argv)}

    def _restore_or_start(self) -> tuple[int, int, float]:
        """(first epoch, step, seconds trained): from the last checkpoint when resuming, else a new record."""
        ckpt, metrics = self.out / CHECKPOINT, self.out / METRICS
        start = (0, 0, 0.0)
        board = _summary_writer() if self.cfg.tensorboard and self.rank == 0 else None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume and ckpt.is_file():
            state = torch.load(ckpt, map_location=self.device, weights_only=False)
            if state["selection_hash"] != self.selection_hash or state["total_steps"] != self.schedule.total_steps:
                raise UserError(f"{self.out} holds a run with another selection or schedule; "
                                "resume it with its own options")
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.scaler.load_state_dict(state["scaler"])
            start = state["epoch"], state["step"], state["elapsed"]
            self.train_batches.next_epoch = start[0]  # each epoch's order is seeded with seed + epoch
            kept = read_metrics(self.out)[:start[0]]  # lines written after the checkpoint go
            # the last evaluation survives a resume (a run killed after its last epoch has no epoch left)
            last = next((row for row in reversed(kept) if row["test_acc"] is not None), None)
            if last is not None:
                self.test_loss, self.test_acc = last["test_loss"], last["test_acc"]
            if self.rank == 0:
                write_lines(metrics, [json.dumps(row) for row in kept])
                print(f"resuming {self.out} from epoch {start[0]} of {self.schedule.epochs}", flush=True)
        elif self.rank == 0:
            if self.cfg.resume:
                print(f"nothing to resume in {self.out}: starting a new run", flush=True)
            write_lines(metrics, [])
            for old in (SUMMARY, CHECKPOINT):
                (self.out / old).unlink(missing_ok=True)
        if self.rank == 0:
            write_json(self.out / "config.json", self.config)
            save_npy(self.out / "indices.npy", self.indices)
        # TensorBoard's copy of the metrics rows (step: the epoch); a resumed run drops the epochs it redoes
        self.board = board and board(str(self.out / "tensorboard"), purge_step=start[0] + 1 if start[0] else None)
        return start

    def _recorder(self, labels: np.ndarray | None):
        if not self.cfg.record_dynamics:
            return None
        from .dynamics import DynamicsRecorder
        return DynamicsRecorder(self.cfg.dynamics_store or str(self.out / "dynamics.zarr"), self.info,
                                self.schedule.epochs, run=f"seed{self.cfg.seed}", labels=labels,
                                el2n_early_fraction=self.cfg.el2n_early_fraction, aum_fraction=self.cfg.aum_fraction,
                                device=self.device, resume=self.start_epoch > 0)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    # --- the loop ---

    def fit(self) -> dict:
        for epoch in range(self.start_epoch, self.schedule.epochs):
            t0 = time.perf_counter()
            sums = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.end_epoch(epoch, sums, time.perf_counter() - t0)
        return self.finish()

    def train_epoch(self, epoch: int) -> torch.Tensor:
        """One pass over this process's share; returns the sums of loss, ce, kl, correct and samples."""
        from tqdm import tqdm

        self.net.train()
        sums = torch.zeros(5, device=self.device)
        t0 = time.perf_counter()
        bar = tqdm(self.train_batches, desc=f"epoch {epoch + 1}/{self.schedule.epochs}", disable=self.rank != 0,
                   leave=False, mininterval=1.0, dynamic_ncols=True)
        progress = LateProgress(self.device)
        for x, y, index, view in bar:
            if self.step >= self.schedule.total_steps:
                break
            sums += self.train_step(x, y, index, view)
            self.step += 1
            if self.step % PROGRESS_EVERY == 0 and self.rank == 0:
                done = progress.swap(sums)  # the previous window's sums, if the device has reached them
                if done is not None:
                    # refresh=False: shown at tqdm's next redraw (at most once a second), not written to the
                    # terminal every PROGRESS_EVERY steps
                    bar.set_postfix(loss=f"{done[0] / done[4]:.3f}",
                                    img_s=f"{done[4] * self.world / (progress.at - t0):.0f}", refresh=False)
        return sums

    def train_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                   view: torch.Tensor | None) -> torch.Tensor:
        s, cfg = self.schedule, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, s.total_steps, s.warmup_steps, cfg.lr)
        with autocast(self.device.type, self.amp):  # (B, C) logits, or a top-k / sampled cache's SparseTargets
            target = self.teacher(x, index, view) if self.teacher is not None else None
        loss, ce, kl, logits = self.kd_step(self.net, x, target, y, self.alpha, self.temperature,
                                            cfg.label_smoothing, self.amp)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        logits = logits.detach()
        if self.recorder is not None:
            self.recorder.update(index, logits, y)
        n = len(y)
        return torch.stack([loss.detach() * n, ce.detach() * n, kl.detach() * n,
                            (logits.argmax(1) == y).sum(), loss.new_full((), n)])  # no host-to-device copy

    def end_epoch(self, epoch: int, sums: torch.Tensor, train_time: float) -> None:
        """Gather the epoch's sums from every rank, evaluate, log a metrics row, checkpoint."""
        if self.world > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        seen = max(sums[4], 1)
        if self.recorder is not None:
            self.recorder.end_epoch(epoch)
        self.elapsed += train_time
        evaluated = self.rank == 0 and ((epoch + 1) % self.cfg.eval_every == 0 or epoch == self.schedule.epochs - 1)
        if evaluated:
            if self.bn_batches is not None:
                self.bn_batches.next_epoch = 0  # the same draws at every evaluation, and after a resume
                recalibrate_bn(self.model, self.bn_batches, self.amp)
            self.test_loss, self.test_acc = evaluate(self.model, self.test_batches, self.amp)
        if self.rank != 0:
            return
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.opt.param_groups[0]["lr"],
               "train_loss": sums[0] / seen, "train_ce": sums[1] / seen, "train_kl": sums[2] / seen,
               "train_acc": sums[3] / seen, "test_loss": self.test_loss if evaluated else None,
               "test_acc": self.test_acc if evaluated else None, "images_per_sec": sums[4] / train_time,
               # the first epoch of a process JIT-compiles FFCV's pipeline: its speed is not the steady one
               "first_in_process": epoch == self.start_epoch, "elapsed": self.elapsed}
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for name, value in row.items():
                if name not in ("epoch", "step", "first_in_process") and value is not None:
                    self.board.add_scalar(name, value, epoch + 1)
            self.board.flush()
        _crash_point(f"{epoch + 1}:metrics")
        self.checkpoint(epoch + 1)
        test = f"{self.test_acc:.4f}" if evaluated else "-"
        print(f"epoch {epoch + 1}/{self.schedule.epochs}  loss {row['train_loss']:.4f}  "
              f"train acc {row['train_acc']:.4f}  test acc {test}  {row['images_per_sec']:.0f} img/s", flush=True)
        _crash_point(str(epoch + 1))

    def checkpoint(self, epochs_done: int) -> None:
        with atomic(self.out / CHECKPOINT) as tmp:
            torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                        "scaler": self.scaler.state_dict(), "epoch": epochs_done, "step": self.step,
                        "elapsed": self.elapsed, "total_steps": self.schedule.total_steps,
                        "selection_hash": self.selection_hash}, tmp)

    def finish(self) -> dict:
        """Scores from the recorded dynamics; on rank 0 the model and, last, the summary."""
        if self.recorder is not None:
            self.recorder.finish()
        summary = {}
        if self.rank == 0:
            summary = self._summary(read_metrics(self.out))
            save_checkpoint(self.out / "model.pt", self.model, arch=self.cfg.arch, num_classes=self.info.num_classes,
                            image_size=self.info.image_size, test_acc=self.test_acc,
                            dataset_fingerprint=self.info.dataset_fingerprint, config=self.config)
            if self.board is not None:
                self.board.close()
            write_json(self.out / SUMMARY, summary)  # last: its presence marks a finished run
            (self.out / CHECKPOINT).unlink(missing_ok=True)
        if self.world > 1:
            dist.barrier()
        return summary

    def _summary(self, rows: list[dict]) -> dict:
        speeds = ([r["images_per_sec"] for r in rows if not r.get("first_in_process", r["epoch"] == 1)]
                  or [rows[-1]["images_per_sec"]])
        return {"test_acc": self.test_acc, "test_loss": self.test_loss,
                "best_test_acc": max(r["test_acc"] for r in rows if r["test_acc"] is not None),
                "train_acc": rows[-1]["train_acc"], "epochs": self.schedule.epochs, "steps": self.step,
                "alpha": self.alpha, "fraction": self.fraction, "num_selected": len(self.indices),
                "images_per_sec": float(np.median(speeds)), "train_seconds": self.elapsed, "arch": self.cfg.arch,
                "cache_bytes_per_sample": self.teacher.bytes_per_sample if self.teacher else None}
