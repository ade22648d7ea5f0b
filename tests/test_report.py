"""The verdict rule (kdcache.stats), the claims (kdcache.claims) and reports regenerated from results.csv."""
import csv
import json
import math
import random
import shutil

import pytest
from conftest import ROOT, run_cli

from kdcache.claims import Context, evaluate_claims, family_pairs, make_cells
from kdcache.stats import (
    FAILS,
    HOLDS,
    UNDETECTED,
    UNMEASURED,
    WORSE,
    Noise,
    Stats,
    contrast,
    critical,
    difference,
    every,
    expected_max_of_normals,
    non_inferiority,
    some,
    superiority,
    t_cdf,
    t_quantile,
)
from kdcache.sweep import normalise


def test_t_distribution_matches_published_tables():
    for df, t975 in [(1, 12.706), (2, 4.303), (3, 3.182), (6, 2.447), (10, 2.228), (30, 2.042), (120, 1.980)]:
        assert critical(df) == pytest.approx(t975, abs=1e-3)
    assert t_quantile(0.8, 6) == pytest.approx(0.906, abs=1e-3)
    assert t_cdf(0.0, 7) == 0.5 and t_cdf(-2.571, 5) == pytest.approx(0.025, abs=1e-4)
    assert t_cdf(1.3, 4) + t_cdf(-1.3, 4) == pytest.approx(1.0)
    assert [round(expected_max_of_normals(k), 3) for k in (1, 2, 3, 4)] == [0.0, 0.564, 0.846, 1.029]


def test_noise_is_pooled_over_cells_with_their_degrees_of_freedom():
    cells = [Stats(0.5, 0.01, 2), Stats(0.6, 0.03, 4), Stats(0.7, None, 1)]
    noise = Noise.pooled(cells)
    assert noise.df == 1 + 3 and noise.sd == pytest.approx(math.sqrt((1 * 0.01 ** 2 + 3 * 0.03 ** 2) / 4))
    assert Noise.pooled([Stats(0.5, None, 1)]) is None
    iv = difference(Stats(0.62, 0.0, 4), Stats(0.60, 0.0, 2), noise)
    assert iv.diff == pytest.approx(0.02) and iv.se == pytest.approx(noise.sd * math.sqrt(1 / 4 + 1 / 2))
    assert iv.hi - iv.diff == pytest.approx(critical(4) * iv.se) and iv.detectable > iv.hi - iv.diff
    unknown = difference(Stats(0.9, None, 1), Stats(0.1, None, 1), None)
    assert superiority(unknown) == UNDETECTED and unknown.as_dict()["ci95"] == [None, None]


def test_tests_and_combinations():
    noise = Noise(0.01, 30)
    better, same, worse = (difference(Stats(m, 0.01, 4), Stats(0.60, 0.01, 4), noise) for m in (0.63, 0.60, 0.57))
    assert [superiority(x) for x in (better, same, worse)] == [HOLDS, UNDETECTED, FAILS]
    assert non_inferiority(same, 0.02) == HOLDS          # interval [-1.4, +1.4] points lies above -2
    assert non_inferiority(same, 0.01) == UNDETECTED     # crosses -1 and 0: not a match
    assert non_inferiority(worse, 0.01) == FAILS
    slightly = difference(Stats(0.595, 0.01, 4), Stats(0.60, 0.01, 4), Noise(0.001, 30))
    assert slightly.hi < 0 and non_inferiority(slightly, 0.01) == HOLDS  # worse, but by less than the margin
    # worse by 0.8 points, interval [-1.23, -0.37]: detectably worse, but on no known side of the 1-point margin
    unplaced = difference(Stats(0.592, 0.01, 4), Stats(0.60, 0.01, 4), Noise(0.003, 30))
    assert unplaced.lo < -0.01 < unplaced.hi < 0 and non_inferiority(unplaced, 0.01) == WORSE
    assert worse.hi < -0.01  # the FAILS above: worse by more than the margin, at 95%
    assert every([]) == some([]) == UNMEASURED
    assert every([HOLDS, HOLDS]) == HOLDS and every([HOLDS, UNDETECTED]) == UNDETECTED
    assert every([HOLDS, FAILS]) == FAILS and every([WORSE, FAILS]) == FAILS
    assert every([HOLDS, WORSE, UNDETECTED]) == WORSE
    assert some([FAILS, WORSE]) == WORSE and some([WORSE, UNDETECTED]) == UNDETECTED
    assert some([FAILS, HOLDS]) == HOLDS and some([FAILS, UNDETECTED]) == UNDETECTED and some([FAILS, FAILS]) == FAILS


