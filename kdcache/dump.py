"""`kdcache dump`: run the teacher once over the training set and cache what every student needs.

The store is written in chunks of `chunk_rows` samples. A chunk's rows are buffered in memory, handed
to a writer thread when complete (so the teacher never waits on storage) and flagged in
`chunks_done` only after its data is written: a killed dump resumes at the first unflagged chunk.
Under torchrun, rank r dumps the chunks c with c % world_size == r.
"""
from __future__ import annotations

import os
import queue
import shlex
import signal
import sys
import threading
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import crops, store
from .augment import VIEW_RECIPE, apply_view, view_params
from .beton import CROP_RATIO, DatasetInfo, dataset_info
from .config import DumpConfig
from .device import init_distributed, rank, resolve_device, world_size
from .errors import UserError
from .files import now
from .loader import Batches
from .models import last_linear
from .scores import TEACHER_SCORES, teacher_scores
from .sparse import sample_targets

PROBS = "probs"  # a batch's tempered teacher probabilities, on their way to be sampled (not stored)

DIE_AFTER_ENV = "KDCACHE_DIE_AFTER_CHUNKS"  # tests: SIGKILL this process after that many chunks


def load_teacher(name: str, checkpoint: str | None, pretrained: bool, info: DatasetInfo,
                 device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The teacher in eval mode, channels-last, and what identifies its weights."""
    from .models import TIMM, build_model, load_teacher_checkpoint, sha256_file, with_own_preprocessing

    if bool(checkpoint) == bool(pretrained):
        raise UserError("pass exactly one of --checkpoint PATH and --pretrained")
    # the teacher's own preprocessing (a timm teacher's mean, std and input size), recorded in the store
    own = {"mean": list(info.mean), "std": list(info.std), "input_size": info.image_size}
    if checkpoint:
        model = load_teacher_checkpoint(checkpoint, name, info.num_classes, info.image_size, device,
                                        mean=info.mean, std=info.std)
        return model, {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
                       "teacher_preprocessing": getattr(model, "preprocessing", own)}
    model = build_model(name, info.num_classes, info.image_size, pretrained=True)
    if name.startswith(TIMM):
        model = with_own_preprocessing(model, name, info.mean, info.std, info.image_size)
        source = f"timm-pretrained:{name.removeprefix(TIMM)}"
    else:
        import torchvision
        source = f"torchvision:{torchvision.models.get_model_weights(name).DEFAULT}"
    preprocessing = getattr(model, "preprocessing", own)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, {"checkpoint": source, "checkpoint_sha256": None, "teacher_preprocessing": preprocessing}


# --- the store -------------------------------------------------------------------------------------

IDENTITY = (store.TRAIN_FINGERPRINT, "teacher", "checkpoint_sha256")
LAYOUT = ("num_samples", "num_classes", "chunk_rows", "topk", "temperature", "sample", "sample_seed", "views",
          "view_seed", "view_recipe")
ADDED_LATER = {"views": 1}  # layout attributes of stores made before they existed: what such a store holds
NAMES = {store.TRAIN_FINGERPRINT: "train fingerprint", "checkpoint_sha256": "checkpoint SHA-256",
         "views": "number of views"}


def _say(value) -> str:
    """An attribute value in the user's words: `none` rather than Python's None."""
    return "none" if value is None else str(value)


def prepare_store(url: str, attrs: dict, overwrite: bool) -> None:
    """Create the store, or check that the one at `url` is this dump's (to resume it)."""
    old = store.existing_store(url)
    if old is not None and not overwrite:
        have = old.attrs.asdict()
        if have.get(store.KIND) != store.LOGITS_KIND:
            raise UserError(f"{url} is not a teacher-logit cache; pass --overwrite to replace it")
        for key in IDENTITY + LAYOUT:
            value = have.get(key, ADDED_LATER.get(key))
            if value != attrs[key]:
                what = NAMES.get(key, key.replace("_", " "))
                raise UserError(f"store {url} has another {what} ({_say(value)}, this dump: "
                                f"{_say(attrs[key])}); pass --overwrite to start over")
        group = store.open_store(url, "r+")
        if store.CHUNKS_DONE in group:  # created in full earlier: resume
            return
    else:  # attributes with the group, in one write: there is never a store without them
        group = store.create_store(url, attrs, overwrite=old is not None)
    store.create_logit_arrays(group, num_samples=attrs["num_samples"], num_classes=attrs["num_classes"],
                              chunk_rows=attrs["chunk_rows"], topk=attrs["topk"], sample=attrs["sample"],
                              scores=TEACHER_SCORES, views=attrs["views"],
                              view_layout=(3, "int8") if attrs["view_recipe"] in (None, VIEW_RECIPE) else
                              (crops.PARAMS, "uint16"))


class _Writer(threading.Thread):
    """Writes finished chunks in the background; a bounded queue keeps memory in check."""

    def __init__(self, group, die_after: int | None):
        super().__init__(daemon=True)
        self.group, self.die_after, self.done = group, die_after, 0
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(chunk)
                except Exception as e:  # noqa: BLE001  (re-raised in the main thread)
                    self.error = e

    def write(self, chunk: dict) -> None:
        c, rows = chunk["chunk"], slice(chunk["start"], chunk["stop"])
        for name, values in chunk["arrays"].items():
            self.group[name][rows] = values
        self.group[store.CHUNK_CORRECT][c] = chunk["correct"]
        self.group[store.CHUNKS_DONE][c] = 1  # last: the chunk's data is on storage
        self.done += 1
        if self.die_after is not None and self.done >= self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def put(self, chunk: dict) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.queue.put(chunk, timeout=0.5)
            except queue.Full:
                continue

    def close(self) -> None:
        self.queue.put(None)
        self.join()


class _Chunks:
    """Row buffers of the chunks being filled; hands each to the writer once all its rows are in."""

    def __init__(self, num_samples: int, chunk_rows: int, writer: _Writer):
        self.n, self.rows, self.writer = num_samples, chunk_rows, writer
        self.open: dict[int, dict] = {}

    def add(self, index: np.ndarray, arrays: dict[str, np.ndarray], correct: np.ndarray) -> None:
        chunk_of = index // self.rows
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            buf = self.open.get(c)
            if buf is None:
                start, stop = int(c) * self.rows, min((int(c) + 1) * self.rows, self.n)
                buf = self.open[c] = {"chunk": int(c), "start": start, "stop": stop, "filled": 0, "correct": 0,
                                      "arrays": {k: np.empty((stop - start,) + v.shape[1:], v.dtype)
                                                 for k, v in arrays.items()}}
            at = index[sel] - buf["start"]
            for k, v in arrays.items():
                buf["arrays"][k][at] = v[sel]
            buf["filled"] += len(at)
            buf["correct"] += int(correct[sel].sum())
            if buf["filled"] == buf["stop"] - buf["start"]:
                self.writer.put(self.open.pop(c))


# --- the pass over the data ------------------------------------------------------------------------

def _batch_outputs(model, hook: dict, x: torch.Tensor, y: torch.Tensor, targets: dict,
                   has_bias: bool, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores and accuracy from the clean image `x`; targets from it too, or, given stored `views`
    (each a batch of one view of every sample), from those: (B, V, ...)."""
    logits = model(x).float()
    scores = teacher_scores(logits, y, hook["features"], has_bias)
    out = {f"{store.SCORES}/{name}": scores[name] for name in TEACHER_SCORES}
    out["correct"] = logits.argmax(1) == y
    if views:
        logits = torch.stack([model(v).float() for v in views], dim=1)
    out["finite"] = torch.isfinite(logits).flatten(1).all(1)
    topk, temperature = targets["topk"], targets["temperature"]
    if targets["sample"]:
        out[PROBS] = F.softmax(logits / temperature, dim=-1)  # drawn from on the host, per sample index
    elif topk is None:
        out[store.LOGITS] = logits.half()
    else:
        # the tempered distribution's top k (FKD): at T > 1 its tail is not the T = 1 tail spread evenly
        values, classes = F.log_softmax(logits / temperature, dim=-1).topk(topk, dim=-1)
        out[store.TOPK_VALUES], out[store.TOPK_INDICES] = values.half(), classes.int()
    return out


def _to_host(out: dict[str, torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> dict:
    # non_blocking copies from CUDA land in pinned memory; the event says when they are there
    host = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
    host[store.LABELS], host["index"] = labels.to("cpu", non_blocking=True), index.to("cpu", non_blocking=True)
    event = None
    if out["correct"].is_cuda:
        event = torch.cuda.Event()
        event.record()
    return {"host": host, "event": event}


def _store_batch(pending: dict, chunks: _Chunks, idx_dtype: np.dtype, targets: dict) -> None:
    if pending["event"] is not None:
        pending["event"].synchronize()
    h = {k: v.numpy() for k, v in pending["host"].items()}
    index = h.pop("index").astype(np.int64)
    bad = ~h.pop("finite")
    stored = h.get(store.LOGITS, h.get(store.TOPK_VALUES, h.get(PROBS)))
    bad |= ~np.isfinite(stored.astype(np.float32)).reshape(len(index), -1).all(1)  # beyond float16's range
    if bad.any():
        raise UserError(f"the teacher's outputs for sample {int(index[bad].min())} are not finite "
                        "(nan, inf, or beyond float16's range)")
    correct = h.pop("correct")
    if store.TOPK_INDICES in h:
        h[store.TOPK_INDICES] = h[store.TOPK_INDICES].astype(idx_dtype)
    if PROBS in h:
        classes, counts = sample_targets(h.pop(PROBS), index, targets["sample"], targets["sample_seed"])
        h[store.SAMPLE_CLASSES] = classes.astype(idx_dtype)
        h[store.SAMPLE_COUNTS] = counts.astype(store.index_dtype(targets["sample"] + 1))
    chunks.add(index, h, correct)


def dump(cfg: DumpConfig | None = None, /, *, progress: bool = True, **options) -> dict:
    """Dump the teacher's logits and scores for every sample of the training beton `cfg.data` into the
    store at `cfg.out`, resuming a matching unfinished store. Returns the store's root attributes.
    Keyword options instead of `cfg` build one (`dump(teacher=..., data=..., out=...)`)."""
    cfg = cfg or DumpConfig(**options)
    info = dataset_info(cfg.data)
    topk, sample = cfg.topk or None, cfg.sample or None  # top-k "off" is 0 in options, None in the store
    _check_options(info, cfg.batch_size, cfg.chunk_rows, topk, cfg.temperature, sample, cfg.views)
    multi = cfg.views > 1
    targets = {"topk": topk, "temperature": cfg.temperature if topk or sample else None,  # full logits: any
               "sample": sample, "sample_seed": cfg.sample_seed if sample else None, "views": cfg.views,
               "view_seed": cfg.view_seed if multi else None, "view_recipe": crops.view_recipe(info) if multi else None}
    dev = resolve_device(cfg.device)
    distributed = init_distributed(dev)
    try:
        model, ident = load_teacher(cfg.teacher, cfg.checkpoint, cfg.pretrained, info, dev)
        attrs = store.root_attrs(store.LOGITS_KIND, info, teacher=cfg.teacher, **ident, teacher_accuracy=None,
                                 command=shlex.join(sys.argv), created=now(),
                                 chunk_rows=cfg.chunk_rows, **targets)
        _prepare_on_rank0(cfg.out, attrs, cfg.overwrite, distributed)
        group = store.open_store(cfg.out, "r+")
        if rank() == 0:
            store.write_keys(group, info.manifest)
        done = group[store.CHUNKS_DONE][:]
        todo = [k for k in range(len(done)) if k % world_size() == rank() and not done[k]]
        if todo:
            _run(model, group, info, todo, batch_size=cfg.batch_size, chunk_rows=cfg.chunk_rows, targets=targets,
                 dev=dev, workers=cfg.workers, progress=progress and rank() == 0)
        if distributed:
            dist.barrier()
        if rank() == 0:
            _finish(group, cfg.out, info.size)
        if distributed:
            dist.barrier()
        return store.open_store(cfg.out, "r").attrs.asdict()
    finally:
        if distributed:
            dist.destroy_process_group()


def _check_options(info: DatasetInfo, batch_size: int, chunk_rows: int, topk: int | None,
                   temperature: float, sample: int | None, views: int) -> None:
    if info.split != "train":
        raise UserError(f"--data must be the training split's beton; {info.path} is the {info.split} split")
    if batch_size < 1 or chunk_rows < 1:
        raise UserError("--batch-size and --chunk-rows must be positive")
    if chunk_rows % batch_size:
        # then a resumed or multi-process dump sees exactly the batches of a single uninterrupted
        # one, and so writes identical values
        raise UserError(f"--chunk-rows ({chunk_rows}) must be a multiple of --batch-size ({batch_size})")
    if topk is not None and not 0 < topk < info.num_classes:
        raise UserError(f"--topk must be between 1 and {info.num_classes - 1} (the dataset has "
                        f"{info.num_classes} classes)")
    if not temperature > 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    if sample is not None and sample < 1:
        raise UserError(f"--sample must be at least 1 draw, got {sample}")
    if sample and topk:
        raise UserError("give either --topk or --sample, not both")
    if views < 1:
        raise UserError(f"--views must be at least 1, got {views}")


def _prepare_on_rank0(out: str, attrs: dict, overwrite: bool, distributed: bool) -> None:
    """Rank 0 creates or checks the store; the others learn the verdict before touching it."""
    error = None
    if rank() == 0:
        try:
            prepare_store(out, attrs, overwrite)
        except UserError as e:
            error = str(e)
    if distributed:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise UserError(error)


def _finish(group, out: str, num_samples: int) -> None:
    flags = group[store.CHUNKS_DONE][:]
    if not flags.all():  # another rank failed; its chunks stay to do
        raise store.incomplete(out, int((flags == 0).sum()), len(flags))
    accuracy = float(group[store.CHUNK_CORRECT][:].sum() / num_samples)
    group.update_attributes({"teacher_accuracy": accuracy, "finished": now()})


def _run(model, group, info: DatasetInfo, todo: list[int], *, batch_size: int, chunk_rows: int,
         targets: dict, dev: torch.device, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    n = info.size
    indices = np.concatenate([np.arange(k * chunk_rows, min((k + 1) * chunk_rows, n)) for k in todo])
    views = targets["views"]
    folder = views > 1 and not info.small  # the clean image and each view cut from the canvas: kdcache.crops
    batches = Batches(info, batch_size=batch_size, train=False, device=dev, indices=indices,
                      num_workers=workers, normalise=views == 1, canvas=folder)
    table = centre = None
    if folder:
        heights, widths = crops.image_sizes(info.path)
        table = crops.view_params(targets["view_seed"], np.arange(n), views, heights, widths)
        table, centre = (torch.from_numpy(t.astype(np.int32)).to(dev)
                         for t in (table, crops.centre(heights, widths, CROP_RATIO)))
    elif views > 1:
        table = torch.from_numpy(view_params(targets["view_seed"], np.arange(n), views)).to(dev)
    hook: dict = {}
    fc = last_linear(model)
    handle = fc.register_forward_pre_hook(lambda module, args: hook.__setitem__("features", args[0]))
    die_after = os.environ.get(DIE_AFTER_ENV)
    writer = _Writer(group, int(die_after) if die_after else None)
    writer.start()
    chunks = _Chunks(n, chunk_rows, writer)
    idx_dtype = store.index_dtype(info.num_classes)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    pending = None
    try:
        with torch.inference_mode(), autocast:
            for x, y, index, _ in tqdm(batches, desc="dump", unit="batch", disable=not progress):
                shown = []
                if table is not None:  # x is raw: each view is made from it by the trainer's own function
                    params = table[index]
                    if folder:
                        shown = [batches.normalise(crops.apply_crop(x, params[:, v], info.image_size))
                                 for v in range(views)]
                        x = batches.normalise(crops.apply_crop(x, centre[index], info.image_size))
                    else:
                        shown = [batches.normalise(apply_view(x, params[:, v])) for v in range(views)]
                        x = batches.normalise(x)
                out = _batch_outputs(model, hook, x, y, targets, fc.bias is not None, shown)
                if table is not None:
                    out[store.VIEW_PARAMS] = params.to(torch.uint16) if folder else params
                out = _to_host(out, y, index)
                # store the previous batch while the device computes this one
                if pending is not None:
                    _store_batch(pending, chunks, idx_dtype, targets)
                pending = out
            if pending is not None:
                _store_batch(pending, chunks, idx_dtype, targets)
    finally:
        handle.remove()
        writer.close()
    if writer.error is not None:
        raise writer.error
