"""Writing files so that a crash never leaves one half-written under its final name."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

TIMESTAMP = "%Y-%m-%dT%H:%M:%S%z"  # local time with its UTC offset, in every record kdcache writes


def now() -> str:
    return time.strftime(TIMESTAMP)


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write to; it becomes `path` (one rename) only when the
    block succeeds, so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_lines(path: str | Path, lines: list[str]) -> None:
    with atomic(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)
