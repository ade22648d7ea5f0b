"""`kdcache sweep PROTOCOL`: run every unfinished stage of a study written down as a protocol.

Protocol format (TOML, e.g. `protocols/smoke.toml`)
---------------------------------------------------
    name = "smoke"                 # optional; the sweep folder defaults to runs/<file stem>
    [data]                         # `kdcache data`: source, src, num_train, num_test, num_classes,
    source = "synthetic"           #   image_size, seed (synthetic), max_side, jpeg_quality
    num_train = 400

    [teachers.large]               # a full-data `kdcache train --alpha 0` per teacher, then its dump
    arch = "resnet20"              # training keys (below), seed, record_dynamics
    epochs = 3
    record_dynamics = true         # its own dynamics store: forgetting, el2n_early, dynunc, aum

    [dump]                         # `kdcache dump` options for every teacher: batch_size, chunk_rows, topk,
                                   #   temperature, sample, sample_seed, view_seed

    [defaults]                     # student keys every [[students]] table starts from
    arch = "resnet8"
    seed = [0, 1]

    [[students]]                   # a grid: list values are crossed, scalars apply to every run
    fraction = [0.25, 0.5]
    method = ["random", "el2n", "forgetting", "ccs"]
    alpha = [0, 0.9]

    [report]                       # optional: kd_alpha (the KD cell of the claims, default: the best
                                   #   alpha > 0), headline_fraction (default 0.5)

Student keys: `fraction` and `alpha` (required), `method` (random, ccs or a score; default random),
`temperature`, `seed`, `teacher` (a [teachers] name; default: the first), `online` (run the teacher in
the loop instead of reading its cache), `views`, `topk` and `sample` (read a cache of that form, dumped
once per teacher and form by `kdcache dump --views K / --topk K / --sample S`, at the student's
temperature; default: the [dump] table's cache, full logits of the clean image), `scores` (the
teacher whose cache or dynamics store supplies selection scores, the same for every student so that KD
and no-KD runs share their subsets; default: the first teacher), `keep`, `class_balanced`, `ccs_beta`,
`ccs_strata`, `ccs_score`, and the training keys `arch`, `epochs`, `steps`, `batch_size`, `lr`,
`momentum`, `weight_decay`, `warmup`, `label_smoothing`, `augment`, `eval_every`, `amp`, `compile`,
`bn_batches`. Any student key may be a table keyed by fraction instead of a value, e.g.
`epochs = { "0.1" = 60, "0.5" = 20 }`. A relative `src` is relative to the folder `kdcache sweep` runs
in. Unset training keys take `kdcache train`'s defaults.

Stages and folders
------------------
Every stage's folder name carries a short hash of its fully resolved configuration, including the
names (so hashes) of the stages it depends on: a changed protocol entry gets new folders for itself
and everything downstream, and never reuses a stale result. A stage is finished when its completion
marker exists (data: manifest.json; teacher and student: summary.json; dump: a complete cache;
selection: .npy and .json); finished stages are skipped and unfinished ones resumed (`resume=True`
for training, the dump's own chunk resumption). Alpha-0 runs ignore teacher, temperature and online,
and random runs the selection options, so identical runs collapse into one folder.

Sharding and locking
--------------------
`--shard i/n` runs the students at positions p of the name-sorted student list with p % n == i, and
only the prerequisite stages those need. Each stage is built under an exclusive `fcntl.flock` on
`<stage folder>.lock`; a process re-checks the completion marker once it holds the lock, so a stage
several shards need is built once and reused by the others. A shard first trains the students whose
prerequisites are free and comes back (waiting) for those blocked by another process's lock. A
student whose lock is held elsewhere is left to that process. Locks die with their process, so a
killed shard leaves only unfinished stages behind, which the next sweep resumes.

Progress and times
------------------
Before each student: `[done/total] name  ETA hh:mm:ss`, the time left being the seconds per trained
image (samples x epochs) of every student finished in this sweep folder, by any shard, times the
images still to train ("ETA unknown" until one has finished). Every finished stage appends its
measured seconds to `stage_times.jsonl`; `sweep.json` lists every run for `kdcache report`.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .distill import DEFAULT_TEMPERATURE
from .dump import DumpOptions
from .dynamics import AUM_FRACTION, EARLY_FRACTION
from .errors import UserError
from .files import write_json

SWEEP_JSON, TIMES_LOG = "sweep.json", "stage_times.jsonl"
DIE_AFTER_ENV = "KDCACHE_SWEEP_DIE_AFTER"   # tests: SIGKILL this process during the student after that many
TRAIN_DIE_ENV = "KDCACHE_DIE_AFTER_EPOCH"   # kdcache.train's own crash hook, used by the one above

# Score names of the store layout (README): from the teacher's pass, and from training dynamics.
TEACHER_SCORES = ("loss", "margin", "entropy", "el2n", "grand")
DYNAMICS_SCORES = ("forgetting", "el2n_early", "dynunc", "aum")

TRAIN_KEYS = {"arch": str, "epochs": int, "steps": int, "batch_size": int, "lr": float, "momentum": float,
              "weight_decay": float, "warmup": float, "label_smoothing": float, "augment": bool,
              "eval_every": int, "amp": str, "compile": bool, "bn_batches": int}
SELECT_KEYS = {"keep": str, "class_balanced": bool, "ccs_beta": float, "ccs_strata": int, "ccs_score": str}
STUDENT_KEYS = {"fraction": float, "method": str, "alpha": float, "temperature": float, "seed": int,
                "teacher": str, "online": bool, "views": int, "topk": int, "sample": int, "scores": str,
                **SELECT_KEYS, **TRAIN_KEYS}
TEACHER_KEYS = {**TRAIN_KEYS, "seed": int, "record_dynamics": bool, "el2n_early_fraction": float,
                "aum_fraction": float}
DATA_KEYS = {"source": str, "src": str, "num_train": int, "num_test": int, "num_classes": int,
             "image_size": int, "seed": int, "max_side": int, "jpeg_quality": int, "crop_side": int}
DUMP_KEYS = {"batch_size": int, "chunk_rows": int, "topk": int, "temperature": float, "sample": int,
             "sample_seed": int, "view_seed": int}
VIEW_DUMP_KEYS = ("views", "view_seed")  # in a dump stage's config only when it stores views
CACHE_FORMS = {"views": 1, "topk": 0, "sample": 0}  # student keys choosing a cache's form, and their "none"
REPORT_KEYS = {"kd_alpha": float, "headline_fraction": float, "margin": float}
TOP_KEYS = {"name", "description", "data", "teachers", "dump", "defaults", "students", "report"}
SYNTHETIC_KEYS = ("num_train", "num_test", "num_classes", "image_size", "seed")


# --- the protocol ----------------------------------------------------------------------------------

@dataclass
class Protocol:
    path: Path
    text: str
    sha256: str
    raw: dict


def find_protocol(name: str) -> Path:
    """A protocol file by path, or by bare name under protocols/ (`smoke` -> protocols/smoke.toml)."""
    path = Path(name)
    if not path.is_file() and not path.suffix:
        path = Path("protocols") / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"protocol not found: {name}")
    return path


def load_protocol(name: str | Path) -> Protocol:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as a package
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("reading protocols needs Python 3.11 or later (tomllib), or the tomli package")
    path = find_protocol(str(name))
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}")
    _check_keys(raw, TOP_KEYS, str(path))
    for table in ("data", "teachers", "dump", "defaults", "report"):
        if not isinstance(raw.get(table, {}), dict):
            raise UserError(f"{path}: [{table}] must be a table")
    if not isinstance(raw.get("students", []), list) or not raw.get("students"):
        raise UserError(f"{path}: no [[students]] tables")
    if not raw.get("teachers"):
        raise UserError(f"{path}: no [teachers.NAME] tables")
    for name, table in raw["teachers"].items():
        if not isinstance(table, dict) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise UserError(f"{path}: teachers.{name} must be a table named with letters, digits, - and _ only")
    report = dict(raw.get("report", {}))
    if isinstance(report.get("kd_alpha"), dict):  # one pre-set alpha per fraction
        for key, value in report.pop("kd_alpha").items():
            _float(key, f"{path}: [report] kd_alpha")
            _check_value(f"kd_alpha[{key}]", value, float, f"{path}: [report]")
    _check_table(report, REPORT_KEYS, f"{path}: [report]")
    return Protocol(path, text, hashlib.sha256(text.encode()).hexdigest(), raw)


def _check_keys(table: dict, known, where: str) -> None:
    for key in table:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")


def _check_value(key: str, value, kind: type, where: str) -> None:
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        what = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise UserError(f"{where}: {key} must be {what}, got {value!r}")


def _check_table(table: dict, spec: dict, where: str) -> dict:
    _check_keys(table, spec, where)
    for key, value in table.items():
        _check_value(key, value, spec[key], where)
    return dict(table)


def _defaults() -> dict:
    """`kdcache train`'s and the selection's defaults for the keys a protocol may leave out."""
    import dataclasses

    from .selection import SelectOptions
    from .train import TrainConfig

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    select = asdict(SelectOptions())
    out = {k: train[k] for k in TRAIN_KEYS}
    out.update({k: select[k] for k in SELECT_KEYS})
    out.update(method="random", temperature=train["temperature"], seed=0, online=False)
    return out


def _cross(table: dict) -> Iterator[dict]:
    """Every combination of the list-valued keys; scalars (and by-fraction tables) apply to all."""
    keys = sorted(table)
    values = [v if isinstance(v, list) else [v] for v in (table[k] for k in keys)]
    for combo in itertools.product(*values):
        yield dict(zip(keys, combo))


def _by_fraction(run: dict, where: str) -> dict:
    """Resolve keys given as a table keyed by fraction (e.g. per-fraction epochs)."""
    if isinstance(run["fraction"], dict):
        raise UserError(f"{where}: fraction cannot be keyed by fraction")
    out = dict(run)
    for key, value in run.items():
        if isinstance(value, dict):
            match = [v for k, v in value.items() if _float(k, where) == run["fraction"]]
            if not match:
                raise UserError(f"{where}: {key} has no entry for fraction {run['fraction']:g}")
            out[key] = match[0]
    return out


def _float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a fraction")


def student_runs(proto: Protocol) -> list[dict]:
    """The protocol's student grid, crossed, resolved, checked and normalised (duplicates kept)."""
    raw, defaults = proto.raw, _defaults()
    teachers = list(raw["teachers"])
    base = {**defaults, "teacher": teachers[0], "scores": teachers[0]}
    runs = []
    _check_keys(raw.get("defaults", {}), STUDENT_KEYS, f"{proto.path}: [defaults]")
    for i, table in enumerate(raw["students"], 1):
        where = f"{proto.path}: [[students]] #{i}"
        if not isinstance(table, dict):
            raise UserError(f"{where} is not a table")
        _check_keys(table, STUDENT_KEYS, where)
        for combo in _cross({**raw.get("defaults", {}), **table}):
            for key in ("fraction", "alpha"):
                if key not in combo:
                    raise UserError(f"{where}: {key} is required")
            run = _by_fraction({**base, **combo}, where)
            for key, value in run.items():
                if value is not None:
                    _check_value(key, value, STUDENT_KEYS[key], where)
            if run["method"] == "ccs" and run["ccs_score"] is None:  # as choose_subset would, from the store
                run["ccs_score"] = "aum" if raw["teachers"][run["scores"]].get("record_dynamics") else "el2n"
            _check_run(run, raw["teachers"], where)
            runs.append(normalise(run))
    return runs


