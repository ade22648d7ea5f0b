"""A study's protocol: TOML -> checked tables and the student grid (pure: no torch, no files written).

Protocol format (TOML, e.g. `protocols/smoke.toml`)
---------------------------------------------------
    name = "smoke"                 # optional; the sweep folder defaults to runs/<file stem>
    [data]                         # `kdcache data`'s options (DATA_KEYS)
    source = "synthetic"
    num_train = 400

    [teachers.large]               # a full-data `kdcache train --alpha 0` per teacher, then its dump
    arch = "resnet20"              # training keys (TRAIN_KEYS), seed, the dynamics keys (TEACHER_KEYS)
    epochs = 3
    record_dynamics = true         # its own dynamics store: forgetting, el2n_early, dynunc, aum

    [dump]                         # `kdcache dump`'s options for every teacher (DUMP_KEYS)

    [defaults]                     # student keys every [[students]] table starts from
    arch = "resnet8"
    seed = [0, 1]

    [[students]]                   # a grid: list values are crossed, scalars apply to every run
    fraction = [0.25, 0.5]
    method = ["random", "el2n", "forgetting", "ccs"]
    alpha = [0, 0.9]

    [report]                       # optional: kd_alpha (the KD cell of the claims; without it only a
                                   #   single alpha > 0 is one), headline_fraction (0.5), margin (1.0)

Student keys: `fraction` and `alpha` (required), `method` (random, ccs or a score; default random),
`temperature`, `seed`, `teacher` (a [teachers] name; default: the first), `online` (run the teacher in
the loop instead of reading its cache), `views`, `topk` and `sample` (read a cache of that form, dumped
once per teacher and form by `kdcache dump --views K / --topk K / --sample S`, at the student's
temperature; default: the [dump] table's cache, full logits of the clean image), `scores` (the
teacher whose cache or dynamics store supplies selection scores, the same for every student so that KD
and no-KD runs share their subsets; default: the first teacher), the selection keys (SELECT_KEYS) and
the training keys (TRAIN_KEYS). Each key table below is derived from the option's one declaration, a
field of `kdcache.config`, so a key has its command's name, type and default (`kdcache train --help`
lists them). Any student key may be a table keyed by fraction instead of a value, e.g.
`epochs = { "0.1" = 60, "0.5" = 20 }`. A relative `src` is relative to the folder `kdcache sweep` runs
in. Unset training keys take `kdcache train`'s defaults.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import (
    DEFAULT_TEMPERATURE,
    DataOptions,
    DumpOptions,
    SelectOptions,
    TrainConfig,
    default_ccs_score,
    defaults,
    protocol_keys,
)
from .errors import UserError
from .store import DYNAMICS_SCORE_NAMES as DYNAMICS_SCORES
from .store import TEACHER_SCORE_NAMES as TEACHER_SCORES

# The key tables: every key's name and type comes from its field in kdcache.config.
TRAIN_KEYS = protocol_keys(TrainConfig, "train")
SELECT_KEYS = protocol_keys(SelectOptions, "select")
CACHE_FORMS = {k: getattr(DumpOptions(), k) for k in ("views", "topk", "sample")}  # a cache's form; their "none"
STUDENT_KEYS = {**protocol_keys(SelectOptions, "student"), **protocol_keys(TrainConfig, "student"),
                "alpha": float,  # a number here; `kdcache train --alpha` also takes "auto"
                "teacher": str, "online": bool, "scores": str, **{k: int for k in CACHE_FORMS},
                **SELECT_KEYS, **TRAIN_KEYS}
TEACHER_KEYS = {**TRAIN_KEYS, "seed": int, **protocol_keys(TrainConfig, "teacher")}
DATA_KEYS = protocol_keys(DataOptions, "data")
DUMP_KEYS = protocol_keys(DumpOptions, "dump")
REPORT_KEYS = {"kd_alpha": float, "headline_fraction": float, "margin": float}
TOP_KEYS = {"name", "description", "data", "teachers", "dump", "defaults", "students", "report"}

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
    train, select = defaults(TrainConfig), defaults(SelectOptions)
    out = {k: train[k] for k in TRAIN_KEYS}
    out.update({k: select[k] for k in SELECT_KEYS})
    out.update(method=select["method"], temperature=train["temperature"], seed=train["seed"], online=False)
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
                run["ccs_score"] = default_ccs_score(bool(raw["teachers"][run["scores"]].get("record_dynamics")))
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
