"""`kdcache sweep` and `kdcache report` on the `smoke` protocol.

One sweep is shared by the module: shard 1/2 runs in a subprocess that is SIGKILLed in the middle of
its third student while shard 0/2 runs in this process at the same time (so the two contend for the
prerequisite stages' locks); then shard 1/2 is run again and must finish exactly what is missing.
"""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, SUBPROCESS_TIMEOUT, run_cli

from kdcache.stats import Noise
from kdcache.sweep import DIE_AFTER_ENV, load_protocol, plan, read_times, shard_of

PROTOCOL = ROOT / "protocols" / "smoke.toml"


def student_state(out: Path, stage) -> str:
    folder = out / stage.name
    if (folder / "summary.json").is_file():
        return "done"
    return "partial" if folder.exists() else "absent"


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    if "numba" not in sys.modules:
        # numba's TBB thread pool hangs at interpreter exit under a one-core CPU affinity (taskset -c 1)
        # once FFCV's beton writer has used it; its OpenMP layer does not (read when numba is imported)
        os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
    env = {**os.environ, DIE_AFTER_ENV: "2", "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "kdcache_cli.main", "sweep", str(PROTOCOL), "--out", str(out),
                               "--shard", "1/2", "--workers", "1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        first = run_cli("sweep", PROTOCOL, "--out", out, "--shard", "0/2", "--workers", 1)
        killed_log, _ = killed.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        killed.kill()
    assert killed.returncode == -9, killed_log[-3000:]
    students = plan(load_protocol(PROTOCOL)).students
    state = {s.name: student_state(out, s) for s in students}
    partial = [n for n, v in state.items() if v == "partial"]
    first_line = (out / partial[0] / "metrics.jsonl").read_text().splitlines()[0] if partial else None
    checkpoint = bool(partial) and (out / partial[0] / "last.pt").is_file()
    before = {n: mtimes(out / n) for n, v in state.items() if v == "done"}
    dry = run_cli("sweep", PROTOCOL, "--out", out, "--dry-run").output
    resumed = run_cli("sweep", PROTOCOL, "--out", out, "--shard", "1/2", "--workers", 1).output
    return SimpleNamespace(out=out, students=students, first=first.output, killed_log=killed_log, state=state,
                           partial=partial, first_line=first_line, checkpoint=checkpoint, before=before, dry=dry,
                           resumed=resumed)


@pytest.mark.slow
def test_killed_sweep_resumes_and_leaves_finished_runs_alone(swept):
    shard0 = {s.name for s in shard_of(swept.students, 0, 2)}
    shard1 = [s.name for s in shard_of(swept.students, 1, 2)]
    # at the kill: shard 0 finished, shard 1 had two students finished and one killed mid-run
    assert all(swept.state[n] == "done" for n in shard0)
    assert sorted(swept.state[n] for n in shard1).count("done") == 2
    assert len(swept.partial) == 1 and swept.partial[0] in shard1
    assert swept.checkpoint  # killed after its first epoch's checkpoint
    # after the rerun: everything finished, nothing finished before was touched
    assert all(student_state(swept.out, s) == "done" for s in swept.students)
    for name, files in swept.before.items():
        assert mtimes(swept.out / name) == files, name
    # the killed run was resumed from its checkpoint, not restarted: its first epoch's line is kept
    metrics = (swept.out / swept.partial[0] / "metrics.jsonl").read_text().splitlines()
    assert metrics[0] == swept.first_line and len(metrics) == 2
    assert "[2/21]" in swept.resumed and "ETA" in swept.resumed


@pytest.mark.slow
def test_two_shards_run_every_student_exactly_once(swept):
    log = [e for e in read_times(swept.out) if e["kind"] == "student"]
    names = [e["stage"] for e in log]
    assert sorted(names) == sorted(s.name for s in swept.students)  # each once, none twice
    for index in (0, 1):
        ran = {e["stage"] for e in log if e["shard"] == f"{index}/2"}
        assert ran == {s.name for s in shard_of(swept.students, index, 2)}
    prerequisites = [e["stage"] for e in read_times(swept.out) if e["kind"] in ("data", "teacher", "dump")]
    assert len(prerequisites) == len(set(prerequisites)) == 5  # data, 2 teachers, 2 dumps: built once
    assert "ETA unknown" in swept.first and "ETA 00:" in swept.first


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(swept):
    before, log = mtimes(swept.out), read_times(swept.out)
    result = run_cli("sweep", PROTOCOL, "--out", swept.out, "--workers", 1)
    assert "42 students: 0 trained now, 42 done before" in result.output
    assert read_times(swept.out) == log
    assert mtimes(swept.out) == before  # sweep.json too: rewritten only when the protocol changes


@pytest.mark.slow
def test_dry_run_lists_statuses(swept):
    assert "42 students in this shard (of 42): 23 done, 0 running, 1 partial, 18 todo" in swept.dry
    assert f"partial  student   {swept.partial[0].removeprefix('students/')}" in swept.dry
    for kind in ("data", "teacher", "dump"):
        assert f"done     {kind}" in swept.dry
    now = run_cli("sweep", PROTOCOL, "--out", swept.out, "--dry-run", "--shard", "1/2").output
    assert "21 students in this shard (of 42): 21 done, 0 running, 0 partial, 0 todo" in now


@pytest.mark.slow
def test_changed_protocol_entry_gets_new_folders(swept, tmp_path):
    text = PROTOCOL.read_text()
    old = plan(load_protocol(PROTOCOL))
    changed = tmp_path / "smoke.toml"
    changed.write_text(text.replace('[teachers.large]\narch = "resnet20"\nepochs = 3', '[teachers.large]\n'
                                    'arch = "resnet20"\nepochs = 4'))
    new = plan(load_protocol(changed))
    assert new.data.name == old.data.name and new.teachers["small"].name == old.teachers["small"].name
    assert new.teachers["large"].name != old.teachers["large"].name
    assert new.dumps["large"].name != old.dumps["large"].name
    renamed = {s.name.rsplit("-", 1)[0]: s.name for s in new.students}  # the name without its hash
    for s in old.students:
        assert (renamed[s.name.rsplit("-", 1)[0]] == s.name) == (s.config["teacher"] != "large"), s.name

    changed.write_text(text.replace("fraction = 1.0\nalpha = 0\n", "fraction = 1.0\nalpha = 0\nepochs = 3\n"))
    new = {s.name for s in plan(load_protocol(changed)).students}
    gone = {s.name for s in old.students} - new
    assert len(gone) == len(new - {s.name for s in old.students}) == 2
    assert all("random-f1-a0" in n for n in gone)
    dry = run_cli("sweep", changed, "--out", swept.out, "--dry-run").output
    assert "42 students in this shard (of 42): 40 done, 0 running, 0 partial, 2 todo" in dry


def direct_cells(out: Path) -> dict[str, dict]:
    """Cells computed straight from the run folders: runs grouped by every setting but the seed."""
    cells: dict[str, dict] = {}
    for run in json.loads((out / "sweep.json").read_text())["runs"]:
        key = json.dumps({k: v for k, v in run["config"].items() if k != "seed"}, sort_keys=True)
        summary = json.loads((out / run["folder"] / "summary.json").read_text())
        cell = cells.setdefault(key, {"folders": set(), "acc": []})
        cell["folders"].add(run["folder"])
        cell["acc"].append(summary["test_acc"])
    return cells


@pytest.mark.slow
def test_report_numbers_equal_a_direct_computation(swept, tmp_path):
    result = run_cli("report", swept.out, "--out", tmp_path)
    assert result.output.count("claim ") == 8
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    cells = list(csv.DictReader((tmp_path / "cells.csv").open()))
    assert len(rows) == 42 and all(r["finished"] == "True" for r in rows)
    folders_of = {c["cell"]: {r["folder"] for r in rows if r["cell"] == c["cell"]} for c in cells}
    direct = {frozenset(d["folders"]): d["acc"] for d in direct_cells(swept.out).values()}
    assert len(cells) == len(direct) == 21
    md = (tmp_path / "report.md").read_text()
    for c in cells:
        acc = direct[frozenset(folders_of[c["cell"]])]
        assert int(c["n"]) == len(acc) == 2
        assert math.isclose(float(c["test_acc_mean"]), np.mean(acc), abs_tol=1e-12)
        assert math.isclose(float(c["test_acc_std"]), np.std(acc, ddof=1), abs_tol=1e-12)
        assert f"{100 * np.mean(acc):.2f} ± {100 * np.std(acc, ddof=1):.2f}" in md

    verdicts = json.loads((tmp_path / "verdicts.json").read_text())
    assert [c["id"] for c in verdicts["claims"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    by_id = {c["id"]: c for c in verdicts["claims"]}
    # the KD cell of every claim is the protocol's kd_alpha 0.9: 8 method cells + the small teacher's
    assert len(by_id[1]["comparisons"]) == 9 and len(by_id[2]["comparisons"]) == 6
    assert all("alpha 0.9" in c["label"] for c in by_id[1]["comparisons"])
    assert by_id[1]["judged_on"] == "large" and set(by_id[1]["by_teacher"]) == {"large", "small"}
    # claim 3 needs two alphas above 0 at both the smallest and the largest fraction: smoke has 0.9 only at 0.5
    assert by_id[3]["comparisons"] == [] and by_id[3]["verdict"] == "not measured"
    assert len(by_id[4]["comparisons"]) == 1
    # the headline, then its controls: 50% with KD vs without, 50% without KD vs 100% without
    assert [c["in_verdict"] for c in by_id[5]["comparisons"]] == [True, False, False]
    assert "0.5 without KD vs 100% without KD" in by_id[5]["comparisons"][2]["label"]
    assert len(by_id[6]["comparisons"]) == 1
    # the noise: pooled over the 21 cells of 2 seeds each, 21 degrees of freedom
    accs = [np.array(d["acc"]) for d in direct_cells(swept.out).values()]
    pooled = math.sqrt(sum(np.var(a, ddof=1) for a in accs) / len(accs))
    assert verdicts["noise"]["df"] == 21 and math.isclose(verdicts["noise"]["sd"], pooled, rel_tol=1e-9)
    noise = Noise(verdicts["noise"]["sd"], verdicts["noise"]["df"])
    for claim in verdicts["claims"]:
        assert f"| {claim['id']} | {claim['claim']} | {claim['test']} | **{claim['verdict']}**" in md
        for comp in claim["comparisons"]:
            if "a_acc" in comp:  # each comparison's interval follows from its cells and the pooled noise
                se = noise.sd * math.sqrt(1 / comp["a_acc"]["n"] + 1 / comp["b_acc"]["n"])
                assert math.isclose(comp["se"], se, rel_tol=1e-9)
                assert comp["ci95"][1] - comp["ci95"][0] == pytest.approx(2 * 2.0796 * se, rel=1e-3)  # t(0.975, 21)
    headline = by_id[5]["comparisons"][0]
    cell_ids = {c["cell"]: folders_of[c["cell"]] for c in cells}
    assert math.isclose(headline["diff"], np.mean(direct[frozenset(cell_ids[headline["a"]])])
                        - np.mean(direct[frozenset(cell_ids[headline["b"]])]), abs_tol=1e-12)
    assert verdicts["times"]["by_kind"]["student"]["stages"] == 42 and "## Measured run times" in md
    header = next(csv.reader((tmp_path / "results.csv").open()))
    assert len(header) == len(set(header)) and "teacher_test_acc" in header
    teachers = list(csv.DictReader((tmp_path / "teachers.csv").open()))
    assert {t["teacher"] for t in teachers} == {"small", "large"}
    assert all(0 < float(t["test_acc"]) <= 1 for t in teachers)
    for png in ("accuracy_vs_fraction.png", "intervals.png", "cached_vs_online.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["sweep", "no-such-protocol"], "protocol not found"),
    (["sweep", PROTOCOL, "--shard", "2/2"], "--shard must be i/n"),
    (["sweep", PROTOCOL, "--shard", "x"], "--shard must be i/n"),
    (["sweep", PROTOCOL, "--shard", "0/0"], "--shard must be i/n"),
    (["report", "/nonexistent/sweep"], "sweep folder not found"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    lines = [line for line in run_cli(*args, expect=2).output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("old, new, message", [
    ("lr = 0.05\neval_every", "lr = 0.05\nlearning_rate = 1\neval_every", "unknown key 'learning_rate'"),
    ('teacher = "large"', 'teacher = "huge"', "teacher 'huge' is not one of the teachers"),
    ('"forgetting", "ccs"]', '"forgetting", "ccs", "nonsense"]', "unknown method or score 'nonsense'"),
    ("record_dynamics = true", "record_dynamics = false", "forgetting needs training dynamics"),
    ("alpha = 0.5", "alpha = 1.5", "alpha must be in [0, 1]"),
    ("epochs = 2\n", 'epochs = "two"\n', "epochs must be an integer"),
    ("epochs = 2\n", 'epochs = { "0.25" = 2 }\n', "epochs has no entry for fraction 0.5"),
    ("[data]", "[data\n", "not valid TOML"),
    ("headline_fraction = 0.5", "headline = 0.5", "[report]: unknown key 'headline'"),
])
def test_bad_protocol_is_one_line_and_exit_2(tmp_path, old, new, message):
    text = PROTOCOL.read_text()
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    lines = [line for line in run_cli("sweep", bad, "--dry-run", "--out", tmp_path / "x", expect=2).output.splitlines()
             if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_per_fraction_epochs_resolve_by_fraction(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text(PROTOCOL.read_text().replace("epochs = 2\n", 'epochs = { "0.25" = 3, "0.5" = 2, "1.0" = 1 }\n'))
    epochs = {(s.config["fraction"], s.config["epochs"]) for s in plan(load_protocol(bad)).students}
    assert epochs == {(0.25, 3), (0.5, 2), (1.0, 1)}


def test_the_documented_paper_style_protocol_expands(tmp_path):
    """docs/studies.md's example: real data, two teachers, per-fraction epochs, online students."""
    readme = (ROOT / "docs" / "studies.md").read_text()
    example = tmp_path / "paper.toml"
    example.write_text(readme.split("```toml\n", 1)[1].split("```", 1)[0])
    p = plan(load_protocol(example))
    assert p.data.config == {"source": "cifar10", "src": "../shared/datasets/cifar10"}
    assert len(p.students) == 3 * 5 * 4 * 3 + 3 + 3
    assert {(s.config["fraction"], s.config["epochs"]) for s in p.students} == {(0.1, 60), (0.3, 40), (0.5, 30),
                                                                                (1.0, 20)}
    online = [s for s in p.students if s.config["online"]]
    assert len(online) == 3 and all(s.deps[2] is p.teachers["resnet56"] for s in online)
    ccs = [s for s in p.students if s.config["method"] == "ccs"]
    assert all(s.deps[1].deps[1] is p.teachers["resnet56"] for s in ccs)  # forgetting: the dynamics store
    assert p.teachers["resnet20"].config["augment"] is True and p.teachers["resnet56"].config["lr"] == 0.1


def test_students_with_views_read_their_own_cache(tmp_path):
    text = PROTOCOL.read_text()
    table = "[[students]]\nfraction = 0.25\nalpha = 0.9\naugment = true\nonline = [false, true]\n"
    assert table in text
    changed = tmp_path / "views.toml"
    changed.write_text(text.replace(table, table + "views = [1, 4]\n"))
    old, new = plan(load_protocol(PROTOCOL)), plan(load_protocol(changed))
    assert {s.name for s in new.students} - {s.name for s in old.students} == {
        s.name for s in new.students if s.config.get("views") == 4}  # views = 1: the same runs as before
    multi = [s for s in new.students if s.config.get("views") == 4]
    dump = new.dumps["large@views4"]
    assert len(multi) == 2 and all(s.deps[2] is dump and "-large-views4-" in s.name for s in multi)
    assert dump.name.startswith("cache-large-views4-") and dump.config["views"] == 4
    assert dump.config["view_seed"] == 0 and dump.deps == [new.teachers["large"]]
    assert "views" not in new.dumps["large"].config and new.dumps["large"].name == old.dumps["large"].name
    assert not any("views" in s.config for s in new.students if s.config["online"])


def test_sparse_target_students_read_their_own_caches(tmp_path):
    """Students with topk / sample read caches of that form, dumped at their temperature (claim 8's
    verdicts: tests/test_report.py)."""
    text = PROTOCOL.read_text()
    table = "[[students]]\nfraction = 0.25\nalpha = 0.5\n"
    assert table in text
    changed = tmp_path / "sparse.toml"
    changed.write_text(text.replace(table, table + "\n" + table + "topk = [1, 2]\ntemperature = 2.0\n\n"
                                    + table + "sample = 3\n"))
    p = plan(load_protocol(changed))
    top2, sampled = p.dumps["large@top2"], p.dumps["large@sample3"]
    assert top2.name.startswith("cache-large-top2-") and top2.config["topk"] == 2
    assert top2.config["temperature"] == 2.0  # the student's: such targets are exact at one temperature
    assert sampled.config["sample"] == 3 and sampled.config["temperature"] == 4.0 and "views" not in top2.config
    assert set(p.dumps) == {"small", "large", "large@top1", "large@top2", "large@sample3"}
    assert sum(s.deps[-1] is top2 for s in p.students) == 2  # two seeds



