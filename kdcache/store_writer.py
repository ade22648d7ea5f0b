"""The teacher's outputs into a store, in chunks: the store's attributes and arrays, the per-batch
outputs (scores, targets), and the writer thread that flags a chunk done only once its data is written,
so a killed dump resumes at the first unflagged chunk. Shared by `kdcache dump` (dump.py, from a beton)
and `kdcache.dump_dataset` (any PyTorch dataset and model)."""
from __future__ import annotations

import os
import queue
import shlex
import signal
import sys
import threading
from collections import deque
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from . import crops, store
from .augment import VIEW_RECIPE
from .errors import UserError
from .files import now
from .models import last_linear
from .scores import TEACHER_SCORES, teacher_scores
from .sparse import sample_targets

PROBS = "probs"  # a batch's tempered teacher probabilities, on their way to be sampled (not stored)

DIE_AFTER_ENV = "KDCACHE_DIE_AFTER_CHUNKS"  # tests: SIGKILL this process after that many chunks
PIPELINE_DEPTH = 2  # batches queued on the device before the oldest one's outputs are stored on the host


# --- the store -------------------------------------------------------------------------------------

IDENTITY = (store.TRAIN_FINGERPRINT, "teacher", "checkpoint_sha256", "teacher_preprocessing")
LAYOUT = ("num_samples", "num_classes", "chunk_rows", "topk", "temperature", "sample", "sample_seed", "views",
          "view_seed", "view_recipe")
ADDED_LATER = {"views": 1}  # layout attributes of stores made before they existed: what such a store holds
NAMES = {store.TRAIN_FINGERPRINT: "train fingerprint", "checkpoint_sha256": "checkpoint SHA-256",
         "views": "number of views", "teacher_preprocessing": "teacher preprocessing"}


def _say(value) -> str:
    """An attribute value in the user's words: `none` rather than Python's None."""
    return "none" if value is None else str(value)


def store_targets(*, topk: int | None, temperature: float, sample: int | None, sample_seed: int, views: int = 1,
                  view_seed: int | None = None, view_recipe: str | None = None) -> dict:
    """What a store's targets are, as its layout attributes record them (`kdcache dump` and `dump_dataset`
    alike): None where an option does not apply (full logits serve any temperature)."""
    multi = views > 1
    return {"topk": topk, "temperature": temperature if topk or sample else None, "sample": sample,
            "sample_seed": sample_seed if sample else None, "views": views,
            "view_seed": view_seed if multi else None, "view_recipe": view_recipe if multi else None}


def store_attrs(split, targets: dict, *, teacher: str, chunk_rows: int, **identity) -> dict:
    """The root attributes a dump's store starts with: `split` is the training split's DatasetInfo (or what
    stands for it), `identity` the teacher's weights (checkpoint, checkpoint_sha256, ...)."""
    return store.root_attrs(store.LOGITS_KIND, split, teacher=teacher, **identity, teacher_accuracy=None,
                            command=shlex.join(sys.argv), created=now(), chunk_rows=chunk_rows, **targets)


def prepare_store(url: str, attrs: dict, overwrite: bool) -> zarr.Group:
    """Create the store, or check that the one at `url` is this dump's (to resume it); return it, open."""
    old = store.existing_store(url)
    if old is not None and not overwrite:
        have = old.attrs.asdict()
        if have.get(store.KIND) != store.LOGITS_KIND:
            raise UserError(f"{url} is not a teacher-logit cache; pass --overwrite to replace it")
        for key in IDENTITY + LAYOUT:
            if key == "teacher_preprocessing" and key not in have:  # made before timm teachers: the data's own
                continue
            value = have.get(key, ADDED_LATER.get(key))
            if value != attrs[key]:
                what = NAMES.get(key, key.replace("_", " "))
                raise UserError(f"store {url} has another {what} ({_say(value)}, this dump: "
                                f"{_say(attrs[key])}); pass --overwrite to start over")
        group = store.open_store(url, "r+")
        if store.CHUNKS_DONE in group:  # created in full earlier: resume
            return group
    else:  # attributes with the group, in one write: there is never a store without them
        group = store.create_store(url, attrs, overwrite=old is not None)
    store.create_logit_arrays(group, num_samples=attrs["num_samples"], num_classes=attrs["num_classes"],
                              chunk_rows=attrs["chunk_rows"], topk=attrs["topk"], sample=attrs["sample"],
                              scores=TEACHER_SCORES, views=attrs["views"],
                              view_layout=(3, "int8") if attrs["view_recipe"] in (None, VIEW_RECIPE) else
                              (crops.PARAMS, "uint16"))
    return group