def _check_run(run: dict, teachers: dict, where: str) -> None:
    if not 0 < run["fraction"] <= 1:
        raise UserError(f"{where}: fraction must be in (0, 1], got {run['fraction']}")
    if not 0 <= run["alpha"] <= 1:
        raise UserError(f"{where}: alpha must be in [0, 1], got {run['alpha']}")
    for key in ("teacher", "scores"):
        if run[key] not in teachers:
            raise UserError(f"{where}: {key} {run[key]!r} is not one of the teachers ({', '.join(teachers)})")
    score = run["ccs_score"] if run["method"] == "ccs" else run["method"]
    if run["method"] != "random" and score not in TEACHER_SCORES + DYNAMICS_SCORES:
        known = ", ".join(("random", "ccs") + TEACHER_SCORES + DYNAMICS_SCORES)
        raise UserError(f"{where}: unknown method or score {score!r} (known: {known})")
    if score in DYNAMICS_SCORES and run["method"] != "random" and not teachers[run["scores"]].get("record_dynamics"):
        raise UserError(f"{where}: {score} needs training dynamics: set record_dynamics = true on teacher "
                        f"{run['scores']!r} (the scores teacher)")
    if run["keep"] not in ("hard", "easy"):
        raise UserError(f"{where}: keep must be hard or easy, got {run['keep']!r}")


