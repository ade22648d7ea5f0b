"""Zarr stores of per-sample arrays, indexed by the dataset's sample index.

Both the teacher-logit cache (`kdcache dump`) and training-dynamics stores (`--record-dynamics`)
follow these conventions: the root attribute `fingerprint` is the training split's fingerprint from
the dataset manifest, and per-sample difficulty scores live in `scores/<name>` as (N,) float32.
"""
from __future__ import annotations

import numpy as np
import zarr

from .errors import UserError

SCHEMA_VERSION = 1


def open_store(url: str, mode: str = "r") -> zarr.Group:
    """Open a store by path or URL (`file://...`, or any fsspec URL such as `s3://...` when the
    filesystem package is installed)."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    try:
        return zarr.open_group(store=url, mode=mode)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one
        raise UserError(f"no kdcache store at {url}")
    except ImportError as e:
        raise UserError(f"cannot open {url}: {e} (install fsspec and the filesystem's package, e.g. s3fs)")


def check_dataset(group: zarr.Group, info: dict) -> None:
    """Refuse a store made from another dataset than the one `info` (from `dataset_info`) describes."""
    have = group.attrs.get("fingerprint")
    want = info["splits"]["train"]["fingerprint"]
    if have != want:
        raise UserError(f"store {group.store} was made from another dataset (fingerprint {have}, "
                        f"expected {want} for {info['path']})")


def score_names(group: zarr.Group) -> list[str]:
    if "scores" not in group:
        return []
    return sorted(name for name, _ in group["scores"].arrays())


def read_score(group: zarr.Group, name: str) -> np.ndarray:
    names = score_names(group)
    if name not in names:
        raise UserError(f"store {group.store} has no score {name!r}; it has: {', '.join(names) or 'none'}")
    return group["scores"][name][:].astype(np.float32)


def hardness(group: zarr.Group, name: str) -> np.ndarray:
    """The score oriented so that higher means harder (margins, for one, are higher when easier)."""
    values = read_score(group, name)
    return values if group["scores"][name].attrs.get("higher_is_harder", True) else -values


def write_score(group: zarr.Group, name: str, values: np.ndarray, *, higher_is_harder: bool = True,
                description: str = "", chunk_rows: int = 65536) -> None:
    values = np.asarray(values, dtype=np.float32)
    arr = group.require_group("scores").create_array(
        name, shape=values.shape, dtype="float32", chunks=(min(chunk_rows, max(len(values), 1)),),
        overwrite=True)
    arr[:] = values
    arr.attrs.update({"higher_is_harder": higher_is_harder, "description": description})
