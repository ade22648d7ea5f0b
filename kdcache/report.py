"""`kdcache report`: a sweep's run folders turned into tables, plots and verdicts on the paper's claims.

Inputs: `sweep.json` (each run's folder and protocol-level configuration, written by `kdcache sweep`),
each run's `config.json` and `summary.json`, and `stage_times.jsonl` (measured stage times).
Outputs in `--out` (default `<sweep>/report`): `report.md`, `results.csv` (one row per run),
`cells.csv` (one row per cell), `verdicts.json`, and PNG plots.

A *cell* is every configuration field but the seed; its statistics are over its seeds: mean and
sample standard deviation (ddof=1) of the final test accuracy, and n.

Verdict rule. Each claim is a set of comparisons "cell A beats cell B". With d = mean(A) - mean(B)
and the combined standard error se = sqrt(sd_A^2 / n_A + sd_B^2 / n_B), a comparison
    holds          if d >  k * se,
    does not hold  if d < -k * se,
    within noise   otherwise (a cell with a single seed has unknown noise: se = infinity),
with k = 2 by default (about 95% two-sided under a normal approximation; `--noise-k`). A claim over
several comparisons ("at every fraction", "each method") holds if all hold, does not hold if any does
not, and is within noise otherwise; an existential claim ("can beat") holds if any holds, does not hold
if all do not, and is within noise otherwise. A "matches or beats" claim (2, 5, 6) holds when no
comparison fails and every one is measured with seeds on both sides (a single-seed cell's noise is
unknown: then within noise). Claim 3 (the best alpha grows as the kept fraction shrinks) has its own
rule, in `trend_verdict`. A claim whose cells the protocol lacks is `not measured`. The KD cell of a
comparison is the protocol's `[report] kd_alpha` if set, else the best alpha > 0 by mean accuracy:
chosen on the same runs it is then compared with, which favours KD slightly; set kd_alpha to avoid it.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import atomic, write_json, write_lines

NOISE_K = 2.0
HOLDS, FAILS, NOISE, UNMEASURED = "holds", "does not hold", "within noise", "not measured"
CLAIMS = {
    1: "KD improves accuracy at every kept fraction and for each selection method",
    2: "with KD, random pruning matches or beats score-based pruning (each score method, each fraction)",
    3: "the best alpha grows as the kept fraction shrinks",
    4: "at small fractions a smaller teacher can beat a larger one",
    5: "headline: a student on a random 50% with KD matches or beats the same network on 100% without KD",
    6: "cached KD (its best stored form) matches or beats online KD (same teacher, subset and seeds)",
    7: "a cache of K stored views matches or beats the single clean-view cache",
    8: "sparse targets (top-k or sampled) match full logits at a fraction of the bytes",
}
ORDER = ["fraction", "method", "alpha", "teacher", "online", "views", "topk", "sample", "temperature", "augment",
         "arch", "epochs", "steps"]
SELECTION_FIELDS = {"method", "scores", "keep", "class_balanced", "ccs_beta", "ccs_strata", "ccs_score"}


# --- statistics and verdicts -----------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    mean: float
    std: float | None   # sample standard deviation; None for a single value
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
        return cls(mean, std, n)


def standard_error(a: Stats, b: Stats) -> float:
    if a.std is None or b.std is None:
        return math.inf
    return math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def verdict(a: Stats, b: Stats, k: float = NOISE_K) -> str:
    """Whether A beats B: holds / does not hold beyond k combined standard errors, else within noise."""
    d, se = a.mean - b.mean, standard_error(a, b)
    if d > k * se:
        return HOLDS
    if d < -k * se:
        return FAILS
    return NOISE


def all_of(verdicts: list[str]) -> str:
    """A claim about every comparison: any failure fails it, all must hold for it to hold."""
    if not verdicts:
        return UNMEASURED
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else NOISE


def any_of(verdicts: list[str]) -> str:
    """An existential claim: one comparison that holds is enough; it fails only if all fail."""
    if not verdicts:
        return UNMEASURED
    if HOLDS in verdicts:
        return HOLDS
    return FAILS if all(v == FAILS for v in verdicts) else NOISE


def every(comps: list[dict]) -> str:
    return all_of([c["verdict"] for c in comps])


def some(comps: list[dict]) -> str:
    return any_of([c["verdict"] for c in comps])


def matches_or_beats(comps: list[dict]) -> str:
    """A claim that A matches or beats B in every comparison: holds unless one fails, provided each is
    measured with seeds on both sides."""
    verdict = all_of([c["verdict"] for c in comps])
    if verdict == NOISE and all(c["se"] is not None for c in comps):
        return HOLDS
    return verdict


def _non_increasing_choice(plausible: list[list[float]]) -> bool:
    """Whether one plausible alpha per fraction (growing fractions) can be chosen never rising and ending
    lower than it started."""
    prev, first = None, max(plausible[0])
    for i, options in enumerate(plausible):
        ok = [a for a in options if prev is None or a <= prev]
        if not ok:
            return False
        prev = min(ok) if i == len(plausible) - 1 else max(ok)
    return first > prev


def trend_verdict(grid: dict[float, dict[float, Stats]], k: float = NOISE_K) -> tuple[str, dict, dict]:
    """Claim 3 on one alpha grid, {fraction: {alpha: Stats}}: does the best alpha grow as the fraction
    shrinks? At each fraction the best alpha is the argmax of the mean (the smaller alpha on a tie),
    and the plausible alphas are those whose cell the best one does not beat beyond noise.
      holds:         the best alpha never rises with the fraction, is larger at the smallest fraction
                     than at the largest, and no single alpha is plausible at every fraction;
      within noise:  one alpha is plausible at every fraction (a constant alpha fits), unless the
                     grid is sharp (one plausible alpha per fraction); or the best alphas do not
                     fall monotonically but plausible ones that do exist;
      does not hold: otherwise.
    Returns (verdict, best alpha by fraction, plausible alphas by fraction)."""
    fractions = sorted(grid)
    best = {f: max(sorted(grid[f]), key=lambda a, f=f: grid[f][a].mean) for f in fractions}
    plausible = {f: sorted(a for a, s in grid[f].items() if verdict(grid[f][best[f]], s, k) != HOLDS)
                 for f in fractions}
    seq = [best[f] for f in fractions]  # by growing fraction: should not rise
    grows = all(x >= y for x, y in zip(seq, seq[1:])) and seq[0] > seq[-1]
    constant_fits = bool(set.intersection(*(set(p) for p in plausible.values())))
    sharp = all(len(p) == 1 for p in plausible.values())
    if grows and not constant_fits:
        return HOLDS, best, plausible
    if constant_fits and not sharp:
        return NOISE, best, plausible
    if not grows and _non_increasing_choice([plausible[f] for f in fractions]):
        return NOISE, best, plausible
    return FAILS, best, plausible


# --- runs and cells --------------------------------------------------------------------------------

@dataclass
class Cell:
    id: str
    fields: dict
    runs: list[dict]
    acc: Stats
    best: Stats

    def __getitem__(self, key: str):
        return self.fields[key]

    @property
    def seeds(self) -> list[int]:
        return sorted(r["config"]["seed"] for r in self.runs)


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


def _check_belongs(run: dict, folder: Path) -> None:
    """Refuse a run folder whose own record disagrees with the sweep's (a copied or moved folder)."""
    have, want = run["train_config"], run["config"]
    if have and (have.get("seed") != want["seed"] or
                 not math.isclose(have.get("alpha_resolved", want["alpha"]), want["alpha"])):
        raise UserError(f"{folder}/config.json (seed {have.get('seed')}, alpha {have.get('alpha_resolved')}) "
                        f"does not match sweep.json (seed {want['seed']}, alpha {want['alpha']})")


