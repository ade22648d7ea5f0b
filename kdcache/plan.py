"""A protocol's stages and their folder names (hashes of each stage's resolved configuration).

Stages and folders
------------------
Every stage's folder name carries a short hash of its fully resolved configuration, including the
names (so hashes) of the stages it depends on: a changed protocol entry gets new folders for itself
and everything downstream, and never reuses a stale result. A stage is done when its completion
marker exists (data: manifest.json; teacher and student: summary.json; dump: a complete cache;
selection: .npy and .json); done stages are skipped and others resumed (`resume=True`
for training, the dump's own chunk resumption). Alpha-0 runs ignore teacher, temperature and online,
and random runs the selection options, so identical runs collapse into one folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import IMAGEFOLDER_FIELDS, SYNTHETIC_FIELDS, DataOptions, DumpOptions, TrainConfig, defaults
from .errors import UserError
from .protocol import (
    CACHE_FORMS,
    DATA_KEYS,
    DUMP_KEYS,
    DYNAMICS_SCORES,
    SELECT_KEYS,
    TEACHER_KEYS,
    Protocol,
    _check_table,
    student_runs,
)

VIEW_DUMP_KEYS = ("views", "view_seed")  # in a dump stage's config only when it stores views

@dataclass
class Stage:
    kind: str                   # data, teacher, dump, selection, student
    name: str                   # path relative to the sweep folder; ends in the config hash
    config: dict                # the fully resolved configuration
    deps: list[Stage] = field(default_factory=list)

    def path(self, root: Path) -> Path:
        return root / self.name


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stage(kind: str, prefix: str, config: dict, deps: list[Stage], suffix: str = "") -> Stage:
    from .train import TRAINER_REVISION

    ident = {"kind": kind, "config": config, "deps": [d.name for d in deps]}
    if kind in ("teacher", "student"):  # runs of another trainer are other runs, never reused
        ident["trainer"] = TRAINER_REVISION
    ident = short_hash(ident)
    return Stage(kind, f"{prefix}-{ident}{suffix}", config, deps)


@dataclass
class Plan:
    protocol: Protocol
    data: Stage
    teachers: dict[str, Stage]
    dumps: dict[str, Stage]     # by teacher name; "<teacher>@<form>" for the other forms (cache_form)
    students: list[Stage]       # in protocol order (the order they run in), no duplicates


def _resolve_data(cfg: dict) -> dict:
    """The data options with the defaults that shape this source's output filled in (so a changed
    default is a new dataset): the generator's for synthetic data, the writer's for image folders."""
    shaping = {"synthetic": SYNTHETIC_FIELDS, "imagefolder": IMAGEFOLDER_FIELDS}.get(cfg["source"], ())
    # other sources' arrays are stored as they are: no option changes the output
    return {**{k: v for k, v in defaults(DataOptions).items() if k in shaping}, **cfg}


def plan(proto: Protocol) -> Plan:
    """Every stage of the protocol, with its dependencies."""
    raw, train_defaults = proto.raw, defaults(TrainConfig)
    data_cfg = _check_table(raw.get("data", {}), DATA_KEYS, f"{proto.path}: [data]")
    if "source" not in data_cfg:
        raise UserError(f"{proto.path}: [data] needs a source")
    data = _stage("data", "data", _resolve_data(data_cfg), [])
    dump_cfg = {**asdict(DumpOptions()), **_check_table(raw.get("dump", {}), DUMP_KEYS,
                                                                   f"{proto.path}: [dump]")}
    dump_cfg.pop("device"), dump_cfg.pop("workers")  # where it runs, not what it computes
    view_cfg = {k: dump_cfg.pop(k) for k in VIEW_DUMP_KEYS}  # single-view caches keep their earlier names
    teachers, dumps = {}, {}
    for name, table in raw["teachers"].items():
        where = f"{proto.path}: [teachers.{name}]"
        cfg = {**{k: train_defaults[k] for k in TEACHER_KEYS}, **_check_table(table, TEACHER_KEYS, where)}
        cfg.update({k: float(v) for k, v in cfg.items() if TEACHER_KEYS.get(k) is float and v is not None})
        teachers[name] = _stage("teacher", f"teacher-{name}", cfg, [data])
        dumps[name] = _stage("dump", f"cache-{name}", dump_cfg, [teachers[name]], ".zarr")
    students: dict[str, Stage] = {}
    selections: dict[str, Stage] = {}
    for run in student_runs(proto):
        form = cache_form(run)
        if form and (key := f"{run['teacher']}@{form}") not in dumps:
            cfg = {**dump_cfg, **(view_cfg if "views" in run else {}), **{k: run[k] for k in CACHE_FORMS if k in run}}
            if "topk" in run or "sample" in run:
                cfg["temperature"] = run["temperature"]  # such targets are exact at one temperature: the student's
            dumps[key] = _stage("dump", f"cache-{run['teacher']}-{form}", cfg, [teachers[run["teacher"]]], ".zarr")
        sel = _selection(run, data, teachers, dumps)
        sel = selections.setdefault(sel.name, sel)
        st = _student(run, data, sel, teachers, dumps)
        students.setdefault(st.name, st)
    return Plan(proto, data, teachers, dumps, list(students.values()))


def _selection(run: dict, data: Stage, teachers: dict, dumps: dict) -> Stage:
    cfg = {k: run[k] for k in ("fraction", "method", "seed", *SELECT_KEYS)}
    deps = [data]
    if run["method"] != "random":
        score = run["ccs_score"] if run["method"] == "ccs" else run["method"]
        deps.append(teachers[run["scores"]] if score in DYNAMICS_SCORES else dumps[run["scores"]])
    return _stage("selection", f"selections/{run['method']}-f{run['fraction']:g}-s{run['seed']}", cfg, deps, ".npy")


def _student(run: dict, data: Stage, sel: Stage, teachers: dict, dumps: dict) -> Stage:
    deps = [data, sel]
    form = cache_form(run)
    if run["teacher"] is not None:
        deps.append(teachers[run["teacher"]] if run["online"] else
                    dumps[f"{run['teacher']}@{form}" if form else run["teacher"]])
    who = "noKD" if run["teacher"] is None else run["teacher"] + ("-online" if run["online"] else "")
    who += f"-{form}" if form else ""
    prefix = f"students/{run['method']}-f{run['fraction']:g}-a{run['alpha']:g}-{who}-s{run['seed']}"
    return _stage("student", prefix, run, deps)


def cache_form(run: dict) -> str:
    """The form of the cache a student reads, in a few characters ("" for the [dump] table's own):
    e.g. views4, top2, sample3, views4-top2."""
    names = {"views": "views", "topk": "top", "sample": "sample"}
    return "-".join(f"{names[k]}{run[k]}" for k in CACHE_FORMS if k in run)


def prerequisites(students: list[Stage]) -> list[Stage]:
    """The stages these students need, each once, dependencies first."""
    seen: dict[str, Stage] = {}

    def visit(stage: Stage) -> None:
        for dep in stage.deps:
            visit(dep)
        if stage.kind != "student":
            seen.setdefault(stage.name, stage)

    for st in students:
        visit(st)
    return list(seen.values())
