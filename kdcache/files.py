"""Writing files so that a crash never leaves one half-written under its final name."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, obj) -> None:
    """JSON via a temporary name and a rename: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
