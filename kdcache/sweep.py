"""`kdcache sweep PROTOCOL`: run every unfinished stage of a study written down as a protocol.

The protocol's format and checks: `kdcache.protocol`; its stages and their folder names: `kdcache.plan`;
here: each stage's status and lock, the runner that builds them, and the command.

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
import json
import math
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import IMAGEFOLDER_FIELDS, SYNTHETIC_FIELDS, DumpConfig
from .errors import UserError
from .files import now, write_json
from .plan import Plan, Stage, plan, prerequisites
from .protocol import (
    SELECT_KEYS,
    TRAIN_KEYS,
    load_protocol,
    normalise,  # noqa: F401  (tests/test_report.py imports it from here; its owner is protocol)
)

SWEEP_JSON, TIMES_LOG = "sweep.json", "stage_times.jsonl"
DIE_AFTER_ENV = "KDCACHE_SWEEP_DIE_AFTER"   # tests: SIGKILL this process during the student after that many


# --- status ----------------------------------------------------------------------------------------

def is_done(stage: Stage, root: Path) -> bool:
    p = stage.path(root)
    if stage.kind == "data":
        return (p / "manifest.json").is_file()
    if stage.kind in ("teacher", "student"):
        return (p / "summary.json").is_file()
    if stage.kind == "selection":
        return p.is_file() and p.with_suffix(".json").is_file()
    from .store import is_complete_cache
    return p.exists() and is_complete_cache(str(p))


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
                 "host": socket.gethostname(), "pid": os.getpid(), "finished": now()}
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
        if crash:  # through kdcache.train's own crash hook: after the student's first epoch
            from .train import DIE_AFTER_ENV as TRAIN_DIE_ENV
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
    options = {k: cfg[k] for k in SYNTHETIC_FIELDS if k in cfg} if cfg["source"] == "synthetic" else {}
    source = load_source(cfg["source"], cfg.get("src"), **options)
    extra = {k: cfg[k] for k in IMAGEFOLDER_FIELDS if k in cfg}
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
    dump(DumpConfig(teacher=teacher.config["arch"], data=_train_beton(runner), out=str(stage.path(runner.root)),
                    checkpoint=str(teacher.path(runner.root) / "model.pt"), workers=runner.workers, overwrite=False,
                    **stage.config, **extra), progress=False)


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