class _Writer(threading.Thread):
    """Writes finished chunks in the background; a bounded queue keeps memory in check."""

    def __init__(self, group, die_after: int | None):
        super().__init__(daemon=True)
        self.group, self.die_after, self.done = group, die_after, 0
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.arrays: dict = {}  # opened once: opening an array reads its metadata from storage

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
            self.array(name)[rows] = values
        self.array(store.CHUNK_CORRECT)[c] = chunk["correct"]
        self.array(store.CHUNKS_DONE)[c] = 1  # last: the chunk's data is on storage
        self.done += 1
        if self.die_after is not None and self.done >= self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def array(self, name: str):
        if name not in self.arrays:
            self.arrays[name] = self.group[name]
        return self.arrays[name]

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
    bad |= ~np.isfinite(stored).reshape(len(index), -1).all(1)  # beyond float16's range: inf once halved
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


class _Sink:
    """Where a pass's batches go: the teacher's outputs on a batch (GraNd's features from a hook on the last
    layer's input), their copies to the host, and the chunk buffers the background writer stores. A batch's
    outputs are stored once `PIPELINE_DEPTH` later batches are queued, so that the device computes those
    meanwhile. `close` stores what is left and waits for the writer; use it as a context manager."""

    def __init__(self, model, group, num_samples: int, chunk_rows: int, num_classes: int, targets: dict):
        self.model, self.targets, self.hook = model, targets, {}
        fc = last_linear(model)
        self.has_bias = fc.bias is not None
        self.handle = fc.register_forward_pre_hook(lambda module, args: self.hook.__setitem__("features", args[0]))
        die_after = os.environ.get(DIE_AFTER_ENV)
        self.writer = _Writer(group, int(die_after) if die_after else None)
        self.chunks = _Chunks(num_samples, chunk_rows, self.writer)
        self.idx_dtype = store.index_dtype(num_classes)
        self.pending: deque = deque()
        self.closed = False

    def __enter__(self) -> _Sink:
        self.writer.start()
        return self

    def outputs(self, x: torch.Tensor, y: torch.Tensor, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return _batch_outputs(self.model, self.hook, x, y, self.targets, self.has_bias, views)

    def put(self, out: dict[str, torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> None:
        self.pending.append(_to_host(out, labels, index))
        while len(self.pending) > PIPELINE_DEPTH:
            _store_batch(self.pending.popleft(), self.chunks, self.idx_dtype, self.targets)

    def close(self) -> None:
        while self.pending:
            _store_batch(self.pending.popleft(), self.chunks, self.idx_dtype, self.targets)
        self._stop()
        if self.writer.error is not None:
            raise self.writer.error

    def _stop(self) -> None:
        if not self.closed:
            self.closed = True
            self.handle.remove()
            self.writer.close()

    def __exit__(self, *exc) -> None:
        self._stop()  # after an error: the writer ends; the error is the one raised


def autocast(dev: torch.device):
    """The teacher's precision: bf16 autocast on a GPU, float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()


def _finish(group, out: str, num_samples: int) -> None:
    flags = group[store.CHUNKS_DONE][:]
    if not flags.all():  # another rank failed; its chunks stay to do
        raise store.incomplete(out, int((flags == 0).sum()), len(flags))
    accuracy = float(group[store.CHUNK_CORRECT][:].sum() / num_samples)
    group.update_attributes({"teacher_accuracy": accuracy, "finished": now()})
