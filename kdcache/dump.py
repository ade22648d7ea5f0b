"""`kdcache dump`: run the teacher once over the training set and cache what every student needs.

The store is written in chunks of `chunk_rows` samples. A chunk's rows are buffered in memory, handed
to a writer thread when complete (so the teacher never waits on storage) and flagged in
`chunks_done` only after its data is written: a killed dump resumes at the first unflagged chunk.
Under torchrun, rank r dumps the chunks c with c % world_size == r.

What a dump costs beyond bare inference is mostly fixed (`benchmarks/bench_dump.py` fits it): loading and
hashing the checkpoint (at once, in two threads), creating the store's arrays (concurrently), the loader,
and draining the writer at the end. Per batch it adds the scores' kernels, the copies to the host and the
chunk bookkeeping, done for a batch only once `PIPELINE_DEPTH` later ones are queued on the device.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import zarr

from . import crops, store
from .augment import apply_view, view_params
from .beton import CROP_RATIO, DatasetInfo, dataset_info
from .config import DumpConfig
from .device import init_distributed, rank, resolve_device, world_size
from .errors import UserError
from .loader import Batches
from .store_writer import _finish, _Sink, autocast, prepare_store, store_attrs, store_targets


def load_teacher(name: str, checkpoint: str | None, pretrained: bool, info: DatasetInfo,
                 device: torch.device, preprocessing: str = "auto") -> tuple[torch.nn.Module, dict]:
    """The teacher in eval mode, channels-last, and what identifies its weights. `preprocessing`: "auto" gives a
    timm teacher its own input size, mean and std (config.teacher_preprocessing_option); "data", the dataset's."""
    from .models import TIMM, build_model, load_teacher_checkpoint, sha256_file, with_own_preprocessing

    if bool(checkpoint) == bool(pretrained):
        raise UserError("pass exactly one of --checkpoint PATH and --pretrained")
    # the teacher's own preprocessing (a timm teacher's mean, std and input size), recorded in the store
    own = {"mean": list(info.mean), "std": list(info.std), "input_size": info.image_size}
    if checkpoint:
        # hashed while torch.load reads the same file (hashlib releases the GIL): a fixed cost paid once
        with ThreadPoolExecutor(1) as pool:
            digest = pool.submit(sha256_file, checkpoint)
            own_size = preprocessing == "auto"
            model = load_teacher_checkpoint(checkpoint, name, info.num_classes, info.image_size, device,
                                            mean=info.mean if own_size else None, std=info.std if own_size else None)
            sha256 = digest.result()
        return model, {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256,
                       "teacher_preprocessing": getattr(model, "preprocessing", own)}
    model = build_model(name, info.num_classes, info.image_size, pretrained=True)
    if name.startswith(TIMM) and preprocessing == "auto":
        model = with_own_preprocessing(model, name, info.mean, info.std, info.image_size)
        source = f"timm-pretrained:{name.removeprefix(TIMM)}"
    else:
        import torchvision
        source = f"torchvision:{torchvision.models.get_model_weights(name).DEFAULT}"
    preprocessing = getattr(model, "preprocessing", own)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, {"checkpoint": source, "checkpoint_sha256": None, "teacher_preprocessing": preprocessing}


class Phases:
    """Seconds per phase of a dump, added up into `into` when given (what benchmarks/bench_dump.py reports)."""

    def __init__(self, into: dict | None = None):
        self.into = into

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.into is not None:
                self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - start