def _simulated_studies(effect: float, sd: float, n: int, cells: int, trials: int, seed: int):
    """Studies of `cells` cells of n seeds each, normal noise; yields the interval of cell 0 minus cell 1,
    cell 0 carrying a true `effect` (points)."""
    rng = random.Random(seed)
    for _ in range(trials):
        stats = [Stats.of([rng.gauss(effect if i == 0 else 0.0, sd) for _ in range(n)]) for i in range(cells)]
        yield difference(stats[0], stats[1], Noise.pooled(stats))


def test_false_alarms_at_no_effect_are_at_most_6_percent():
    """With 2 seeds per cell the old rule ("beyond 2 combined standard errors") raised ~18% false alarms."""
    for n, cells in ((2, 10), (4, 6), (2, 2)):
        alarms = sum(superiority(iv) != UNDETECTED for iv in _simulated_studies(0.0, 1.3, n, cells, 3000, n + cells))
        assert alarms / 3000 <= 0.06, (n, cells, alarms)


def test_a_3_point_effect_at_n_4_is_found_at_least_80_percent_of_the_time():
    """A study like paper-cpu's (a dozen cells of 4 seeds, sd 1.3 points)."""
    found = sum(superiority(iv) == HOLDS for iv in _simulated_studies(3.0, 1.3, 4, 12, 3000, 1))
    assert found / 3000 >= 0.80


def test_a_match_whose_interval_crosses_minus_margin_never_holds():
    for iv in _simulated_studies(-0.5, 1.3, 2, 4, 2000, 2):
        verdict = non_inferiority(iv, 1.0)
        assert (verdict == HOLDS) == (iv.lo > -1.0)
        if iv.lo <= -1.0:
            assert verdict != HOLDS


def test_interaction_contrast_of_four_cells():
    noise = Noise(0.01, 20)
    cells = [Stats(m, 0.01, 4) for m in (0.50, 0.45, 0.70, 0.72)]
    iv = contrast([(1, cells[0]), (-1, cells[1]), (-1, cells[2]), (1, cells[3])], noise)
    assert iv.diff == pytest.approx((0.50 - 0.45) - (0.70 - 0.72)) and iv.se == pytest.approx(0.01)
    assert superiority(iv) == HOLDS


BASE = {"method": "random", "teacher": "t", "online": False, "temperature": 4.0, "scores": "t", "keep": "hard",
        "class_balanced": False, "ccs_beta": 0.1, "ccs_strata": 50, "ccs_score": "el2n", "arch": "resnet8",
        "epochs": 2, "steps": None, "augment": False}


def _runs(accs: dict, **extra) -> list[dict]:
    return [{"folder": f"r{key}-{s}", "config": normalise({**BASE, **extra, **dict(key), "seed": s}),
             "summary": {"test_acc": acc, "best_test_acc": acc, "images_per_sec": 100}}
            for key, values in accs.items() for s, acc in enumerate(values)]


def _claims(runs, **ctx):
    cells = make_cells(runs)
    options = {"margin": 0.01, "kd_alpha": None, **ctx}
    return {c["id"]: c for c in evaluate_claims(cells, Context(Noise.pooled([c.acc for c in cells]), **options))}


def test_claims_use_the_preset_alpha_and_never_pick_one_on_test_accuracy():
    grid = {((("fraction", f), ("alpha", a))): v for (f, a), v in {
        (0.1, 0): [0.30, 0.31, 0.30, 0.31], (0.1, 0.5): [0.35, 0.36, 0.35, 0.36], (0.1, 0.9): [0.45, 0.46, 0.45, 0.46],
        (0.5, 0): [0.60, 0.62, 0.60, 0.62], (0.5, 0.5): [0.70, 0.71, 0.70, 0.71], (0.5, 0.9): [0.65, 0.66, 0.65, 0.66],
        (1.0, 0): [0.70, 0.72, 0.70, 0.72]}.items()}
    runs = _runs(grid)
    unset = _claims(runs)
    assert unset[1]["verdict"] == UNMEASURED and unset[5]["verdict"] == UNMEASURED  # two KD alphas: none is picked
    preset = _claims(runs, kd_alpha={0.1: 0.9, 0.5: 0.5})
    assert [c["label"] for c in preset[1]["comparisons"]] == ["random 0.1: KD from t (alpha 0.9) vs no KD",
                                                              "random 0.5: KD from t (alpha 0.5) vs no KD"]
    assert preset[1]["verdict"] == HOLDS and preset[1]["by_teacher"] == {"t": HOLDS}
    # the headline: 70.5% (50% + KD) against 71.0% (100%): the interval crosses -1 point, so no match is claimed
    head = preset[5]["comparisons"][0]
    assert head["diff"] == pytest.approx(0.705 - 0.71) and head["ci95"][0] < -0.01
    assert preset[5]["verdict"] == UNDETECTED
    assert [c["in_verdict"] for c in preset[5]["comparisons"]] == [True, False, False]  # the two controls
    assert "control" in preset[5]["comparisons"][1]["label"] and preset[5]["comparisons"][1]["verdict"] == HOLDS
    # 50% without KD (61%) against 100% (71%): 10 points worse, so the headline's gain is KD's
    assert preset[5]["comparisons"][2]["verdict"] == FAILS
    # claim 3: the gain of alpha 0.9 over 0.5 is +10 points at 10% and -5 at 50%: +15, beyond noise
    trend = preset[3]["comparisons"][0]
    assert trend["diff"] == pytest.approx((0.455 - 0.355) - (0.655 - 0.705)) and preset[3]["verdict"] == HOLDS
    assert trend["best_alpha"] == {"0.1": 0.9, "0.5": 0.5} and trend["selection_bias"]["0.1"] > 0


