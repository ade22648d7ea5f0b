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
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .device import init_distributed, resolve_device
from .errors import UserError
from .loader import Batches
from .models import last_linear
from .scores import TEACHER_SCORES, teacher_scores
from .store import LOGITS_KIND, SCHEMA_VERSION, create_score, create_store, index_dtype, open_store

DIE_AFTER_ENV = "KDCACHE_DIE_AFTER_CHUNKS"  # tests: SIGKILL this process after that many chunks


def load_teacher(name: str, checkpoint: str | None, pretrained: bool, info: dict,
                 device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The teacher in eval mode, channels-last, and what identifies its weights."""
    from .beton import image_size
    from .models import build_model, load_checkpoint, sha256_file

    if bool(checkpoint) == bool(pretrained):
        raise UserError("pass exactly one of --checkpoint PATH and --pretrained")
    num_classes, size = info["num_classes"], image_size(info)
    if checkpoint:
        model, meta = load_checkpoint(checkpoint, "cpu")
        if meta["arch"] != name:
            raise UserError(f"--teacher {name}, but {checkpoint} holds a {meta['arch']}")
        if meta["num_classes"] != num_classes:
            raise UserError(f"{checkpoint} predicts {meta['num_classes']} classes but the dataset has "
                            f"{num_classes}")
        if meta["image_size"] != size:
            raise UserError(f"{checkpoint} was built for {meta['image_size']} px images but the dataset's "
                            f"are {size} px")
        ident = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint)}
    else:
        model = build_model(name, num_classes, size, pretrained=True)
        import torchvision
        weights = torchvision.models.get_model_weights(name).DEFAULT
        ident = {"checkpoint": f"torchvision:{weights}", "checkpoint_sha256": None}
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, ident


# --- the store -------------------------------------------------------------------------------------

def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _existing(url: str):
    """The zarr group at `url`, or None if nothing is there. Refuses to touch a folder of other files."""
    if _is_local(url):
        path = _local_path(url)
        if path.exists() and not (path / "zarr.json").exists():
            if path.is_file() or any(path.iterdir()):
                raise UserError(f"{url} exists and is not a kdcache store; choose another --out")
            return None
    return open_store(url, "r", missing_ok=True)


IDENTITY = ("fingerprint", "teacher", "checkpoint_sha256")
LAYOUT = ("num_samples", "num_classes", "chunk_rows", "topk")
NAMES = {"fingerprint": "dataset fingerprint", "checkpoint_sha256": "checkpoint SHA-256"}


def prepare_store(url: str, attrs: dict, overwrite: bool) -> None:
    """Create the store, or check that the one at `url` is this dump's (to resume it)."""
    old = _existing(url)
    if old is not None and not overwrite:
        have = old.attrs.asdict()
        if have.get("kind") != LOGITS_KIND:
            raise UserError(f"{url} is not a teacher-logit cache; pass --overwrite to replace it")
        for key in IDENTITY + LAYOUT:
            if have.get(key) != attrs[key]:
                what = NAMES.get(key, key.replace("_", " "))
                raise UserError(f"store {url} has another {what} ({have.get(key)!r}, this dump: "
                                f"{attrs[key]!r}); pass --overwrite to start over")
        group = open_store(url, "r+")
        if "chunks_done" in group:  # created in full earlier: resume
            return
    else:  # attributes with the group, in one write: there is never a store without them
        group = create_store(url, attrs, overwrite=old is not None)
    _create_arrays(group, attrs)


def _create_arrays(group, attrs: dict) -> None:
    n, c, rows, k = attrs["num_samples"], attrs["num_classes"], attrs["chunk_rows"], attrs["topk"]
    rows = min(rows, max(n, 1))
    if k is None:
        group.create_array("logits", shape=(n, c), dtype="float16", chunks=(rows, c), overwrite=True)
    else:
        group.create_array("topk_values", shape=(n, k), dtype="float16", chunks=(rows, k), overwrite=True)
        group.create_array("topk_indices", shape=(n, k), dtype=index_dtype(c), chunks=(rows, k),
                           overwrite=True)
    group.create_array("labels", shape=(n,), dtype="int64", chunks=(rows,), overwrite=True)
    for name, (harder, description) in TEACHER_SCORES.items():
        create_score(group, name, n, higher_is_harder=harder, description=description, chunk_rows=rows)
    # One zarr chunk per flag, so ranks never rewrite each other's. Created last: its presence
    # means every other array exists.
    m = num_chunks(n, attrs["chunk_rows"])
    group.create_array("chunk_correct", shape=(m,), dtype="int64", chunks=(1,), fill_value=0, overwrite=True)
    group.create_array("chunks_done", shape=(m,), dtype="uint8", chunks=(1,), fill_value=0, overwrite=True)


def num_chunks(num_samples: int, chunk_rows: int) -> int:
    return -(-num_samples // chunk_rows)


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
        self.group["chunk_correct"][c] = chunk["correct"]
        self.group["chunks_done"][c] = 1  # last: the chunk's data is on storage
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

def _batch_outputs(model, hook: dict, x: torch.Tensor, y: torch.Tensor, topk: int | None,
                   has_bias: bool) -> dict[str, torch.Tensor]:
    logits = model(x).float()
    scores = teacher_scores(logits, y, hook["features"], has_bias)
    out = {f"scores/{name}": scores[name] for name in TEACHER_SCORES}
    out["correct"] = logits.argmax(1) == y
    out["finite"] = torch.isfinite(logits).all(1)
    if topk is None:
        out["logits"] = logits.half()
    else:
        values, classes = F.log_softmax(logits, dim=1).topk(topk, dim=1)
        out["topk_values"], out["topk_indices"] = values.half(), classes.int()
    return out


def _to_host(out: dict[str, torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> dict:
    # non_blocking copies from CUDA land in pinned memory; the event says when they are there
    host = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
    host["labels"], host["index"] = labels.to("cpu", non_blocking=True), index.to("cpu", non_blocking=True)
    event = None
    if out["correct"].is_cuda:
        event = torch.cuda.Event()
        event.record()
    return {"host": host, "event": event}


def _store_batch(pending: dict, chunks: _Chunks, idx_dtype: np.dtype) -> None:
    if pending["event"] is not None:
        pending["event"].synchronize()
    h = {k: v.numpy() for k, v in pending["host"].items()}
    index = h.pop("index").astype(np.int64)
    bad = ~h.pop("finite")
    stored = h.get("logits", h.get("topk_values"))
    bad |= ~np.isfinite(stored.astype(np.float32)).all(1)  # beyond float16's range
    if bad.any():
        raise UserError(f"the teacher's outputs for sample {int(index[bad].min())} are not finite "
                        "(nan, inf, or beyond float16's range)")
    correct = h.pop("correct")
    if "topk_indices" in h:
        h["topk_indices"] = h["topk_indices"].astype(idx_dtype)
    chunks.add(index, h, correct)


def dump(*, teacher: str, data: str, out: str, checkpoint: str | None = None, pretrained: bool = False,
         batch_size: int = 512, chunk_rows: int = 4096, topk: int | None = None, device: str = "auto",
         workers: int = -1, overwrite: bool = False, progress: bool = True) -> dict:
    """Dump the teacher's logits and scores for every sample of the training beton `data` into the
    store at `out`, resuming a matching unfinished store. Returns the store's root attributes."""
    import torch.distributed as dist

    from .beton import dataset_info

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    distributed = init_distributed(dev)
    try:
        info = dataset_info(data)
        if info["split"] != "train":
            raise UserError(f"--data must be the training split's beton; {data} is the {info['split']} split")
        n, c = info["size"], info["num_classes"]
        topk = topk or None
        if batch_size < 1 or chunk_rows < 1:
            raise UserError("--batch-size and --chunk-rows must be positive")
        if chunk_rows % batch_size:
            # then a resumed or multi-process dump sees exactly the batches of a single uninterrupted
            # one, and so writes identical values
            raise UserError(f"--chunk-rows ({chunk_rows}) must be a multiple of --batch-size ({batch_size})")
        if topk is not None and not 0 < topk < c:
            raise UserError(f"--topk must be between 1 and {c - 1} (the dataset has {c} classes)")
        model, ident = load_teacher(teacher, checkpoint, pretrained, info, dev)
        manifest = {k: v for k, v in info.items() if k not in ("split", "path", "size", "split_fingerprint")}
        attrs = {"kind": LOGITS_KIND, "schema_version": SCHEMA_VERSION,
                 "fingerprint": info["splits"]["train"]["fingerprint"], "manifest": manifest,
                 "teacher": teacher, **ident, "teacher_accuracy": None, "kdcache_version": __version__,
                 "command": shlex.join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "num_samples": n, "num_classes": c, "chunk_rows": chunk_rows, "topk": topk}

        # rank 0 creates or checks the store; the others learn the verdict before touching it
        error = None
        if rank == 0:
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

        group = open_store(out, "r+")
        done = group["chunks_done"][:]
        todo = [k for k in range(len(done)) if k % world == rank and not done[k]]
        if todo:
            _run(model, group, info, todo, batch_size=batch_size, chunk_rows=chunk_rows, topk=topk,
                 dev=dev, workers=workers, progress=progress and rank == 0)
        if distributed:
            dist.barrier()
        if rank == 0:
            flags = group["chunks_done"][:]
            if not flags.all():  # another rank failed; its chunks stay to do
                raise UserError(f"store {out} is incomplete: {int((flags == 0).sum())} of {len(flags)} "
                                "chunks missing (run the same kdcache dump again to finish it)")
            accuracy = float(group["chunk_correct"][:].sum() / n)
            group.update_attributes({"teacher_accuracy": accuracy,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if distributed:
            dist.barrier()
        return open_store(out, "r").attrs.asdict()
    finally:
        if distributed:
            dist.destroy_process_group()


def _run(model, group, info: dict, todo: list[int], *, batch_size: int, chunk_rows: int, topk: int | None,
         dev: torch.device, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    n = info["size"]
    indices = np.concatenate([np.arange(k * chunk_rows, min((k + 1) * chunk_rows, n)) for k in todo])
    batches = Batches(info, batch_size=batch_size, train=False, device=dev, indices=indices,
                      num_workers=workers)
    hook: dict = {}
    fc = last_linear(model)
    handle = fc.register_forward_pre_hook(lambda module, args: hook.__setitem__("features", args[0]))
    die_after = os.environ.get(DIE_AFTER_ENV)
    writer = _Writer(group, int(die_after) if die_after else None)
    writer.start()
    chunks = _Chunks(n, chunk_rows, writer)
    idx_dtype = index_dtype(info["num_classes"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    pending = None
    try:
        with torch.inference_mode(), autocast:
            for x, y, index in tqdm(batches, desc="dump", unit="batch", disable=not progress):
                out = _to_host(_batch_outputs(model, hook, x, y, topk, fc.bias is not None), y, index)
                # store the previous batch while the device computes this one
                if pending is not None:
                    _store_batch(pending, chunks, idx_dtype)
                pending = out
            if pending is not None:
                _store_batch(pending, chunks, idx_dtype)
    finally:
        handle.remove()
        writer.close()
    if writer.error is not None:
        raise writer.error