def dump(cfg: DumpConfig | None = None, /, *, progress: bool = True, timings: dict | None = None,
         **options) -> dict:
    """Dump the teacher's logits and scores for every sample of the training beton `cfg.data` into the
    store at `cfg.out`, resuming a matching unfinished store. Returns the store's root attributes.
    Keyword options instead of `cfg` build one (`dump(teacher=..., data=..., out=...)`). `timings`, a
    dict, receives the seconds each phase took: teacher (load and hash), store (create or check, keys),
    loader, pass (inference and per-batch work), drain (the last batches and chunks), finish."""
    cfg = cfg or DumpConfig(**options)
    phases = Phases(timings)
    info = dataset_info(cfg.data)
    topk, sample = cfg.topk or None, cfg.sample or None  # top-k "off" is 0 in options, None in the store
    _check_options(info, cfg.batch_size, cfg.chunk_rows, topk, cfg.temperature, sample, cfg.views)
    targets = store_targets(topk=topk, temperature=cfg.temperature, sample=sample, sample_seed=cfg.sample_seed,
                            views=cfg.views, view_seed=cfg.view_seed,
                            view_recipe=crops.view_recipe(info) if cfg.views > 1 else None)
    dev = resolve_device(cfg.device)
    distributed = init_distributed(dev)
    try:
        with phases("teacher"):
            model, ident = load_teacher(cfg.teacher, cfg.checkpoint, cfg.pretrained, info, dev,
                                        cfg.teacher_preprocessing)
            seen = ident["teacher_preprocessing"]
            if progress and rank() == 0 and seen["input_size"] != info.image_size:  # never a silent resize
                print(f"teacher {cfg.teacher} sees {seen['input_size']} px inputs (the data's are {info.image_size}), "
                      "normalised with its own mean and std: --teacher-preprocessing data for the dataset's own",
                      flush=True)
        with phases("store"):
            attrs = store_attrs(info, targets, teacher=cfg.teacher, chunk_rows=cfg.chunk_rows, **ident)
            group = _prepare_on_rank0(cfg.out, attrs, cfg.overwrite, distributed) or store.open_store(cfg.out, "r+")
            if rank() == 0:
                store.write_keys(group, info.manifest)
            done = group[store.CHUNKS_DONE][:]
        todo = [k for k in range(len(done)) if k % world_size() == rank() and not done[k]]
        if todo:
            _run(model, group, info, todo, batch_size=cfg.batch_size, chunk_rows=cfg.chunk_rows, targets=targets,
                 dev=dev, workers=cfg.workers, progress=progress and rank() == 0, phases=phases)
        if distributed:
            dist.barrier()
        with phases("finish"):
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
    if views > 1 and not info.small:  # crop views are cut from the stored images
        crops.check_size(info)


def _prepare_on_rank0(out: str, attrs: dict, overwrite: bool, distributed: bool) -> zarr.Group | None:
    """Rank 0 creates or checks the store (and gets it, open); the others learn the verdict before touching it."""
    error = group = None
    if rank() == 0:
        try:
            group = prepare_store(out, attrs, overwrite)
        except UserError as e:
            error = str(e)
    if distributed:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise UserError(error)
    return group


def _run(model, group, info: DatasetInfo, todo: list[int], *, batch_size: int, chunk_rows: int,
         targets: dict, dev: torch.device, workers: int, progress: bool, phases: Phases) -> None:
    from tqdm import tqdm

    n = info.size
    indices = np.concatenate([np.arange(k * chunk_rows, min((k + 1) * chunk_rows, n)) for k in todo])
    views = targets["views"]
    folder = views > 1 and not info.small  # the clean image and each view cut by the decoder: kdcache.crops
    with phases("loader"):
        table = cut = None
        if folder:  # per sample: the centre crop (scores, accuracy), then each stored view
            heights, widths = crops.image_sizes(info.path)
            boxes = crops.view_params(targets["view_seed"], np.arange(n), views, heights, widths)
            cut = np.concatenate([crops.centre(heights, widths, CROP_RATIO)[:, None], boxes], axis=1)
            table = torch.from_numpy(boxes.astype(np.int32)).to(dev)
        elif views > 1:
            table = torch.from_numpy(view_params(targets["view_seed"], np.arange(n), views)).to(dev)
        batches = Batches(info, batch_size=batch_size, train=False, device=dev, indices=indices,
                          num_workers=workers, normalise=views == 1, crops=cut)
    with _Sink(model, group, n, chunk_rows, info.num_classes, targets) as sink, torch.inference_mode(), autocast(dev):
        with phases("pass"):
            for x, y, index, _ in tqdm(batches, desc="dump", unit="batch", disable=not progress):
                shown = []
                if table is not None:  # x is raw: each view is made from it by the trainer's own function
                    params = table[index]
                    if folder:  # x: (B, 1 + K, C, H, W), the centre crop and the views, cut by the decoder
                        shown = [batches.normalise(x[:, 1 + v]) for v in range(views)]
                        x = batches.normalise(x[:, 0])
                    else:
                        shown = [batches.normalise(apply_view(x, params[:, v])) for v in range(views)]
                        x = batches.normalise(x)
                out = sink.outputs(x, y, shown)
                if table is not None:
                    out[store.VIEW_PARAMS] = params.to(torch.uint16) if folder else params
                sink.put(out, y, index)  # stores an earlier batch while the device computes this one
        with phases("drain"):
            sink.close()