def test_claim_1_is_judged_on_the_main_teacher_first():
    accs = {(("alpha", 0),): [0.50, 0.51, 0.50, 0.51], (("alpha", 0.9), ("teacher", "big")): [0.60, 0.61, 0.60, 0.61],
            (("alpha", 0.9), ("teacher", "tiny")): [0.45, 0.46, 0.45, 0.46]}
    runs = _runs(accs, fraction=0.1)
    claims = _claims(runs, main_teacher="big")
    assert claims[1]["by_teacher"] == {"big": HOLDS, "tiny": FAILS} and claims[1]["verdict"] == HOLDS
    assert claims[1]["judged_on"] == "big"
    assert _claims(runs, main_teacher="tiny")[1]["verdict"] == FAILS


def test_cached_online_verdict_is_the_default_forms_and_families_compare_every_pair():
    accs = {(("online", False),): [0.500, 0.505, 0.500, 0.505],
            (("online", False), ("views", 4)): [0.55, 0.56, 0.55, 0.56],
            (("online", False), ("views", 16)): [0.49, 0.50, 0.49, 0.50],
            (("online", True),): [0.502, 0.503, 0.502, 0.503]}
    runs = _runs(accs, fraction=0.1, alpha=0.9, augment=True)
    claims = _claims(runs, margin=0.01)
    online = claims[6]["comparisons"]
    assert [("clean view" in c["label"], c["in_verdict"]) for c in online] == [(True, True), (False, False),
                                                                                  (False, False)]
    assert claims[6]["verdict"] == HOLDS  # clean view -0.0 points, interval well inside [-1, +1]
    # 16 views: 0.75 points below the clean view, interval about [-1.2, -0.3]: worse, the margin not excluded
    assert [c["verdict"] for c in claims[7]["comparisons"]] == [HOLDS, WORSE] and claims[7]["verdict"] == WORSE
    cells = make_cells(runs)
    pairs = family_pairs(cells, Context(Noise.pooled([c.acc for c in cells]), 0.01, None))
    assert len(pairs) == 6 and {p["family"] for p in pairs} == {"cache form"}   # 4 cells: every pair
    sixteen_vs_four = next(p for p in pairs if "16 stored" in p["label"] and "4 stored" in p["label"])
    two = make_cells(_runs({k: v for k, v in list(accs.items())[:2]}, fraction=0.1, alpha=0.9, augment=True))
    assert len(family_pairs(two, Context(Noise.pooled([c.acc for c in two]), 0.01, None))) == 1  # a family of two
    assert sixteen_vs_four["verdict"] in ("A better", "B better")
    assert abs(sixteen_vs_four["diff"]) == pytest.approx(0.06)


def test_sparse_targets_claim():
    accs = {(("topk", 0), ("sample", 0)): [0.50, 0.51], (("topk", 1), ("sample", 0)): [0.40, 0.41],
            (("topk", 0), ("sample", 3)): [0.503, 0.507]}
    runs = _runs(accs, fraction=0.1, alpha=0.9, augment=True)
    labels = [c["label"].split(": ", 1)[1] for c in _claims(runs)[8]["comparisons"]]
    assert labels == ["top-1 vs full logits", "3 sampled draws vs full logits"]  # bytes unknown: not claimed
    for r in runs:  # as summary.json gives them: the store's measured bytes per sample
        c = r["config"]
        r["summary"]["cache_bytes_per_sample"] = 3 * (c.get("topk") or 0) + 2 * (c.get("sample") or 0)
    comps = _claims(runs)[8]["comparisons"]
    assert [c["label"].split(": ", 1)[1] for c in comps] == ["top-1 (3 bytes per sample) vs full logits",
                                                             "3 sampled draws (6 bytes per sample) vs full logits"]
    # sampled draws +0.0 points, but with 2 seeds (3 degrees of freedom) the interval is about +-2 points wide:
    # it crosses -1, so no match is claimed
    assert [c["verdict"] for c in comps] == [FAILS, UNDETECTED]