def normalise(run: dict) -> dict:
    """Blank the keys a run does not use, so that runs that train the same way are one run."""
    run = dict(run)
    if run["alpha"] == 0:
        run.update(teacher=None, online=False, temperature=None)
    if run["fraction"] == 1:
        run.update(method="random", class_balanced=False)
    if run["method"] == "random":
        run.update(scores=None, keep=None)
    if run["method"] != "ccs":
        run.update(ccs_beta=None, ccs_strata=None, ccs_score=None)
    else:
        run["keep"] = None
    if run["teacher"] is not None and run["temperature"] is None:
        run["temperature"] = DEFAULT_TEMPERATURE  # what the trainer would use: one run, one folder
    for key, none in CACHE_FORMS.items():  # a key only where such a cache is read: older folders keep names
        value = run.pop(key, None)
        if run["teacher"] is not None and not run["online"] and value not in (None, none):
            run[key] = value
    for key, kind in STUDENT_KEYS.items():  # 4 and 4.0 are one value: one folder
        if kind is float and run.get(key) is not None:
            run[key] = float(run[key])
    return run


# --- stages ----------------------------------------------------------------------------------------

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
    from .beton import convert
    from .sources import make_synthetic

    if cfg["source"] == "synthetic":
        defaults = {k: p.default for k, p in inspect.signature(make_synthetic).parameters.items()}
    elif cfg["source"] == "imagefolder":
        params = inspect.signature(convert).parameters
        defaults = {k: params[k].default for k in ("max_side", "jpeg_quality", "crop_side")}
    else:
        defaults = {}  # arrays stored as they are: no option changes the output
    return {**defaults, **cfg}


