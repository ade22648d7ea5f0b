"""A training run's folder: the files that mark its state (a checkpoint while it runs, a summary once
finished, the metrics it has logged) and the rule deciding what `kdcache train` does with a folder that
already holds a run. Read by the trainer, the demo and the tests alike."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import TrainConfig
from .errors import UserError

SUMMARY, METRICS, CHECKPOINT = "summary.json", "metrics.jsonl", "last.pt"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def check_out(cfg: TrainConfig) -> dict | None:
    """Nothing lost on a crash, nothing overwritten by accident: a run already in --out is resumed or
    returned (--resume), started over (--overwrite), or else refused. Returns a finished run's summary."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise UserError("give either --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder")
    if (out / SUMMARY).is_file():
        if cfg.resume:
            _check_same_options(cfg, out)
            return json.loads((out / SUMMARY).read_text())
        if not cfg.overwrite:
            raise UserError(f"{out} holds a finished run: pass --overwrite to train it again, or choose another --out")
    elif (out / CHECKPOINT).is_file() and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} holds a killed run: pass --resume to continue it, or --overwrite to start over")
    return None


# options that do not change what a run computes: a resumed run may change them
NOT_RESULTS = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("result") is False}


def _check_same_options(cfg: TrainConfig, out: Path) -> None:
    """--resume returns a finished run only if it ran with these options: never a stale result."""
    try:
        recorded = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # a summary without its config: nothing to compare against
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in NOT_RESULTS and f.name in recorded
              and recorded[f.name] != getattr(cfg, f.name)]
    if differ:
        raise UserError(f"{out} holds a finished run with other options ({', '.join(differ)}); pass --overwrite "
                        "to train it again, or choose another --out")