@pytest.mark.parametrize("study", ["views-cpu", "targets-cpu"])
def test_committed_reports_regenerate_from_results_csv(study, tmp_path):
    """A committed study's report folder (results.csv + protocol.toml) is enough to rerun the report, and
    doing it twice gives the same verdicts (the regenerated results.csv reads back)."""
    src = ROOT / "results" / study
    shutil.copy(src / "results.csv", tmp_path / "results.csv")
    shutil.copy(src / "protocol.toml", tmp_path / "protocol.toml")
    run_cli("report", tmp_path, "--out", tmp_path)
    first = json.loads((tmp_path / "verdicts.json").read_text())
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert len(rows[0]) == len(set(rows[0])), "no duplicate columns"
    run_cli("report", tmp_path, "--out", tmp_path)
    second = json.loads((tmp_path / "verdicts.json").read_text())
    assert [c["verdict"] for c in first["claims"]] == [c["verdict"] for c in second["claims"]]
    assert first["noise"] == second["noise"] and first["noise"]["df"] > 0
    assert first["runs_finished"] == len(rows) - 1


def test_bad_margin_is_one_line(tmp_path):
    result = run_cli("report", ROOT / "results" / "views-cpu", "--out", tmp_path, "--margin", "-1", expect=2)
    assert result.output.strip() == "error: --margin must be 0 or more accuracy points, got -1.0"


def test_the_paper_cpu_grid_measures_its_claims_and_its_report_rebuilds_from_its_csvs(tmp_path):
    """protocols/paper-cpu.toml's own student grid, with made-up accuracies (KD +8 points, score methods -3,
    a resnet20 student +5): every claim it has cells for is measured (claim 3 between 2% and 10%, not the
    headline's 50% with and without KD), and the report rebuilt from its CSVs keeps the teachers (claim 4,
    teacher accuracies)."""
    from kdcache.protocol import load_protocol, student_runs
    from kdcache.report import write_csvs, write_report

    grid = student_runs(load_protocol(ROOT / "protocols" / "paper-cpu.toml"))
    configs = {json.dumps(r, sort_keys=True): r for r in grid}  # the sweep runs a repeated run once
    rng, runs = random.Random(0), []
    for i, c in enumerate(configs.values()):
        acc = ({0.02: 0.50, 0.1: 0.62, 0.5: 0.80, 1.0: 0.85}[c["fraction"]] + 0.08 * (c["alpha"] > 0)
               - 0.03 * (c["method"] != "random") + 0.05 * (c["arch"] == "resnet20") + rng.gauss(0, 0.01))
        runs.append({"name": f"s{i}", "folder": f"students/s{i}", "config": c, "train_config": {"device": "cpu"},
                     "summary": {"test_acc": acc, "best_test_acc": acc, "images_per_sec": 100.0, "train_seconds": 1.0,
                                 "epochs": c["epochs"], "steps": 10, "num_selected": 1, "cache_bytes_per_sample": 20}})
    teachers = {"resnet20": {"arch": "resnet20", "parameters": 272474, "epochs": 30, "steps": 5880, "test_acc": 0.8614,
                             "train_seconds": 2069.3},
                "resnet8": {"arch": "resnet8", "parameters": 78042, "epochs": 30, "steps": 5880, "test_acc": 0.80,
                            "train_seconds": 900.0}}
    write_csvs(tmp_path, runs, make_cells(runs), teachers, [])
    shutil.copy(ROOT / "protocols" / "paper-cpu.toml", tmp_path / "protocol.toml")
    result = write_report(tmp_path, tmp_path)

    claims = {c["id"]: c for c in result["claims"]}
    assert [i for i, c in claims.items() if c["verdict"] == UNMEASURED] == [7, 8]
    assert claims[1]["judged_on"] == "resnet20" and claims[1]["verdict"] == HOLDS
    (trend,) = claims[3]["comparisons"]
    assert "gain of alpha 0.9 over 0.5 at 0.02 minus at 0.1" in trend["label"]
    (small,) = claims[4]["comparisons"]
    assert "resnet20 student: teacher resnet8 (78,042 parameters) vs resnet20 (272,474)" in small["label"]
    assert [c["in_verdict"] for c in claims[5]["comparisons"]] == [True, False, False]
    assert "0.5 without KD vs 100% without KD" in claims[5]["comparisons"][2]["label"]
    assert len(claims[2]["comparisons"]) == 6 and len(claims[6]["comparisons"]) == 1
    assert result["teachers"]["resnet8"]["test_acc"] == 0.80
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["teacher_test_acc"] for r in rows if r["teacher"] == "resnet20"} == {"0.8614"}
    assert len(list(csv.DictReader((tmp_path / "teachers.csv").open()))) == 2
    assert "| 2, 4 |" in (tmp_path / "report.md").read_text()  # score methods (2 seeds) against random (4)
