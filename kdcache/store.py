"""Zarr stores of per-sample arrays, indexed by the dataset's sample index.

Both the teacher-logit cache (`kdcache dump`) and training-dynamics stores (`--record-dynamics`)
follow one layout, owned by this module: the root attribute `train_fingerprint` is the training
split's fingerprint from the dataset manifest, and per-sample difficulty scores live in
`scores/<name>` as (N,) float32. Other modules use the names below, never bare strings.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync

from . import __version__
from .errors import UserError

# --- the layout: every kind, array and shared attribute name of a kdcache store, defined here once ---
SCHEMA_VERSION = 2
KIND = "kind"                            # root attribute: what the store holds
LOGITS_KIND = "teacher-logits"           # written by `kdcache dump`
DYNAMICS_KIND = "dynamics"               # written by `kdcache train --record-dynamics`
TRAIN_FINGERPRINT = "train_fingerprint"  # root attribute: the training split the store describes
LOGITS = "logits"                        # (N, C) float16 teacher logits; (N, V, C) with V stored views
TOPK_VALUES = "topk_values"              # (N, K) float16 top-k log-probabilities ...  ((N, V, K) with views)
TOPK_INDICES = "topk_indices"            # (N, K) ... and their classes, smallest unsigned type
VIEW_PARAMS = "view_params"              # (N, V, 3) int8: each stored view's (dy, dx, flip), kdcache.augment;
                                         # image folders (N, V, 5) uint16 crop boxes + flip, kdcache.crops
SAMPLE_CLASSES = "sample_classes"        # (N, min(S, C)) classes drawn from the tempered teacher ...
SAMPLE_COUNTS = "sample_counts"          # ... and how often each was drawn (of S); (N, V, min(S, C)) with views
LABELS = "labels"                        # (N,) int64
KEYS = "keys"                            # (N,) str: each sample's key (image folders: path under the split root);
                                         # absent where the key is the position (the root attribute `keys`)
CHUNKS_DONE = "chunks_done"              # (chunks,) uint8: 1 once that chunk's rows are all written
CHUNK_CORRECT = "chunk_correct"          # (chunks,) int64: the teacher's correct predictions per chunk
SCORES = "scores"                        # group: scores/<name> (N,) float32, attrs higher_is_harder, description
DYNAMICS = "dynamics"                    # group: dynamics/<run>/<array> (N, epochs), see kdcache.dynamics
# the score names under scores/: the teacher pass's (kdcache.scores) and training dynamics' (kdcache.dynamics)
TEACHER_SCORE_NAMES = ("loss", "margin", "entropy", "el2n", "grand")
DYNAMICS_SCORE_NAMES = ("forgetting", "el2n_early", "dynunc", "aum")
BOOKKEEPING = (CHUNKS_DONE, CHUNK_CORRECT)
WHOLE_ARRAY_ROWS = 65536                 # rows per zarr chunk of arrays written whole (labels, scores)


def root_attrs(kind: str, info, **extra) -> dict:
    """The root attributes every kdcache store starts with; `info` is the training split's DatasetInfo."""
    return {KIND: kind, "schema_version": SCHEMA_VERSION, TRAIN_FINGERPRINT: info.train_fingerprint,
            "manifest": without_keys(info.manifest), "num_samples": info.size, "num_classes": info.num_classes,
            "kdcache_version": __version__, **extra}


def without_keys(manifest: dict) -> dict:
    """The manifest as a store records it: the splits' key lists (a million paths for ImageNet) go into
    the `keys` array instead, so that the root attributes stay small."""
    splits = {name: {k: v for k, v in split.items() if k != KEYS} for name, split in manifest.get("splits", {}).items()}
    return {**manifest, "splits": splits} if splits else dict(manifest)


def write_keys(group: zarr.Group, manifest: dict) -> None:
    """Record the training split's sample keys (the index contract, kdcache.api.rows_for): an image folder's
    paths as the `keys` array, `keys: position` for in-memory sources; nothing for a manifest without keys
    (made by an older kdcache)."""
    keys = manifest.get("splits", {}).get("train", {}).get(KEYS)
    if keys is None or KEYS in group or group.attrs.get(KEYS):
        return
    if isinstance(keys, str):
        group.update_attributes({KEYS: keys})
        return
    group.create_array(KEYS, shape=(len(keys),), dtype=str, chunks=(min(WHOLE_ARRAY_ROWS, len(keys)),),
                       overwrite=True)[:] = np.asarray(keys, dtype=str)
    group.update_attributes({KEYS: "array"})