def cell_key(config: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in config.items() if k != "seed"))


def make_cells(runs: list[dict]) -> list[Cell]:
    """Finished runs grouped by everything but the seed, in a stable order (ORDER's fields first)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["summary"] is not None:
            groups.setdefault(cell_key(run["config"]), []).append(run)

    def order(key: tuple):
        d = dict(key)
        return tuple(str(d.get(f)) if not isinstance(d.get(f), float) else f"{d[f]:012.6f}" for f in ORDER)

    cells = []
    for i, key in enumerate(sorted(groups, key=order), 1):
        rs = groups[key]
        cells.append(Cell(f"C{i}", dict(key), rs, Stats.of([r["summary"]["test_acc"] for r in rs]),
                          Stats.of([r["summary"]["best_test_acc"] for r in rs])))
    return cells


def groups(cells: list[Cell], ignore: set[str]) -> list[list[Cell]]:
    """Cells that agree on every field but those in `ignore`."""
    out: dict[tuple, list[Cell]] = {}
    for c in cells:
        out.setdefault(tuple((k, v) for k, v in sorted(c.fields.items()) if k not in ignore), []).append(c)
    return list(out.values())


def kd_cell(cells: list[Cell], kd_alpha: float | None) -> Cell | None:
    """The KD cell among these: the designated alpha's, else the best alpha > 0 (by mean accuracy)."""
    kd = [c for c in cells if c["alpha"] > 0 and (kd_alpha is None or c["alpha"] == kd_alpha)]
    return max(kd, key=lambda c: (c.acc.mean, -c["alpha"])) if kd else None