def plan(proto: Protocol) -> Plan:
    """Every stage of the protocol, with its dependencies."""
    raw, defaults = proto.raw, _defaults()
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
        cfg = {**{k: defaults[k] for k in TRAIN_KEYS}, "seed": 0, "record_dynamics": False,
               "el2n_early_fraction": EARLY_FRACTION, "aum_fraction": AUM_FRACTION,
               **_check_table(table, TEACHER_KEYS, where)}
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


# --- status ----------------------------------------------------------------------------------------

def is_done(stage: Stage, root: Path) -> bool:
    p = stage.path(root)
    if stage.kind == "data":
        return (p / "manifest.json").is_file()
    if stage.kind in ("teacher", "student"):
        return (p / "summary.json").is_file()
    if stage.kind == "selection":
        return p.is_file() and p.with_suffix(".json").is_file()
    from .store import is_finished_cache
    return p.exists() and is_finished_cache(str(p))


def lock_path(stage: Stage, root: Path) -> Path:
    return root / (stage.name + ".lock")


def status(stage: Stage, root: Path) -> str:
    """done, running (its lock is held by a process), partial (started, unfinished) or todo."""
    if is_done(stage, root):
        return "done"
    lock = lock_path(stage, root)
    if lock.exists():
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                return "running"
    return "partial" if stage.path(root).exists() else "todo"