def open_store(url: str, mode: str = "r", *, missing_ok: bool = False) -> zarr.Group | None:
    """Open a store by path or URL (`file://...`, or any fsspec URL such as `s3://...` when the
    filesystem package is installed); with `missing_ok`, None where there is none."""
    url = str(url)
    try:
        return _zarr(zarr.open_group, url, mode=mode)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one
        if missing_ok:
            return None
        raise UserError(f"no kdcache store at {url}")


def create_store(url: str, attrs: dict, *, overwrite: bool) -> zarr.Group:
    """A new store whose root attributes are written together with the group, in one write."""
    return _zarr(zarr.create_group, str(url), overwrite=overwrite, attributes=attrs)


def existing_store(url: str) -> zarr.Group | None:
    """The store at `url`, or None where there is nothing; refuses a local folder of other files."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        if path.exists() and not (path / "zarr.json").exists():
            if path.is_file() or any(path.iterdir()):
                raise UserError(f"{url} exists and is not a kdcache store; choose another --out")
            return None
    return open_store(url, "r", missing_ok=True)


def _zarr(open_or_create, url: str, **options) -> zarr.Group:
    try:
        return open_or_create(store=url.removeprefix("file://"), **options)
    except ImportError as e:
        raise UserError(f"cannot open {url}: {e} (install fsspec and the filesystem's package, e.g. s3fs)")


def where(group: zarr.Group) -> str:
    """A store's location as the user wrote it: a local store's path without zarr's `file://`."""
    return str(group.store).removeprefix("file://")


def check_schema(group: zarr.Group, url: str) -> None:
    """Refuse a store of an older layout (schema 1 had `fingerprint`, top-k at T = 1), in one line."""
    version = group.attrs.get("schema_version", 1)
    if version < SCHEMA_VERSION:
        raise UserError(f"store {url} was made by an older kdcache (store schema {version}, this one reads "
                        f"{SCHEMA_VERSION}): make it again (kdcache dump --overwrite, or train --record-dynamics)")


def check_dataset(group: zarr.Group, train_fingerprint: str, data: str) -> None:
    """Refuse a store made from another dataset than `data` (a beton whose training split has
    `train_fingerprint`), or of an older layout."""
    check_schema(group, where(group))
    have = group.attrs.get(TRAIN_FINGERPRINT)
    if have != train_fingerprint:
        raise UserError(f"store {where(group)} was made from another dataset (train fingerprint {have}, "
                        f"expected {train_fingerprint} for {data})")


def score_names(group: zarr.Group) -> list[str]:
    if SCORES not in group:
        return []
    return sorted(name for name, _ in group[SCORES].arrays())


def write_labels(group: zarr.Group, labels: np.ndarray) -> None:
    labels = np.asarray(labels, dtype=np.int64)
    group.create_array(LABELS, shape=labels.shape, dtype="int64", chunks=(min(WHOLE_ARRAY_ROWS, len(labels)),),
                       overwrite=True)[:] = labels


def read_score(group: zarr.Group, name: str) -> np.ndarray:
    check_complete(group, where(group))  # an unfinished dump's unwritten rows read as zeros
    names = score_names(group)
    if name not in names:
        raise UserError(f"store {where(group)} has no score {name!r}; it has: {', '.join(names) or 'none'}")
    return group[SCORES][name][:].astype(np.float32)


def hardness(group: zarr.Group, name: str) -> np.ndarray:
    """The score oriented so that higher means harder (margins, for one, are higher when easier)."""
    values = read_score(group, name)
    return values if group[SCORES][name].attrs.get("higher_is_harder", True) else -values


def write_score(group: zarr.Group, name: str, values: np.ndarray, *, higher_is_harder: bool = True,
                description: str = "", chunk_rows: int = WHOLE_ARRAY_ROWS) -> None:
    values = np.asarray(values, dtype=np.float32)
    create_score(group, name, len(values), higher_is_harder=higher_is_harder, description=description,
                 chunk_rows=chunk_rows)[:] = values