def _stats_dict(s: Stats) -> dict:
    return {"mean": s.mean, "std": s.std, "n": s.n}


def compare(label: str, a: Cell, b: Cell, k: float) -> dict:
    return {"label": label, "a": a.id, "b": b.id, "a_acc": _stats_dict(a.acc), "b_acc": _stats_dict(b.acc),
            "diff": a.acc.mean - b.acc.mean, "se": _finite(standard_error(a.acc, b.acc)),
            "verdict": verdict(a.acc, b.acc, k)}


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x  # JSON has no infinity: None where the noise is unknown


def _where(c: Cell) -> str:
    return f"{c['method']} {c['fraction']:g}"


# --- the claims ------------------------------------------------------------------------------------

@dataclass
class Context:
    k: float
    kd_alpha: float | None
    headline_fraction: float
    teacher_sizes: dict[str, int]   # parameters of each teacher


def cached(cells: list[Cell]) -> list[Cell]:
    return [c for c in cells if not c["online"]]


def _teachers(cells: list[Cell]) -> list[str]:
    return sorted({c["teacher"] for c in cells if c["teacher"] is not None})


def claim_kd_helps(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    for group in groups(cached(cells), {"alpha", "teacher", "temperature"}):
        base = [c for c in group if c["alpha"] == 0]
        for teacher in _teachers(group) if len(base) == 1 else []:
            kd = kd_cell([c for c in group if c["teacher"] == teacher], ctx.kd_alpha)
            if kd is not None:
                comps.append(compare(f"{_where(kd)}: KD from {teacher} (alpha {kd['alpha']:g}) vs no KD",
                                     kd, base[0], ctx.k))
    return comps, every


def claim_random_wins(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    kd = [c for c in cached(cells) if c["alpha"] > 0]
    for group in groups(kd, SELECTION_FIELDS | {"alpha", "temperature"}):
        best = {m: kd_cell([c for c in group if c["method"] == m], ctx.kd_alpha)
                for m in sorted({c["method"] for c in group})}
        rnd = best.pop("random", None)
        for method, other in best.items():
            if rnd is not None and other is not None:
                comps.append(compare(f"fraction {rnd['fraction']:g}, KD from {rnd['teacher']}: random vs {method}",
                                     rnd, other, ctx.k))
    return comps, matches_or_beats


def alpha_grids(cells: list[Cell]) -> list[tuple[str, dict[float, dict[float, Cell]]]]:
    """Per method and KD teacher (and temperature): {fraction: {alpha: cell}} at fractions with 2+ alphas,
    where at least one fraction has 2+ alphas above 0 (with / without KD pairs alone are no grid: there
    is no best alpha among several to find). Schedules may differ by fraction (epochs, steps, how often
    to evaluate). A grid with two cells at one (fraction, alpha), e.g. two schedules, is ambiguous and
    left out."""
    out = []
    for group in groups(cached(cells), {"fraction", "alpha", "teacher", "temperature", "epochs", "steps",
                                        "eval_every"}):
        for teacher, temp in sorted({(c["teacher"], c["temperature"]) for c in group if c["alpha"] > 0}):
            members = [c for c in group if c["alpha"] == 0 or (c["teacher"], c["temperature"]) == (teacher, temp)]
            if len(members) != len({(c["fraction"], c["alpha"]) for c in members}):
                continue
            grid: dict[float, dict[float, Cell]] = {}
            for c in members:
                grid.setdefault(c["fraction"], {})[c["alpha"]] = c
            grid = {f: row for f, row in grid.items() if len(row) >= 2}
            if len(grid) >= 2 and any(sum(a > 0 for a in row) >= 2 for row in grid.values()):
                out.append((f"{group[0]['method']}, KD from {teacher} (T {temp:g})", grid))
    return out


def claim_alpha_trend(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    for label, grid in alpha_grids(cells):
        v, best, plausible = trend_verdict({f: {a: c.acc for a, c in row.items()} for f, row in grid.items()}, ctx.k)
        comps.append({"label": f"{label}: best alpha by fraction " +
                      ", ".join(f"{f:g} -> {a:g}" for f, a in best.items()),
                      "best_alpha": {f"{f:g}": a for f, a in best.items()},
                      "plausible": {f"{f:g}": p for f, p in plausible.items()}, "verdict": v})
    return comps, every


def claim_small_teacher(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    kd = [c for c in cached(cells) if c["alpha"] > 0 and c["fraction"] < 1]
    for group in groups(kd, {"teacher", "alpha", "temperature"}):
        sized = sorted((ctx.teacher_sizes[t], t) for t in _teachers(group) if t in ctx.teacher_sizes)
        if len(sized) < 2 or sized[0][0] == sized[-1][0]:
            continue
        small, large = (kd_cell([c for c in group if c["teacher"] == t], ctx.kd_alpha) for t in
                        (sized[0][1], sized[-1][1]))
        if small is None or large is None:
            continue
        comps.append(compare(f"{_where(small)}: teacher {small['teacher']} (smaller) vs {large['teacher']}",
                             small, large, ctx.k))
    return comps, some


def claim_headline(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps, h = [], ctx.headline_fraction
    pool = [c for c in cached(cells) if (c["fraction"] == h and c["method"] == "random" and c["alpha"] > 0)
            or (c["fraction"] == 1 and c["alpha"] == 0)]
    ignore = SELECTION_FIELDS | {"fraction", "alpha", "teacher", "temperature", "epochs", "steps"}
    for group in groups(pool, ignore):
        base = [c for c in group if c["fraction"] == 1]
        for teacher in _teachers(group) if len(base) == 1 else []:
            kd = kd_cell([c for c in group if c["teacher"] == teacher], ctx.kd_alpha)
            if kd is None:
                continue
            comps.append(compare(f"random {h:g} with KD from {teacher} (alpha {kd['alpha']:g}) vs 100% without KD",
                                 kd, base[0], ctx.k))
    return comps, matches_or_beats


def views(c: Cell) -> int:
    """Stored views per sample of the cache a cell reads (1: the clean image; runs record it only when > 1)."""
    return c.fields.get("views") or 1


def _form(c: Cell) -> str:
    return f"{views(c)} stored views" if views(c) > 1 else "clean-view cache"


def claim_cached_online(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    for group in groups([c for c in cells if c["alpha"] > 0], {"online", "views"}):
        cache, online = [c for c in group if not c["online"]], [c for c in group if c["online"]]
        if cache and len(online) == 1:
            a, b = max(cache, key=lambda c: (c.acc.mean, -views(c))), online[0]
            form = f" ({_form(a)}, the best of {len(cache)})" if len(cache) > 1 else ""
            comp = compare(f"{_where(a)}, teacher {a['teacher']}, alpha {a['alpha']:g}, augmentation "
                           f"{'on' if a['augment'] else 'off'}: cached{form} vs online", a, b, ctx.k)
            comp["images_per_sec"] = {which: Stats.of([r["summary"]["images_per_sec"] for r in c.runs]).mean
                                      for which, c in (("cached", a), ("online", b))}
            comp["same_seeds"] = a.seeds == b.seeds
            comps.append(comp)
    return comps, matches_or_beats


def claim_views(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    for group in groups(cached([c for c in cells if c["alpha"] > 0]), {"views"}):
        clean = [c for c in group if views(c) == 1]
        for c in sorted((c for c in group if views(c) > 1), key=views) if len(clean) == 1 else []:
            comps.append(compare(f"{_where(c)}, teacher {c['teacher']}, alpha {c['alpha']:g}, {c['epochs']} "
                                 f"epochs: {views(c)} stored views vs the clean view", c, clean[0], ctx.k))
    return comps, matches_or_beats


def claim_sparse(cells: list[Cell], ctx: Context) -> tuple[list[dict], Callable]:
    comps = []
    for group in groups(cached([c for c in cells if c["alpha"] > 0]), {"topk", "sample"}):
        full = [c for c in group if not c.fields.get("topk") and not c.fields.get("sample")]
        sparse = sorted((c for c in group if c not in full),
                        key=lambda c: (c.fields.get("topk") is None, c.fields.get("topk") or c.fields.get("sample")))
        for c in sparse if len(full) == 1 else []:
            form = f"top-{c['topk']}" if c.fields.get("topk") else f"{c['sample']} sampled draws"
            bytes_ = Stats.of([r["summary"].get("cache_bytes_per_sample") or 0 for r in c.runs]).mean
            comp = compare(f"{_where(c)}, teacher {c['teacher']}, alpha {c['alpha']:g}: {form} ({bytes_:.0f} bytes "
                           "per sample) vs full logits", c, full[0], ctx.k)
            comps.append(comp)
    return comps, matches_or_beats


CLAIM_FUNCTIONS = {1: claim_kd_helps, 2: claim_random_wins, 3: claim_alpha_trend, 4: claim_small_teacher,
                   5: claim_headline, 6: claim_cached_online, 7: claim_views, 8: claim_sparse}


def evaluate_claims(cells: list[Cell], ctx: Context) -> list[dict]:
    out = []
    for number, function in CLAIM_FUNCTIONS.items():
        comps, combine = function(cells, ctx)
        out.append({"id": number, "claim": CLAIMS[number], "verdict": combine(comps),
                    "combine": combine.__name__.replace("_", " "), "comparisons": comps})
    return out


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
    by_id = {c["id"]: c["comparisons"] for c in claims}
    for name, draw in (("accuracy_vs_fraction.png", lambda ax: _plot_accuracy(ax, cells)),
                       ("best_alpha_vs_fraction.png", lambda ax: _plot_best_alpha(ax, by_id[3])),
                       ("cached_vs_online.png", lambda ax: _plot_cached_online(ax, by_id[6]))):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if draw(ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            with atomic(out / name) as tmp:
                fig.savefig(tmp, format="png")
            written.append(name)
        plt.close(fig)
    return written


def _plot_accuracy(ax, cells: list[Cell]) -> bool:
    lines: dict[tuple, dict[float, Cell]] = {}
    for c in cached(cells):  # each point: the best cell of its method, KD teacher and fraction
        points = lines.setdefault((c["method"], c["teacher"] if c["alpha"] > 0 else None), {})
        if c["fraction"] not in points or c.acc.mean > points[c["fraction"]].acc.mean:
            points[c["fraction"]] = c
    methods = sorted({m for m, _ in lines})
    teachers = sorted({t for _, t in lines if t is not None})
    for (method, teacher), points in sorted(lines.items(), key=str):
        fs = sorted(points)
        # colour: the method; line: no KD dashed, each teacher its own marker and line style
        style = ("--", "s") if teacher is None else (("-", ":", "-.")[teachers.index(teacher) % 3],
                                                   "o^vD"[teachers.index(teacher) % 4])
        ax.errorbar(fs, [100 * points[f].acc.mean for f in fs], yerr=[100 * (points[f].acc.std or 0) for f in fs],
                    color=f"C{methods.index(method) % 10}", ls=style[0], marker=style[1],
                    capsize=3, label=f"{method}, " + ("no KD" if teacher is None else f"KD from {teacher}"))
    ax.set(xlabel="kept fraction", ylabel="test accuracy (%)", xscale="log",
           title="test accuracy against kept fraction (best cell per point, mean ± std)")
    fractions = sorted({f for points in lines.values() for f in points})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    return bool(lines)


def _plot_best_alpha(ax, comparisons: list[dict]) -> bool:
    for comp in comparisons:
        fs = sorted(comp["best_alpha"], key=float)
        ax.plot([float(f) for f in fs], [comp["best_alpha"][f] for f in fs], marker="o",
                label=comp["label"].split(": best alpha")[0])
    ax.set(xlabel="kept fraction", ylabel="best alpha", title="best alpha against kept fraction")
    return bool(comparisons)


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


def _fields(cells: list[Cell]) -> tuple[list[str], dict]:
    """The fields that vary across cells (table columns, ORDER first) and the constant ones."""
    names = sorted({k for c in cells for k in c.fields}, key=lambda f: (ORDER.index(f) if f in ORDER else 99, f))
    varying = [f for f in names if len({json.dumps(c.fields.get(f)) for c in cells}) > 1]
    return varying, {f: cells[0].fields.get(f) for f in names if f not in varying}


def _value(v) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(record: dict, runs: list[dict], cells: list[Cell], claims: list[dict], times: dict,
             plots: list[str], k: float) -> str:
    done = sum(r["summary"] is not None for r in runs)
    lines = [f"# Sweep report: {record['name']}", "",
             f"Protocol `{record['protocol']}` (sha256 {record['protocol_sha256'][:12]}), {done} of {len(runs)} "
             "runs finished. Every number and verdict below is computed from the run folders by `kdcache report`.",
             "", "## Claims", "", "| # | claim | verdict | comparisons |", "|---|---|---|---|"]
    lines += [f"| {c['id']} | {c['claim']} | **{c['verdict']}** | {len(c['comparisons'])} |" for c in claims]
    for c in claims:
        lines += ["", f"### {c['id']}. {c['claim']}: {c['verdict']}", ""]
        lines += _comparison_lines(c) or ["The protocol has no cells for this claim."]
    lines += ["", "## Cells (mean ± std of test accuracy over seeds, %)", ""] + _cell_table(cells)
    lines += ["", "## Measured run times", ""] + _time_lines(times, runs)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Verdict rule", "", f"k = {k:g}. " + " ".join(__doc__.split("Verdict rule. ", 1)[1].split())]
    return "\n".join(lines) + "\n"


def _comparison_lines(claim: dict) -> list[str]:
    comps = claim["comparisons"]
    if not comps:
        return []
    if claim["id"] == 3:
        rows = ["| grid | plausible best alphas | verdict |", "|---|---|---|"]
        return rows + [f"| {c['label']} | " + "; ".join(f"{f}: {', '.join(f'{a:g}' for a in p)}"
                       for f, p in c["plausible"].items()) + f" | {c['verdict']} |" for c in comps]
    rows = ["| comparison | A | B | A − B | se | verdict |", "|---|---|---|---|---|---|"]
    for c in comps:
        a, b = (Stats(**c[x]) for x in ("a_acc", "b_acc"))
        extra = ""
        if "images_per_sec" in c:
            extra = f" ({c['images_per_sec']['cached']:.0f} vs {c['images_per_sec']['online']:.0f} img/s)"
        se = "unknown" if c["se"] is None else f"{100 * c['se']:.2f}"
        rows.append(f"| {c['label']}{extra} | {c['a']} {_pct(a)} | {c['b']} {_pct(b)} | {100 * c['diff']:+.2f} | "
                    f"{se} | {c['verdict']} |")
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
    lines = ["| stage kind | stages | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['stages']} | {v['seconds']:.1f} |" for k, v in times["by_kind"].items()]
    lines += [f"| total | | {times['total_seconds']:.1f} |", ""]
    lines += [f"- {name}: {s:.1f} s" for name, s in times["stages"].items()]
    train = sum(r["summary"]["train_seconds"] for r in runs if r["summary"])
    lines.append(f"- students' training time (summary.json train_seconds, all runs): {train:.1f} s")
    return lines


def write_csvs(out: Path, runs: list[dict], cells: list[Cell]) -> None:
    names = sorted({k for c in cells for k in c.fields} | {k for r in runs for k in r["config"]},
                   key=lambda f: (ORDER.index(f) if f in ORDER else 99, f))
    cell_of = {r["folder"]: c.id for c in cells for r in c.runs}
    metrics = ("test_acc", "best_test_acc", "train_seconds", "images_per_sec", "num_selected", "epochs", "steps")
    with atomic(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "folder", "cell", "seed", *[n for n in names if n != "seed"], "finished", *metrics,
                    "device"])
        for r in runs:
            s = r["summary"] or {}
            w.writerow([r["name"], r["folder"], cell_of.get(r["folder"], ""), r["config"]["seed"],
                        *[r["config"].get(n) for n in names if n != "seed"], r["summary"] is not None,
                        *[s.get(m) for m in metrics], r["train_config"].get("device")])
    with atomic(out / "cells.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", *[n for n in names if n != "seed"], "n", "seeds", "test_acc_mean", "test_acc_std",
                    "best_test_acc_mean", "best_test_acc_std"])
        for c in cells:
            w.writerow([c.id, *[c.fields.get(n) for n in names if n != "seed"], c.acc.n,
                        " ".join(map(str, c.seeds)), c.acc.mean, c.acc.std, c.best.mean, c.best.std])


def teacher_sizes(sweep_dir: Path, record: dict) -> dict[str, int]:
    """Parameters of each finished teacher, counted in its checkpoint."""
    import torch

    sizes = {}
    for name, t in record["teachers"].items():
        path = sweep_dir / t["folder"] / "model.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            sizes[name] = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                                     "num_batches_tracked")))
    return sizes


def write_report(sweep_dir: str | Path, out: str | Path | None = None, noise_k: float = NOISE_K) -> dict:
    """Write report.md, results.csv, cells.csv, verdicts.json and plots; return the verdicts."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder not found: {sweep_dir}")
    if noise_k <= 0:
        raise UserError(f"--noise-k must be positive, got {noise_k}")
    record, runs = load_sweep(sweep_dir)
    out = Path(out) if out else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cells = make_cells(runs)
    options = record.get("report", {})
    ctx = Context(noise_k, options.get("kd_alpha"), options.get("headline_fraction", 0.5),
                  teacher_sizes(sweep_dir, record))
    claims = evaluate_claims(cells, ctx)
    times = stage_times(sweep_dir, record)
    plots = plot_all(out, cells, claims) if cells else []
    write_csvs(out, runs, cells)
    result = {"sweep": str(sweep_dir), "protocol": record["protocol"], "protocol_sha256": record["protocol_sha256"],
              "noise_k": noise_k, "runs_finished": sum(r["summary"] is not None for r in runs),
              "runs_total": len(runs), "claims": claims, "times": times}
    write_json(out / "verdicts.json", result)
    write_lines(out / "report.md", markdown(record, runs, cells, claims, times, plots, noise_k).splitlines())
    return result
