"""`kdcache report`: a sweep's run folders turned into tables, plots and verdicts on the paper's claims.

Inputs: `sweep.json` (each run's folder and protocol-level configuration, written by `kdcache sweep`),
each run's `config.json` and `summary.json`, the teachers' `summary.json`, and `stage_times.jsonl`.
Outputs in `--out` (default `<sweep>/report`): `report.md`, `results.csv` (one row per run), `cells.csv`
(one row per cell), `teachers.csv`, `pairs.csv` (every pair within a family), `verdicts.json`, and PNG
plots. The statistics are `kdcache.stats`'s, the claims `kdcache.claims`'s.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

from . import claims as claims_
from . import stats as stats_
from .claims import ORDER, Cell, Context, make_cells
from .errors import UserError
from .files import atomic, write_json, write_lines
from .stats import FAILS, HOLDS, LEVEL, MARGIN_POINTS, WORSE, Noise, Stats, critical, detectable


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_sweep(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """sweep.json and every run, with its summary (None while unfinished) and train config."""
    record = _read_json(sweep_dir / "sweep.json")
    if record is None:
        raise UserError(f"no sweep.json in {sweep_dir}: run kdcache sweep first")
    runs = []
    for run in record["runs"]:
        folder = sweep_dir / run["folder"]
        runs.append({**run, "summary": _read_json(folder / "summary.json"),
                     "train_config": _read_json(folder / "config.json") or {}})
        _check_belongs(runs[-1], folder)
    return record, runs


def load_results(folder: Path) -> tuple[dict, list[dict]]:
    """A committed report folder (results.csv + protocol.toml, no run folders) read back as a sweep record and
    its runs, so that a report can be regenerated under a new rule without rerunning anything."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    with open(folder / "results.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    first = header.index("finished")  # the run's configuration sits between seed and finished
    text = (folder / "protocol.toml").read_text() if (folder / "protocol.toml").is_file() else ""
    protocol = tomllib.loads(text) if text else {}
    record = {"name": protocol.get("name", folder.name), "protocol": str(folder / "protocol.toml"),
              "protocol_sha256": hashlib.sha256(text.encode()).hexdigest(), "protocol_text": text,
              "report": protocol.get("report", {}), "teachers": {}, "runs": []}
    runs = []
    for row in rows:
        value = dict(zip(header, map(_parse, row)))   # a repeated column name keeps its last (trained) value
        config = {k: _parse(v) for k, v in zip(header[3:first], row[3:first]) if k not in ("cell", "teacher_test_acc")}
        config.setdefault("epochs", value.get("epochs"))  # the new layout keeps the trained epochs only
        summary = {k: value[k] for k in (*RUN_METRICS, *TRAINED) if k in value} if value["finished"] else None
        runs.append({"name": row[0], "folder": row[1], "config": config, "summary": summary,
                     "train_config": {"device": value.get("device")}})
    return record, runs


def load_teachers(folder: Path) -> dict:
    """A committed report folder's teachers.csv read back ({} without one), so that a report regenerated from
    results.csv keeps the teachers' sizes (claim 4) and accuracies."""
    if not (folder / "teachers.csv").is_file():
        return {}
    with open(folder / "teachers.csv", newline="") as f:
        return {row["teacher"]: {k: _parse(v) for k, v in row.items() if k != "teacher"} for row in csv.DictReader(f)}