@contextmanager
def stage_lock(stage: Stage, root: Path, wait: bool) -> Iterator[bool]:
    """Hold the stage's exclusive lock (True), or yield False if another process holds it and not `wait`."""
    with file_lock(lock_path(stage, root), wait) as mine:
        yield mine


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path`. The file stays: removing it would let two processes lock two files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not int(m[1]) < int(m[2]):
        raise UserError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(m[1]), int(m[2])


def shard_of(students: list[Stage], index: int, count: int) -> list[Stage]:
    """The students of shard `index` of `count`: every count-th of the name-sorted list (names do not
    depend on the protocol's order), returned in protocol order, so that the first tables of a
    protocol, its most important, finish first."""
    ordered = sorted(students, key=lambda s: s.name)
    mine = {s.name for p, s in enumerate(ordered) if p % count == index}
    return [s for s in students if s.name in mine]


def read_times(root: Path) -> list[dict]:
    path = root / TIMES_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --- running ---------------------------------------------------------------------------------------

class Runner:
    """Builds stages of one sweep folder under their locks, logs each stage's time, estimates the ETA."""

    def __init__(self, root: Path, plan_: Plan, *, workers: int, device: str, shard: str,
                 echo: Callable[[str], None]):
        self.root, self.plan, self.workers, self.device, self.shard = root, plan_, workers, device, shard
        self.echo = echo
        self.trained = 0
        self.train_size: int | None = None  # training samples, once the data stage is done
        self.die_after = int(os.environ[DIE_AFTER_ENV]) if os.environ.get(DIE_AFTER_ENV) else None

    def ensure(self, stage: Stage, wait: bool) -> bool:
        """Build `stage` and its dependencies unless finished; False if another process holds a lock
        on the way and `wait` is off."""
        if is_done(stage, self.root):
            return True
        if not all(self.ensure(dep, wait) for dep in stage.deps):
            return False
        with stage_lock(stage, self.root, wait) as mine:
            if not mine:
                return False
            if not is_done(stage, self.root):  # another process may have finished it while we waited
                self.echo(f"== {stage.kind} {stage.name}")
                self.timed(stage, lambda: BUILDERS[stage.kind](self, stage))
        return True

    def timed(self, stage: Stage, build: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        build()
        seconds = time.perf_counter() - t0
        entry = {"stage": stage.name, "kind": stage.kind, "seconds": round(seconds, 3),
                 "work": self.work(stage) if stage.kind == "student" else None, "shard": self.shard,
                 "host": socket.gethostname(), "pid": os.getpid(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # one small O_APPEND write: lines from concurrent shards never interleave
        fd = os.open(self.root / TIMES_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)
        if stage.kind != "student":
            self.echo(f"== {stage.kind} {stage.name}: {seconds:.1f} s")

    def work(self, stage: Stage) -> float | None:
        """Images a student trains on (its share of the sweep's work), or None before the data exists."""
        if self.train_size is None:
            manifest = self.plan.data.path(self.root) / "manifest.json"
            if not manifest.is_file():
                return None
            self.train_size = json.loads(manifest.read_text())["splits"]["train"]["size"]
        from .selection import budget
        c = stage.config
        n = budget(c["fraction"], self.train_size)
        return c["steps"] * min(c["batch_size"], n) if c["steps"] else n * c["epochs"]

    def eta(self, pending: list[Stage]) -> str:
        runs = [e for e in read_times(self.root) if e["kind"] == "student" and e.get("work")]
        left = [self.work(s) for s in pending]
        if not runs or None in left:
            return "ETA unknown"
        per_image = sum(e["seconds"] for e in runs) / sum(e["work"] for e in runs)
        return f"ETA {hms(per_image * sum(left))}"

    def run(self, students: list[Stage]) -> dict:
        """Train the unfinished students, building what they need; return what happened to each."""
        outcome = {s.name: "done" for s in students if is_done(s, self.root)}
        todo = [s for s in students if s.name not in outcome]
        for wait in (False, True):  # first whatever is free, then wait for other processes' locks
            blocked = []
            for i, st in enumerate(todo):
                result = self.student(st, wait, students, todo[i:])
                if result == "blocked":
                    blocked.append(st)
                else:
                    outcome[st.name] = result
            todo = blocked
        return outcome

    def student(self, st: Stage, wait: bool, students: list[Stage], pending: list[Stage]) -> str:
        if not all(self.ensure(dep, wait) for dep in st.deps):
            return "blocked"
        with stage_lock(st, self.root, wait=False) as mine:
            if not mine:
                return "elsewhere"
            if is_done(st, self.root):
                return "done"
            done = sum(is_done(s, self.root) for s in students)
            self.echo(f"[{done}/{len(students)}] {st.name.removeprefix('students/')}  {self.eta(pending)}")
            self.timed(st, lambda: self.train_student(st))
        return "trained"

    def train_student(self, st: Stage) -> None:
        crash = self.die_after is not None and self.trained == self.die_after
        if crash:
            os.environ[TRAIN_DIE_ENV] = "1"
        build_student(self, st)
        if crash:  # kdcache.train lost its crash hook: die anyway, between runs
            os.kill(os.getpid(), signal.SIGKILL)
        self.trained += 1


def _train_beton(runner: Runner) -> str:
    return str(runner.plan.data.path(runner.root) / "train.beton")


def build_data(runner: Runner, stage: Stage) -> None:
    from .beton import convert
    from .sources import load_source

    cfg = stage.config
    options = {k: cfg[k] for k in SYNTHETIC_KEYS if k in cfg} if cfg["source"] == "synthetic" else {}
    source = load_source(cfg["source"], cfg.get("src"), **options)
    extra = {k: cfg[k] for k in ("max_side", "jpeg_quality", "crop_side") if k in cfg}
    convert(source, stage.path(runner.root), num_workers=runner.workers, src=cfg.get("src"), **extra)


def build_teacher(runner: Runner, stage: Stage) -> None:
    from .train import TrainConfig, train

    out = stage.path(runner.root)
    cfg = dict(stage.config)
    dynamics = str(out / "dynamics.zarr") if cfg["record_dynamics"] else None
    train(TrainConfig(data=_train_beton(runner), out=str(out), alpha="0", dynamics_store=dynamics,
                      workers=runner.workers, device=runner.device, resume=True, **cfg))


def build_dump(runner: Runner, stage: Stage) -> None:
    from .dump import dump

    teacher = stage.deps[0]
    extra = {} if runner.device == "auto" else {"device": runner.device}
    dump(teacher=teacher.config["arch"], data=_train_beton(runner), out=str(stage.path(runner.root)),
         checkpoint=str(teacher.path(runner.root) / "model.pt"), workers=runner.workers, overwrite=False,
         progress=False, **stage.config, **extra)


def build_selection(runner: Runner, stage: Stage) -> None:
    from .beton import dataset_info
    from .selection import choose_subset, save_selection

    cfg, store = stage.config, None
    if len(stage.deps) > 1:
        source = stage.deps[1]
        store = source.path(runner.root) / "dynamics.zarr" if source.kind == "teacher" else source.path(runner.root)
    options = {k: cfg[k] for k in SELECT_KEYS if cfg[k] is not None}
    indices, sidecar = choose_subset(dataset_info(_train_beton(runner)), cfg["method"], cfg["fraction"],
                                     store=None if store is None else str(store), seed=cfg["seed"], **options)
    save_selection(stage.path(runner.root), indices, sidecar)


def build_student(runner: Runner, stage: Stage) -> None:
    from .train import TrainConfig, train

    c, root = stage.config, runner.root
    teacher = {}
    if c["teacher"] is not None:
        source = stage.deps[2]
        teacher = ({"teacher_online": source.config["arch"], "teacher_checkpoint": str(source.path(root) / "model.pt")}
                   if c["online"] else {"cache": str(source.path(root))})
    if c["temperature"] is not None:  # alpha 0: the trainer's default, unused
        teacher["temperature"] = c["temperature"]
    train(TrainConfig(data=_train_beton(runner), out=str(stage.path(root)), indices=str(stage.deps[1].path(root)),
                      alpha=f"{c['alpha']:g}", seed=c["seed"], workers=runner.workers, device=runner.device,
                      resume=True, **{k: c[k] for k in TRAIN_KEYS}, **teacher))


BUILDERS = {"data": build_data, "teacher": build_teacher, "dump": build_dump, "selection": build_selection,
            "student": build_student}


# --- the command -----------------------------------------------------------------------------------

def sweep_record(p: Plan, root: Path) -> dict:
    """What `kdcache report` reads: the protocol's identity and every run's folder and configuration."""
    return {
        "protocol": str(p.protocol.path), "protocol_sha256": p.protocol.sha256, "protocol_text": p.protocol.text,
        "name": p.protocol.raw.get("name", p.protocol.path.stem), "sweep_dir": str(root),
        "report": p.protocol.raw.get("report", {}), "data": p.data.name,
        "teachers": {n: {"folder": t.name, "cache": p.dumps[n].name, "config": t.config}
                     for n, t in p.teachers.items()},
        "runs": [{"name": s.name.removeprefix("students/"), "folder": s.name, "config": s.config,
                  "stages": [d.name for d in s.deps]} for s in p.students],
    }


def write_record(root: Path, record: dict) -> None:
    """sweep.json, rewritten only when it changes, under a lock: shards that start together would
    otherwise write through the same temporary file."""
    path = root / SWEEP_JSON
    with file_lock(root / (SWEEP_JSON + ".lock")):
        if not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(record, default=str)):
            write_json(path, record)


def dry_run(p: Plan, root: Path, mine: list[Stage], echo: Callable[[str], None]) -> dict:
    """Print every stage this shard needs and each of its students, with their status."""
    statuses = {}
    for st in prerequisites(mine):
        statuses[st.name] = status(st, root)
        if st.kind != "selection":
            echo(f"{statuses[st.name]:<8} {st.kind:<9} {st.name}")
    sels = [s for s in prerequisites(mine) if s.kind == "selection"]
    echo(f"{'':<8} {'selection':<9} {len(sels)} selections, {sum(statuses[s.name] == 'done' for s in sels)} done")
    for st in mine:
        statuses[st.name] = status(st, root)
        echo(f"{statuses[st.name]:<8} {'student':<9} {st.name.removeprefix('students/')}")
    counts = {k: sum(statuses[s.name] == k for s in mine) for k in ("done", "running", "partial", "todo")}
    echo(f"{len(mine)} students in this shard (of {len(p.students)}): "
         + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return statuses


def run_sweep(protocol: str | Path, *, out: str | Path | None = None, shard: str = "0/1", dry: bool = False,
              workers: int = -1, device: str = "auto", echo: Callable[[str], None] = print) -> dict:
    """Run (or with `dry`, list) the unfinished stages of a protocol's sweep; return each student's
    outcome (done, trained, elsewhere) or, dry, each listed stage's status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("kdcache sweep runs one process per shard: start n of them with --shard i/n, not torchrun")
    index, count = parse_shard(shard)
    proto = load_protocol(protocol)
    root = Path(out) if out else Path("runs") / proto.path.stem
    p = plan(proto)
    mine = shard_of(p.students, index, count)
    if dry:
        return dry_run(p, root, mine, echo)
    root.mkdir(parents=True, exist_ok=True)
    write_record(root, sweep_record(p, root))
    runner = Runner(root, p, workers=workers, device=device, shard=f"{index}/{count}", echo=echo)
    t0 = time.perf_counter()
    outcome = runner.run(mine)
    trained = sum(v == "trained" for v in outcome.values())
    elsewhere = [k for k, v in outcome.items() if v == "elsewhere"]
    echo(f"sweep {root}: shard {index}/{count}, {len(mine)} students: {trained} trained now, "
         f"{sum(v == 'done' for v in outcome.values())} done before, {len(elsewhere)} running elsewhere "
         f"({math.ceil(time.perf_counter() - t0)} s)")
    return outcome
