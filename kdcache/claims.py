"""A study's cells and the claims judged on them (the paper's and kdcache's own), as one table of
claim records.

A *cell* is every configuration field but the seed; its statistics are over its seeds. Each claim
builds comparisons "cell A against cell B", each an interval under the study's pooled noise
(`kdcache.stats`), and judges them with the claim's test:
  - "beats" (claim 1): the 95% interval of A - B lies above 0;
  - "can beat" (claim 4): the same, for at least one comparison;
  - "matches or beats" (claims 2, 5, 6, 7, 8): a non-inferiority test, holding only when the interval
    lies above -margin (the protocol's `[report] margin`, 1 point by default); an interval that
    crosses -margin and 0 is "no difference detected", never "holds";
  - claim 3: the interaction contrast (the gain of the highest alpha over the lowest alpha above 0, at
    the smallest kept fraction minus at the largest) lies above 0.
The KD cell of a claim is the alpha fixed in the protocol before the run (`[report] kd_alpha`, one
value or one per fraction); without it a claim uses a group's KD cell only where there is one alpha to
use. No alpha is picked on the accuracies it is then compared with: the best alpha of each fraction is
reported apart, with the upward bias such a pick carries.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from .stats import (
    FAILS,
    HOLDS,
    LEVEL,
    UNDETECTED,
    UNMEASURED,
    Interval,
    Noise,
    Stats,
    contrast,
    difference,
    every,
    expected_max_of_normals,
    non_inferiority,
    some,
    superiority,
)

ORDER = ["fraction", "method", "alpha", "teacher", "online", "views", "topk", "sample", "temperature", "augment",
         "arch", "epochs", "steps"]
SELECTION_FIELDS = {"method", "scores", "keep", "class_balanced", "ccs_beta", "ccs_strata", "ccs_score"}


# --- cells -----------------------------------------------------------------------------------------

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


def cell_key(config: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v) if isinstance(v, dict | list) else v)
                        for k, v in config.items() if k != "seed"))


def make_cells(runs: list[dict]) -> list[Cell]:
    """Finished runs grouped by everything but the seed, in a stable order (ORDER's fields first)."""
    by_key: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["summary"] is not None:
            by_key.setdefault(cell_key(run["config"]), []).append(run)

    def order(key: tuple):
        d = dict(key)
        return tuple(str(d.get(f)) if not isinstance(d.get(f), float) else f"{d[f]:012.6f}" for f in ORDER)

    cells = []
    for i, key in enumerate(sorted(by_key, key=order), 1):
        rs = by_key[key]
        config = {k: v for k, v in rs[0]["config"].items() if k != "seed"}
        cells.append(Cell(f"C{i}", config, rs, Stats.of([r["summary"]["test_acc"] for r in rs]),
                          Stats.of([r["summary"]["best_test_acc"] for r in rs])))
    return cells


def groups(cells: list[Cell], ignore: set[str]) -> list[list[Cell]]:
    """Cells that agree on every field but those in `ignore`."""
    out: dict[str, list[Cell]] = {}
    for c in cells:
        key = json.dumps({k: v for k, v in sorted(c.fields.items()) if k not in ignore}, sort_keys=True)
        out.setdefault(key, []).append(c)
    return list(out.values())


def views(c: Cell) -> int:
    """Stored views per sample of the cache a cell reads (1: the clean image; runs record it only when > 1)."""
    return c.fields.get("views") or 1


def default_form(c: Cell) -> bool:
    """Whether a cell reads the [dump] table's own cache: full logits of the clean image."""
    return views(c) == 1 and not c.fields.get("topk") and not c.fields.get("sample")


def cached(cells: list[Cell]) -> list[Cell]:
    return [c for c in cells if not c["online"]]


def _teachers(cells: list[Cell]) -> list[str]:
    return sorted({c["teacher"] for c in cells if c["teacher"] is not None})


def _where(c: Cell) -> str:
    return f"{c['method']} {c['fraction']:g}"


# --- the context and comparisons -------------------------------------------------------------------

@dataclass
class Context:
    noise: Noise | None
    margin: float                               # accuracy (0-1) units
    kd_alpha: float | dict[float, float] | None
    headline_fraction: float = 0.5
    teacher_sizes: dict[str, int] = field(default_factory=dict)
    main_teacher: str | None = None
    level: float = LEVEL

    def alpha_at(self, fraction: float) -> float | None:
        if isinstance(self.kd_alpha, dict):
            return next((a for f, a in self.kd_alpha.items() if abs(float(f) - fraction) < 1e-12), None)
        return self.kd_alpha


def kd_cell(cells: list[Cell], ctx: Context) -> Cell | None:
    """The KD cell among cells of one fraction: the pre-set alpha's; without one, the only alpha > 0."""
    kd = [c for c in cells if c["alpha"] > 0]
    if not kd:
        return None
    alpha = ctx.alpha_at(kd[0]["fraction"])
    if alpha is None:
        return kd[0] if len({c["alpha"] for c in kd}) == 1 and len(kd) == 1 else None
    match = [c for c in kd if abs(c["alpha"] - alpha) < 1e-12]
    return match[0] if len(match) == 1 else None


def compare(label: str, a: Cell, b: Cell, ctx: Context, test: str, in_verdict: bool = True) -> dict:
    iv = difference(a.acc, b.acc, ctx.noise, ctx.level)
    return {"label": label, "a": a.id, "b": b.id, "a_acc": _stats_dict(a.acc), "b_acc": _stats_dict(b.acc),
            "test": test, **iv.as_dict(), "verdict": judge(iv, test, ctx), "in_verdict": in_verdict}


def judge(iv: Interval, test: str, ctx: Context) -> str:
    return non_inferiority(iv, ctx.margin) if test == "matches or beats" else superiority(iv)


def _stats_dict(s: Stats) -> dict:
    return {"mean": s.mean, "std": s.std, "n": s.n}


# --- the claims' comparisons -----------------------------------------------------------------------

def kd_helps(cells: list[Cell], ctx: Context) -> list[dict]:
    comps = []
    for group in groups(cached(cells), {"alpha", "teacher", "temperature"}):
        base = [c for c in group if c["alpha"] == 0]
        for teacher in _teachers(group) if len(base) == 1 else []:
            kd = kd_cell([c for c in group if c["teacher"] == teacher], ctx)
            if kd is not None:
                comp = compare(f"{_where(kd)}: KD from {teacher} (alpha {kd['alpha']:g}) vs no KD", kd, base[0], ctx,
                               "beats")
                comps.append({**comp, "teacher": teacher})
    return comps


def random_wins(cells: list[Cell], ctx: Context) -> list[dict]:
    comps = []
    kd = [c for c in cached(cells) if c["alpha"] > 0]
    for group in groups(kd, SELECTION_FIELDS | {"alpha", "temperature"}):
        chosen = {m: kd_cell([c for c in group if c["method"] == m], ctx) for m in sorted({c["method"] for c in group})}
        rnd = chosen.pop("random", None)
        for method, other in chosen.items():
            if rnd is not None and other is not None:
                comps.append(compare(f"fraction {rnd['fraction']:g}, KD from {rnd['teacher']} (alpha "
                                     f"{rnd['alpha']:g}): random vs {method}", rnd, other, ctx, "matches or beats"))
    return comps


def alpha_grids(cells: list[Cell]) -> list[tuple[str, dict[float, dict[float, Cell]]]]:
    """Per method and KD teacher (and temperature): {fraction: {alpha: cell}} at fractions with 2+ alphas,
    where at least one fraction has 2+ alphas above 0 (with / without KD pairs alone are no grid).
    Schedules may differ by fraction. A grid with two cells at one (fraction, alpha) is ambiguous and
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
            grid = {f: row for f, row in sorted(grid.items()) if len(row) >= 2}
            if len(grid) >= 2 and any(sum(a > 0 for a in row) >= 2 for row in grid.values()):
                out.append((f"{group[0]['method']}, KD from {teacher} (T {temp:g})", grid))
    return out


def alpha_trend(cells: list[Cell], ctx: Context) -> list[dict]:
    """Claim 3 as one contrast per grid: (acc[f_small, a_hi] - acc[f_small, a_lo]) - (the same at f_large),
    a_lo < a_hi the lowest and highest alphas above 0 measured at both fractions."""
    comps = []
    for label, grid in alpha_grids(cells):
        # the contrast's two fractions: the extremes among those with 2+ alphas above 0 (a with / without KD
        # pair, such as a headline arm, has no alpha gain to compare)
        graded = [f for f, row in grid.items() if sum(a > 0 for a in row) >= 2]
        if len(graded) < 2:
            continue
        small, large = min(graded), max(graded)
        alphas = sorted(a for a in set(grid[small]) & set(grid[large]) if a > 0)
        if len(alphas) < 2:
            continue
        lo, hi = alphas[0], alphas[-1]
        iv = contrast([(1, grid[small][hi].acc), (-1, grid[small][lo].acc), (-1, grid[large][hi].acc),
                       (1, grid[large][lo].acc)], ctx.noise, ctx.level)
        best = {f: max(sorted(row), key=lambda a, row=row: row[a].acc.mean) for f, row in grid.items()}
        bias = {f"{f:g}": _selection_bias(row, ctx) for f, row in grid.items()}
        comps.append({"label": f"{label}: gain of alpha {hi:g} over {lo:g} at {small:g} minus at {large:g}",
                      "test": "beats", **iv.as_dict(), "verdict": superiority(iv), "in_verdict": True,
                      "best_alpha": {f"{f:g}": a for f, a in best.items()}, "selection_bias": bias})
    return comps


def _selection_bias(row: dict[float, Cell], ctx: Context) -> float | None:
    """How far the best of these cells' means sits above its truth, in expectation, if all were equal."""
    if ctx.noise is None:
        return None
    n = min(c.acc.n for c in row.values())
    return expected_max_of_normals(len(row)) * ctx.noise.sd / n ** 0.5


def small_teacher(cells: list[Cell], ctx: Context) -> list[dict]:
    comps = []
    kd = [c for c in cached(cells) if c["alpha"] > 0 and c["fraction"] < 1]
    for group in groups(kd, {"teacher", "alpha", "temperature"}):
        sized = sorted((ctx.teacher_sizes[t], t) for t in _teachers(group) if t in ctx.teacher_sizes)
        if len(sized) < 2 or sized[0][0] == sized[-1][0]:
            continue
        small, large = (kd_cell([c for c in group if c["teacher"] == t], ctx) for t in (sized[0][1], sized[-1][1]))
        if small is None or large is None:
            continue
        comps.append(compare(f"{_where(small)}, {small['arch']} student: teacher {small['teacher']} "
                             f"({sized[0][0]:,} parameters) vs {large['teacher']} ({sized[-1][0]:,})",
                             small, large, ctx, "beats"))
    return comps


def headline(cells: list[Cell], ctx: Context) -> list[dict]:
    """Random h with KD against 100% without, at equal epochs; the h-without-KD control reported beside."""
    comps, h = [], ctx.headline_fraction
    pool = [c for c in cached(cells) if (c["fraction"] == h and c["method"] == "random")
            or (c["fraction"] == 1 and c["alpha"] == 0)]
    for group in groups(pool, SELECTION_FIELDS | {"fraction", "alpha", "teacher", "temperature", "steps",
                                                  "eval_every"}):
        full = [c for c in group if c["fraction"] == 1]
        plain = [c for c in group if c["fraction"] == h and c["alpha"] == 0]
        for teacher in _teachers(group) if len(full) == 1 else []:
            kd = kd_cell([c for c in group if c["teacher"] == teacher and c["fraction"] == h], ctx)
            if kd is None:
                continue
            comps.append(compare(f"random {h:g} with KD from {teacher} (alpha {kd['alpha']:g}) vs 100% without KD, "
                                 f"{kd['epochs']} epochs each", kd, full[0], ctx, "matches or beats"))
            if len(plain) == 1:
                comps.append(compare(f"control: random {h:g} with KD from {teacher} vs {h:g} without KD", kd, plain[0],
                                     ctx, "beats", in_verdict=False))
        if len(full) == 1 and len(plain) == 1:  # without KD, does h already match all the data?
            comps.append(compare(f"control: random {h:g} without KD vs 100% without KD", plain[0], full[0], ctx,
                                 "matches or beats", in_verdict=False))
    return comps


def _form(c: Cell) -> str:
    parts = [f"{views(c)} stored views" if views(c) > 1 else "clean view"]
    parts += [f"top-{c['topk']}"] if c.fields.get("topk") else []
    parts += [f"{c['sample']} sampled draws"] if c.fields.get("sample") else []
    return ", ".join(parts)


def cached_online(cells: list[Cell], ctx: Context) -> list[dict]:
    """Each cached form against the online teacher; the verdict is the default form's (full logits of the
    clean image), the others are reported beside it."""
    comps = []
    for group in groups([c for c in cells if c["alpha"] > 0], {"online", "views", "topk", "sample"}):
        online = [c for c in group if c["online"]]
        if len(online) != 1:
            continue
        for a in sorted((c for c in group if not c["online"]), key=lambda c: (not default_form(c), views(c))):
            comp = compare(f"{_where(a)}, teacher {a['teacher']}, alpha {a['alpha']:g}, augmentation "
                           f"{'on' if a['augment'] else 'off'}: cached ({_form(a)}) vs online", a, online[0], ctx,
                           "matches or beats", in_verdict=default_form(a))
            comp["images_per_sec"] = {which: Stats.of([r["summary"]["images_per_sec"] for r in c.runs]).mean
                                      for which, c in (("cached", a), ("online", online[0]))}
            comp["same_seeds"] = a.seeds == online[0].seeds
            comps.append(comp)
    return comps


def stored_views(cells: list[Cell], ctx: Context) -> list[dict]:
    comps = []
    for group in groups(cached([c for c in cells if c["alpha"] > 0]), {"views"}):
        clean = [c for c in group if views(c) == 1]
        for c in sorted((c for c in group if views(c) > 1), key=views) if len(clean) == 1 else []:
            comps.append(compare(f"{_where(c)}, teacher {c['teacher']}, alpha {c['alpha']:g}, {c['epochs']} "
                                 f"epochs: {views(c)} stored views vs the clean view", c, clean[0], ctx,
                                 "matches or beats"))
    return comps


def sparse_targets(cells: list[Cell], ctx: Context) -> list[dict]:
    comps = []
    for group in groups(cached([c for c in cells if c["alpha"] > 0]), {"topk", "sample"}):
        full = [c for c in group if not c.fields.get("topk") and not c.fields.get("sample")]
        sparse = sorted((c for c in group if c not in full),
                        key=lambda c: (c.fields.get("topk") is None, c.fields.get("topk") or c.fields.get("sample")))
        for c in sparse if len(full) == 1 else []:
            form = f"top-{c['topk']}" if c.fields.get("topk") else f"{c['sample']} sampled draws"
            known = [r["summary"].get("cache_bytes_per_sample") for r in c.runs]
            size = f" ({known[0]:.0f} bytes per sample)" if known and None not in known else ""  # absent in old CSVs
            comps.append(compare(f"{_where(c)}, teacher {c['teacher']}, alpha {c['alpha']:g}: {form}{size} vs full "
                                 "logits", c, full[0], ctx, "matches or beats"))
    return comps


# --- the table of claims ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    id: int
    text: str
    test: str                                           # how each comparison is judged
    comparisons: Callable[[list[Cell], Context], list[dict]]
    combine: Callable[[list[str]], str] = every         # how the comparisons in the verdict make one
    per_teacher: bool = False                           # judged for each teacher, the main one deciding


CLAIMS = (
    Claim(1, "KD improves accuracy at every kept fraction and for each selection method", "beats", kd_helps,
          per_teacher=True),
    Claim(2, "with KD, random pruning matches or beats score-based pruning (each score method, each fraction)",
          "matches or beats", random_wins),
    Claim(3, "the best alpha grows as the kept fraction shrinks", "contrast", alpha_trend),
    Claim(4, "at small fractions a smaller teacher can beat a larger one", "can beat", small_teacher, some),
    Claim(5, "headline: a student on a random 50% with KD matches or beats the same network on 100% without KD",
          "matches or beats", headline),
    Claim(6, "cached KD matches or beats online KD (same teacher, subset and seeds)", "matches or beats",
          cached_online),
    Claim(7, "a cache of K stored views matches or beats the single clean-view cache", "matches or beats",
          stored_views),
    Claim(8, "sparse targets (top-k or sampled) match full logits at a fraction of the bytes", "matches or beats",
          sparse_targets),
)


def evaluate_claims(cells: list[Cell], ctx: Context) -> list[dict]:
    out = []
    for claim in CLAIMS:
        comps = claim.comparisons(cells, ctx)
        counted = [c for c in comps if c["in_verdict"]]
        record = {"id": claim.id, "claim": claim.text, "test": claim.test, "comparisons": comps}
        if claim.per_teacher:
            teachers = sorted({c["teacher"] for c in counted}, key=lambda t: (t != ctx.main_teacher, t))
            record["by_teacher"] = {t: claim.combine([c["verdict"] for c in counted if c["teacher"] == t])
                                    for t in teachers}
            record["verdict"] = record["by_teacher"][teachers[0]] if teachers else UNMEASURED
            record["judged_on"] = teachers[0] if teachers else None
        else:
            record["verdict"] = claim.combine([c["verdict"] for c in counted])
        out.append(record)
    return out


# --- families: every pair --------------------------------------------------------------------------

FAMILIES = {"alpha": {"alpha", "teacher", "temperature"}, "method": SELECTION_FIELDS, "teacher": {"teacher"},
            "cache form": {"online", "views", "topk", "sample"}}


def family_pairs(cells: list[Cell], ctx: Context) -> list[dict]:
    """Within each family of two or more cells that differ in one respect only (the alpha, the selection
    method, the teacher, the cache's form), every pair: A - B with its interval ("beats" either way)."""
    out = []
    for name, ignore in FAMILIES.items():
        for group in groups(cells, ignore):
            if len(group) < 2:
                continue
            for i, a in enumerate(group):
                for b in group[i + 1:]:
                    comp = compare(f"{name}: {_describe(a, name)} vs {_describe(b, name)} ({_where(a)})", a, b,
                                   ctx, "beats")
                    comp["verdict"] = {HOLDS: "A better", FAILS: "B better", UNDETECTED: UNDETECTED}[comp["verdict"]]
                    out.append({**comp, "family": name})
    return out


def _describe(c: Cell, family: str) -> str:
    if family == "cache form":
        return "online" if c["online"] else f"cached ({_form(c)})"
    if family == "alpha":
        return f"alpha {c['alpha']:g}" + (f" from {c['teacher']}" if c["teacher"] else "")
    return str(c.fields.get(family))


__all__ = ["CLAIMS", "Cell", "Claim", "Context", "FAILS", "HOLDS", "UNDETECTED", "UNMEASURED", "evaluate_claims",
           "family_pairs", "make_cells"]