def _parse(text: str):
    if text in ("", "None"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _check_belongs(run: dict, folder: Path) -> None:
    """Refuse a run folder whose own record disagrees with the sweep's (a copied or moved folder)."""
    have, want = run["train_config"], run["config"]
    if have and (have.get("seed") != want["seed"] or
                 not math.isclose(have.get("alpha_resolved", want["alpha"]), want["alpha"])):
        raise UserError(f"{folder}/config.json (seed {have.get('seed')}, alpha {have.get('alpha_resolved')}) "
                        f"does not match sweep.json (seed {want['seed']}, alpha {want['alpha']})")


def teachers(sweep_dir: Path, record: dict) -> dict[str, dict]:
    """Each teacher's schedule, parameters (counted in its checkpoint) and test accuracy, once trained."""
    import torch

    out = {}
    for name, t in record["teachers"].items():
        folder = sweep_dir / t["folder"]
        summary, row = _read_json(folder / "summary.json"), {"arch": t["config"]["arch"]}
        if summary is None or not (folder / "model.pt").is_file():
            continue
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
        row["parameters"] = sum(v.numel() for k, v in state.items()
                                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        row.update({k: summary.get(k) for k in ("epochs", "steps", "test_acc", "train_seconds")})
        out[name] = row
    return out


def _main_teacher(record: dict) -> str | None:
    """The protocol's default KD teacher: [defaults] teacher, else the first [teachers] table."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    defaults = tomllib.loads(record.get("protocol_text") or "").get("defaults", {})
    return defaults.get("teacher") or next(iter(record["teachers"]), None)


def context(record: dict, cells: list[Cell], sizes: dict[str, int], margin_points: float | None = None) -> Context:
    options = record.get("report", {})
    kd_alpha = options.get("kd_alpha")
    if isinstance(kd_alpha, dict):
        kd_alpha = {float(f): float(a) for f, a in kd_alpha.items()}
    margin = options.get("margin", MARGIN_POINTS) if margin_points is None else margin_points
    return Context(Noise.pooled([c.acc for c in cells]), margin / 100, kd_alpha, options.get("headline_fraction", 0.5),
                   sizes, _main_teacher(record))


# --- times -----------------------------------------------------------------------------------------

def stage_times(sweep_dir: Path, record: dict) -> dict:
    """Measured seconds per stage kind, of this protocol's stages only (the log also holds stages of
    earlier versions of the protocol or trainer, whose folders it no longer uses)."""
    from .sweep import read_times

    current = {record["data"], *(s for r in record["runs"] for s in (r["folder"], *r["stages"])),
               *(t[k] for t in record["teachers"].values() for k in ("folder", "cache"))}
    rows = [r for r in read_times(sweep_dir) if r["stage"] in current]
    kinds: dict[str, dict] = {}
    for r in rows:
        k = kinds.setdefault(r["kind"], {"stages": 0, "seconds": 0.0})
        k["stages"] += 1
        k["seconds"] += r["seconds"]
    slow = {r["stage"]: r["seconds"] for r in rows if r["kind"] in ("data", "teacher", "dump")}
    return {"by_kind": kinds, "stages": slow, "total_seconds": sum(r["seconds"] for r in rows)}


# --- plots ---------------------------------------------------------------------------------------

def plot_all(out: Path, cells: list[Cell], claims: list[dict]) -> list[str]:
    """Write the plots there is data for; return their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    online = next((c["comparisons"] for c in claims if c["test"] == "matches or beats" and
                   any("images_per_sec" in x for x in c["comparisons"])), [])
    for name, draw in (("accuracy_vs_fraction.png", lambda ax: _plot_accuracy(ax, cells)),
                       ("intervals.png", lambda ax: _plot_intervals(ax, claims)),
                       ("cached_vs_online.png", lambda ax: _plot_cached_online(ax, online))):
        rows = sum(len(c["comparisons"]) for c in claims) if name == "intervals.png" else 0
        fig, ax = plt.subplots(figsize=(10, 4.6) if not rows else (10, 1.5 + 0.22 * rows), dpi=110)
        if draw(ax):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            fig.tight_layout()
            with atomic(out / name) as tmp:
                fig.savefig(tmp, format="png")
            written.append(name)
        plt.close(fig)
    return written


def _plot_accuracy(ax, cells: list[Cell]) -> bool:
    lines: dict[tuple, dict[float, Cell]] = {}
    archs = Counter(c.fields.get("arch") for c in cells)
    main_arch = archs.most_common(1)[0][0] if archs else None
    for c in claims_.cached(cells):  # each point: the best cell of its method, KD teacher and fraction
        if c.fields.get("arch") != main_arch:  # one student network: another's points would mix into the lines
            continue
        points = lines.setdefault((c["method"], c["teacher"] if c["alpha"] > 0 else None), {})
        if c["fraction"] not in points or c.acc.mean > points[c["fraction"]].acc.mean:
            points[c["fraction"]] = c
    methods = sorted({m for m, _ in lines})
    teachers_ = sorted({t for _, t in lines if t is not None})
    for (method, teacher), points in sorted(lines.items(), key=str):
        fs = sorted(points)
        # colour: the method; line: no KD dashed, each teacher its own marker and line style
        style = ("--", "s") if teacher is None else (("-", ":", "-.")[teachers_.index(teacher) % 3],
                                                   "o^vD"[teachers_.index(teacher) % 4])
        ax.errorbar(fs, [100 * points[f].acc.mean for f in fs], yerr=[100 * (points[f].acc.std or 0) for f in fs],
                    color=f"C{methods.index(method) % 10}", ls=style[0], marker=style[1],
                    capsize=3, label=f"{method}, " + ("no KD" if teacher is None else f"KD from {teacher}"))
    ax.set(xlabel="kept fraction", ylabel="test accuracy (%)", xscale="log",
           title=f"{main_arch} students: test accuracy against kept fraction (best cell per point, mean ± std)")
    fractions = sorted({f for points in lines.values() for f in points})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    return bool(lines)


def _plot_intervals(ax, claims: list[dict]) -> bool:
    """Every comparison of every claim as its 95% interval, the non-inferiority margin marked."""
    rows = [(f"{c['id']}: {x['label']}"[:80], x) for c in claims for x in c["comparisons"]
            if x.get("ci95") and None not in x["ci95"]]
    for i, (_, x) in enumerate(rows):
        colour = {HOLDS: "C2", FAILS: "C3", WORSE: "C1"}.get(x["verdict"], "C7")
        ax.plot([100 * v for v in x["ci95"]], [i, i], color=colour, lw=2)
        ax.plot([100 * x["diff"]], [i], "o", color=colour, ms=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=6)
    ax.set(xlabel="A − B, accuracy points (95% interval)",
           title="each claim's comparisons (green holds, red does not hold, orange worse within\n"
                 "the margin not excluded, grey no difference detected)")
    return bool(rows)


def _plot_cached_online(ax, comparisons: list[dict]) -> bool:
    for i, comp in enumerate(comparisons):
        for j, (key, name) in enumerate((("a_acc", "cached"), ("b_acc", "online"))):
            s = comp[key]
            ax.bar(i + 0.4 * j, 100 * s["mean"], 0.38, yerr=100 * (s["std"] or 0), capsize=3, color=f"C{j}",
                   label=name if i == 0 else None)
    ax.set_xticks([i + 0.2 for i in range(len(comparisons))],
                  [c["label"].split(": cached")[0] for c in comparisons], fontsize=6)
    ax.set(ylabel="test accuracy (%)", title="cached against online KD (mean ± std over seeds)")
    return bool(comparisons)


# --- writing ---------------------------------------------------------------------------------------

def _pct(s: Stats) -> str:
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" if s.std is not None else f"{100 * s.mean:.2f} ± –"


def _pts(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _fields(cells: list[Cell]) -> tuple[list[str], dict]:
    """The fields that vary across cells (table columns, ORDER first) and the constant ones."""
    names = sorted({k for c in cells for k in c.fields}, key=lambda f: (ORDER.index(f) if f in ORDER else 99, f))
    varying = [f for f in names if len({json.dumps(c.fields.get(f)) for c in cells}) > 1]
    return varying, {f: cells[0].fields.get(f) for f in names if f not in varying}


def _value(v) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def noise_lines(ctx: Context, cells: list[Cell]) -> list[str]:
    if ctx.noise is None:
        return ["No cell has two or more seeds: the noise is unknown and no comparison can be decided."]
    sd, df = ctx.noise.sd, ctx.noise.df
    lines = [f"Seed-to-seed noise pooled over {len(cells)} cells: sd {100 * sd:.2f} points, {df} degrees of "
             f"freedom, t critical value {critical(df):.3f} ({100 * LEVEL:.0f}% two-sided). Non-inferiority margin "
             f"{100 * ctx.margin:g} point(s).", "",
             "| seeds per cell (A, B) | 95% interval half-width | smallest difference found 80% of the time |",
             "|---|---|---|"]
    ns = sorted({c.acc.n for c in cells})
    for i, a in enumerate(ns):
        for b in ns[i:]:
            se = sd * math.sqrt(1 / a + 1 / b)
            lines.append(f"| {a}, {b} | ±{100 * critical(df) * se:.2f} | {100 * detectable(se, df):.2f} |")
    return lines


def markdown(record: dict, runs: list[dict], cells: list[Cell], ctx: Context, claims: list[dict],
             pairs: list[dict], teachers_: dict, times: dict, plots: list[str]) -> str:
    done = sum(r["summary"] is not None for r in runs)
    lines = [f"# Sweep report: {record['name']}", "",
             f"Protocol `{record['protocol']}` (sha256 {record['protocol_sha256'][:12]}), {done} of {len(runs)} "
             "runs finished. Every number and verdict below is computed from the run folders by `kdcache report`.",
             "", "## Noise and what this study can decide", ""] + noise_lines(ctx, cells)
    lines += ["", "## Teachers", "", "| teacher | arch | parameters | epochs | steps | test acc |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {t['arch']} | {t['parameters']:,} | {t['epochs']} | {t['steps']} | {_pts(t['test_acc'])} |"
              for n, t in teachers_.items()] or ["", "(No teacher folders: a report regenerated from results.csv.)"]
    lines += ["", "## Claims", "", "| # | claim | test | verdict | comparisons |", "|---|---|---|---|---|"]
    lines += [f"| {c['id']} | {c['claim']} | {c['test']} | **{c['verdict']}**{_judged_on(c)} | "
              f"{len(c['comparisons'])} |" for c in claims]
    for c in claims:
        lines += ["", f"### {c['id']}. {c['claim']}: {c['verdict']}{_judged_on(c)}", ""]
        if c.get("by_teacher"):
            lines += ["By teacher: " + "; ".join(f"{t}: {v}" for t, v in c["by_teacher"].items()) + ".", ""]
        lines += _comparison_lines(c["comparisons"]) or ["The protocol has no cells for this claim."]
    lines += ["", "## Every pair within a family", "",
              "Each pair is a separate 5% test, not corrected for multiplicity: among many pairs a few "
              "differences are expected by chance.", ""]
    lines += _comparison_lines(pairs) or ["No family of three or more cells."]
    lines += ["", "## Cells (mean ± std of test accuracy over seeds, %)", ""] + _cell_table(cells)
    lines += ["", "## Measured run times", ""] + _time_lines(times, runs)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    rule = claims_.__doc__.split("\n\n", 1)[1].replace("\n  - ", "\n\n- ").replace("\n    ", " ")
    lines += ["", "## Verdict rule", "", rule.strip(), "", stats_.__doc__.split("\n\n")[1].strip()]
    return "\n".join(lines) + "\n"


def _judged_on(claim: dict) -> str:
    return f" (teacher {claim['judged_on']})" if claim.get("judged_on") and len(claim.get("by_teacher", {})) > 1 else ""


def _comparison_lines(comps: list[dict]) -> list[str]:
    if not comps:
        return []
    rows = ["| comparison | A | B | A − B | 95% interval | detectable | verdict |", "|---|---|---|---|---|---|---|"]
    for c in comps:
        a = b = "–"
        if "a_acc" in c:
            a, b = (f"{c[x]} {_pct(Stats(**c[x + '_acc']))}" for x in ("a", "b"))
        extra = ""
        if "images_per_sec" in c:
            extra = f" ({c['images_per_sec']['cached']:.0f} vs {c['images_per_sec']['online']:.0f} img/s)"
        if "best_alpha" in c:
            extra = "; best alpha by fraction (reported apart, picked on test accuracy, biased up by about): " + \
                ", ".join(f"{f} -> {a_:g} (+{_pts(c['selection_bias'][f])})" for f, a_ in c["best_alpha"].items())
        lo, hi = c["ci95"]
        counted = "" if c.get("in_verdict", True) else " (reported, not in the verdict)"
        rows.append(f"| {c['label']}{extra} | {a} | {b} | {_pts(c['diff'], True)} | [{_pts(lo, True)}, "
                    f"{_pts(hi, True)}] | {_pts(c['detectable'])} | {c['verdict']}{counted} |")
    return rows


def _cell_table(cells: list[Cell]) -> list[str]:
    varying, constant = _fields(cells)
    lines = ["Same in every cell: " + ", ".join(f"{k} {_value(v)}" for k, v in constant.items()) + ".", "",
             "| cell | " + " | ".join(varying) + " | n | seeds | test acc | best test acc |",
             "|---" * (len(varying) + 5) + "|"]
    for c in cells:
        lines.append(f"| {c.id} | " + " | ".join(_value(c.fields.get(f)) for f in varying) +
                     f" | {c.acc.n} | {' '.join(map(str, c.seeds))} | {_pct(c.acc)} | {_pct(c.best)} |")
    return lines


def _time_lines(times: dict, runs: list[dict]) -> list[str]:
    if times["total_seconds"] is None:
        lines = ["Regenerated from results.csv: the stage log (stage_times.jsonl) is in the sweep folder only.", ""]
    else:
        lines = ["| stage kind | stages | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {v['stages']} | {v['seconds']:.1f} |" for k, v in times["by_kind"].items()]
        lines += [f"| total | | {times['total_seconds']:.1f} |", ""]
    lines += [f"- {name}: {s:.1f} s" for name, s in times["stages"].items()]
    train = sum(r["summary"]["train_seconds"] for r in runs if r["summary"])
    lines.append(f"- students' training time (summary.json train_seconds, all runs): {train:.1f} s")
    return lines


RUN_METRICS = ("test_acc", "best_test_acc", "train_seconds", "images_per_sec", "num_selected", "cache_bytes_per_sample")
TRAINED = ("epochs", "steps")   # as trained (summary.json): the configuration's columns leave them out


def write_csvs(out: Path, runs: list[dict], cells: list[Cell], teachers_: dict, pairs: list[dict]) -> None:
    names = [n for n in sorted({k for c in cells for k in c.fields} | {k for r in runs for k in r["config"]},
                               key=lambda f: (ORDER.index(f) if f in ORDER else 99, f))
             if n not in TRAINED and n != "seed"]
    cell_of = {r["folder"]: c.id for c in cells for r in c.runs}
    accuracy = {n: t["test_acc"] for n, t in teachers_.items()}
    with atomic(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "folder", "cell", "seed", *names, "teacher_test_acc", "finished", *TRAINED, *RUN_METRICS,
                    "device"])
        for r in runs:
            s = r["summary"] or {}
            w.writerow([r["name"], r["folder"], cell_of.get(r["folder"], ""), r["config"]["seed"],
                        *[r["config"].get(n) for n in names], accuracy.get(r["config"].get("teacher")),
                        r["summary"] is not None, *[s.get(m) for m in TRAINED], *[s.get(m) for m in RUN_METRICS],
                        r["train_config"].get("device")])
    with atomic(out / "cells.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", *names, "n", "seeds", "test_acc_mean", "test_acc_std", "best_test_acc_mean",
                    "best_test_acc_std"])
        for c in cells:
            w.writerow([c.id, *[c.fields.get(n) for n in names], c.acc.n, " ".join(map(str, c.seeds)), c.acc.mean,
                        c.acc.std, c.best.mean, c.best.std])
    with atomic(out / "teachers.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["teacher", "arch", "parameters", "epochs", "steps", "test_acc", "train_seconds"])
        for n, t in teachers_.items():
            w.writerow([n, t["arch"], t["parameters"], t["epochs"], t["steps"], t["test_acc"], t["train_seconds"]])
    with atomic(out / "pairs.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["family", "label", "a", "b", "diff", "ci95_lo", "ci95_hi", "detectable", "verdict"])
        for p in pairs:
            w.writerow([p["family"], p["label"], p["a"], p["b"], p["diff"], *p["ci95"], p["detectable"], p["verdict"]])


def write_report(sweep_dir: str | Path, out: str | Path | None = None, margin: float | None = None) -> dict:
    """Write report.md, the CSVs, verdicts.json and plots; return the verdicts. `margin` (accuracy points)
    overrides the protocol's non-inferiority margin."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder not found: {sweep_dir}")
    if margin is not None and margin < 0:
        raise UserError(f"--margin must be 0 or more accuracy points, got {margin}")
    from_csv = not (sweep_dir / "sweep.json").is_file() and (sweep_dir / "results.csv").is_file()
    record, runs = load_results(sweep_dir) if from_csv else load_sweep(sweep_dir)
    out = Path(out) if out else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cells = make_cells(runs)
    teachers_ = load_teachers(sweep_dir) if from_csv else teachers(sweep_dir, record)
    ctx = context(record, cells, {n: t["parameters"] for n, t in teachers_.items()}, margin)
    claims = claims_.evaluate_claims(cells, ctx)
    pairs = claims_.family_pairs(cells, ctx)
    times = {"by_kind": {}, "stages": {}, "total_seconds": None} if from_csv else stage_times(sweep_dir, record)
    plots = plot_all(out, cells, claims) if cells else []
    write_csvs(out, runs, cells, teachers_, pairs)
    result = {"sweep": str(sweep_dir), "protocol": record["protocol"], "protocol_sha256": record["protocol_sha256"],
              "noise": None if ctx.noise is None else {"sd": ctx.noise.sd, "df": ctx.noise.df},
              "level": LEVEL, "margin": ctx.margin, "kd_alpha": record.get("report", {}).get("kd_alpha"),
              "runs_finished": sum(r["summary"] is not None for r in runs), "runs_total": len(runs),
              "teachers": teachers_, "claims": claims, "pairs": pairs, "times": times}
    write_json(out / "verdicts.json", result)
    write_lines(out / "report.md", markdown(record, runs, cells, ctx, claims, pairs, teachers_, times,
                                            plots).splitlines())
    return result