# --- the teacher-logit cache written by `kdcache dump` ---------------------------------------------

def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every class index (0 .. num_classes - 1)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def create_score(group: zarr.Group, name: str, num_samples: int, *, higher_is_harder: bool = True,
                 description: str = "", chunk_rows: int = WHOLE_ARRAY_ROWS) -> zarr.Array:
    """An empty `scores/<name>` array for writing in row blocks (what `write_score` does at once)."""
    arr = group.require_group(SCORES).create_array(
        name, shape=(num_samples,), dtype="float32", chunks=(min(chunk_rows, max(num_samples, 1)),),
        overwrite=True)
    arr.attrs.update({"higher_is_harder": higher_is_harder, "description": description})
    return arr


def num_chunks(num_samples: int, chunk_rows: int) -> int:
    return -(-num_samples // chunk_rows)


def create_logit_arrays(group: zarr.Group, *, num_samples: int, num_classes: int, chunk_rows: int,
                        topk: int | None, sample: int | None, scores: dict[str, tuple[bool, str]],
                        views: int = 1, view_layout: tuple[int, str] = (3, "int8")) -> None:
    """The arrays of a logit cache, empty: teacher outputs (full, top-k or sampled; per stored view when `views`
    > 1, with the views' parameters), labels, `scores` (name -> (higher_is_harder, description)) and the
    per-chunk bookkeeping, created last: its presence means every other array exists.

    The arrays are created concurrently, each with its attributes (one metadata write per array, all in
    flight at once: a dump's fixed cost), then the bookkeeping."""
    n, c = num_samples, num_classes
    rows = min(chunk_rows, max(n, 1))
    per_view = (views,) if views > 1 else ()
    arrays = []  # (path, shape, dtype, chunks, attributes)
    if views > 1:
        width, dtype = view_layout  # per view: (dy, dx, flip) int8, or kdcache.crops' (y0, x0, y1, x1, flip) uint16
        arrays.append((VIEW_PARAMS, (n, views, width), dtype, (rows, views, width), None))
    if sample:
        k = min(sample, c)
        arrays += [(SAMPLE_CLASSES, (n, *per_view, k), index_dtype(c), (rows, *per_view, k), None),
                   (SAMPLE_COUNTS, (n, *per_view, k), index_dtype(sample + 1), (rows, *per_view, k), None)]
    elif topk is None:
        arrays.append((LOGITS, (n, *per_view, c), "float16", (rows, *per_view, c), None))
    else:
        arrays += [(TOPK_VALUES, (n, *per_view, topk), "float16", (rows, *per_view, topk), None),
                   (TOPK_INDICES, (n, *per_view, topk), index_dtype(c), (rows, *per_view, topk), None)]
    arrays.append((LABELS, (n,), "int64", (rows,), None))
    arrays += [(f"{SCORES}/{name}", (n,), "float32", (rows,), {"higher_is_harder": harder, "description": description})
               for name, (harder, description) in scores.items()]
    # one zarr chunk per flag, so that ranks never rewrite each other's
    m = num_chunks(n, chunk_rows)
    bookkeeping = [(CHUNK_CORRECT, (m,), "int64", (1,), None), (CHUNKS_DONE, (m,), "uint8", (1,), None)]

    async def create(root, specs: list[tuple]) -> None:
        await asyncio.gather(*(root.create_array(path, shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                                                 attributes=attributes, overwrite=True)
                               for path, shape, dtype, chunks, attributes in specs))

    async def create_all() -> None:
        root = await zarr.api.asynchronous.open_group(store=group.store, path=group.path, mode="r+")
        if scores:
            await root.require_group(SCORES)
        await create(root, arrays)
        await create(root, bookkeeping)

    sync(create_all())


def chunk_status(group: zarr.Group) -> tuple[int, int]:
    """(chunks done, chunks in all) of a store written chunk by chunk; a store without per-chunk
    completion flags (e.g. training dynamics, written at once) counts as one finished chunk."""
    if CHUNKS_DONE not in group:
        return 1, 1
    done = group[CHUNKS_DONE][:]
    return int(np.count_nonzero(done)), len(done)


def check_complete(group: zarr.Group, url: str) -> None:
    done, total = chunk_status(group)
    if done < total:
        raise incomplete(url, total - done, total)


def incomplete(url: str, missing: int, total: int) -> UserError:
    return UserError(f"store {url} is incomplete: {missing} of {total} chunks missing "
                     "(run the same kdcache dump again to finish it)")


def sampled_target(classes: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """A sampled store's target q = counts / draws as (..., C) float64, zero off the drawn classes
    (kdcache.sparse draws them)."""
    q = np.zeros((*classes.shape[:-1], num_classes))
    np.put_along_axis(q, classes.astype(np.int64), counts / counts.sum(-1, keepdims=True), axis=-1)
    return q


def views_of(attrs) -> int:
    """A store's views per sample: stores written before views existed have no such attribute and hold one."""
    return int(attrs.get("views") or 1)


class LogitCache:
    """Read-only view of a teacher-logit cache: teacher outputs by sample index.

    The logit arrays are read into memory on first use (N x C float16 for a full store, N x K for a
    top-k store), since training asks for random rows every batch.
    """

    def __init__(self, url: str, info=None):
        """`info`: the DatasetInfo of the beton the cache must belong to (None: unchecked)."""
        self.url = str(url)
        self.group = open_store(self.url, "r")
        self.attrs = self.group.attrs.asdict()
        if self.attrs.get(KIND) != LOGITS_KIND:
            raise UserError(f"{self.url} is not a teacher-logit cache (make one with kdcache dump)")
        check_schema(self.group, self.url)
        check_complete(self.group, self.url)
        if info is not None:
            check_dataset(self.group, info.train_fingerprint, info.path)
        self.num_samples = int(self.attrs["num_samples"])
        self.num_classes = int(self.attrs["num_classes"])
        self.topk = self.attrs.get("topk")
        self.sample = self.attrs.get("sample")
        self.views = views_of(self.attrs)  # 1: the clean image's outputs
        self.view_recipe = self.attrs.get("view_recipe")  # what a stored view is (views > 1)
        # the temperature a top-k or sampled cache's targets are exact at; None for full logits, which
        # serve any temperature
        self.temperature = self.attrs.get("temperature") if self.topk or self.sample else None
        self.bytes_per_sample = bytes_per_sample(self.group)
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self.group[name][:]
        return self._arrays[name]

    def view_params(self) -> np.ndarray:
        """(N, V, 3) int8 (dy, dx, flip), or an image folder's (N, V, 5) uint16 crops (kdcache.crops): the
        stored views, for the loader to replay (V > 1 only)."""
        return self._array(VIEW_PARAMS)

    def logits(self, indices: np.ndarray) -> np.ndarray:
        """float32 (len(indices), C) rows for `kd_loss`, whose softmax at temperature T is the target;
        (len(indices), V, C), one row per stored view, for a multi-view cache.

        A full store gives the teacher's logits: exact at any T. A top-k store holds the K largest
        log-probabilities of the teacher's distribution at the store's temperature Ts; the target q gives
        those K classes exactly their probabilities and every other class an equal share of the
        remaining mass (the tail's total is exact, its shape is not kept). Rows are Ts * log q, so that
        softmax(row / Ts) = q: a top-k cache serves T = Ts only (the trainer refuses any other). A sampled
        store (`kdcache dump --sample S`) gives q = counts / S of S classes drawn from the teacher at Ts,
        zero elsewhere: an unbiased estimate of the tempered teacher, again served at Ts only."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.sample:
            q = sampled_target(self._array(SAMPLE_CLASSES)[indices], self._array(SAMPLE_COUNTS)[indices],
                               self.num_classes)
            # undrawn classes: a floor far below float16's smallest probability rather than -inf, which the
            # KL's log-target form would turn into 0 * inf
            return (self.temperature * np.log(np.maximum(q, 1e-30))).astype(np.float32)
        if self.topk is None:
            return self._array(LOGITS)[indices].astype(np.float32)
        values = self._array(TOPK_VALUES)[indices].astype(np.float32)
        classes = self._array(TOPK_INDICES)[indices].astype(np.int64)
        rest = 1.0 - np.exp(values).sum(-1, keepdims=True)
        # float16 rounding can push the stored mass to (or past) 1: keep the remainder tiny but positive
        rest = np.log(np.maximum(rest, 1e-12) / (self.num_classes - self.topk))
        out = np.repeat(rest.astype(np.float32), self.num_classes, axis=-1)
        np.put_along_axis(out, classes, values, axis=-1)
        return out * np.float32(self.temperature)

    def sparse_targets(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """A top-k or sampled store's own arrays for these samples, as stored (K per sample, [views,] K with
        views): top-k `classes` and `logp` (float16 log-probabilities at the store's temperature), sampled
        `classes` and `counts` (the target is counts / their sum)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.topk:
            return {"classes": self._array(TOPK_INDICES)[indices], "logp": self._array(TOPK_VALUES)[indices]}
        if self.sample:
            return {"classes": self._array(SAMPLE_CLASSES)[indices], "counts": self._array(SAMPLE_COUNTS)[indices]}
        raise ValueError(f"store {self.url} holds full logits, not sparse targets: read them with logits()")

    def labels(self) -> np.ndarray:
        return self._array(LABELS).astype(np.int64)


def is_complete_cache(url: str) -> bool:
    """Whether `url` holds a complete teacher-logit cache of this layout (what a rerun may skip)."""
    try:
        LogitCache(str(url))
        return True
    except Exception:  # noqa: BLE001  (absent, partial, another kind, older, unreadable: not complete; the
        return False   # dump that redoes it will say why if it cannot)


def bytes_per_sample(group: zarr.Group) -> int:
    """Bytes a student reads per sample, uncompressed: C x 2 (full) or K x (2 + index size) (top-k),
    times V plus V x 3 for the view parameters of a cache of V stored views."""
    names = ((TOPK_VALUES, TOPK_INDICES) if TOPK_VALUES in group else (SAMPLE_CLASSES, SAMPLE_COUNTS)
             if SAMPLE_CLASSES in group else (LOGITS,)) + (VIEW_PARAMS,)
    return int(sum(np.prod(group[n].shape[1:]) * group[n].dtype.itemsize for n in names if n in group))


def describe_store(url: str) -> dict:
    """What `kdcache info` shows, for any kdcache store (a logit cache or a store of scores only)."""
    url = str(url)
    group = open_store(url, "r")
    attrs = group.attrs.asdict()
    manifest = attrs.pop("manifest", None) or {}
    done, total = chunk_status(group)
    arrays = {}
    for path, arr in sorted(_walk_arrays(group)):
        if path in BOOKKEEPING:
            continue
        arrays[path] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks)}
    rows = None  # rows of finished chunks: statistics over unwritten rows would be fill values
    if CHUNKS_DONE in group and done < total:
        flags = group[CHUNKS_DONE][:].astype(bool)
        rows = np.repeat(flags, attrs["chunk_rows"])[: attrs["num_samples"]]
    scores = {}
    for name in score_names(group):
        values = group[SCORES][name][:].astype(np.float32)  # read_score refuses incomplete stores
        values = values if rows is None else values[rows]
        finite = values[np.isfinite(values)]
        stats = ({"min": float(finite.min()), "median": float(np.median(finite)), "max": float(finite.max())}
                 if len(finite) else {"min": None, "median": None, "max": None})
        attrs_of = group[SCORES][name].attrs
        scores[name] = {**stats, "higher_is_harder": bool(attrs_of.get("higher_is_harder", True)),
                        "description": attrs_of.get("description", "")}
    return {
        "url": url,
        "kind": attrs.get(KIND, "scores"),
        "attrs": attrs,
        "dataset": {k: manifest.get(k) for k in ("source", "num_classes", "image_shape", "fingerprint")},
        "arrays": arrays,
        "bytes_per_sample": bytes_per_sample(group) or None,
        "chunks_done": done,
        "chunks_total": total,
        "complete": done == total,
        "scores": scores,
    }


def _walk_arrays(group: zarr.Group, prefix: str = ""):
    for name, arr in group.arrays():
        yield prefix + name, arr
    for name, sub in group.groups():
        yield from _walk_arrays(sub, prefix + name + "/")
