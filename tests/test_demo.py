import json

import pytest
from kdcache_cli.demo import main

from kdcache.run_folder import read_metrics

TINY = ["--source", "synthetic", "--data-option", "num-train=400", "--data-option", "num-test=200",
        "--data-option", "num-classes=4", "--data-option", "image-size=16", "--teacher-epochs", "2",
        "--student-epochs", "2", "--eval-every", "1", "--batch-size", "32", "--lr", "0.05",
        "--teacher-lr", "0.05", "--fraction", "0.25", "--workers", "1"]


@pytest.mark.slow
def test_demo_runs_every_stage_then_reuses_them(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = main(["--out", str(out), *TINY])
    printed = capsys.readouterr().out
    stages = ["data", "teacher", "dump", "select"] + [f"student: {s['name']}" for s in summary["students"]]
    positions = [printed.index(f"== {stage}\n") for stage in stages]
    assert positions == sorted(positions)  # in pipeline order
    assert "$ kdcache train --data" in printed and "$ kdcache info" in printed

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert 0 < on_disk["teacher"]["test_acc"] <= 1
    names = [s["name"] for s in on_disk["students"]]
    assert names == ["random 0.25, no teacher", "random 0.25, cached KD", "el2n (hard, per class) 0.25, cached KD"]
    for s in on_disk["students"]:
        assert 0 <= s["test_acc"] <= 1 and s["images_per_sec"] > 0 and s["num_selected"] == 100
    assert on_disk["students"][0]["alpha"] == 0 and on_disk["students"][1]["alpha"] > 0
    assert on_disk["students"][1]["gain_over_no_teacher"] == on_disk["students"][1]["test_acc"] - on_disk[
        "students"][0]["test_acc"]
    assert on_disk["cache"]["bytes_per_sample"] == 4 * 2
    assert on_disk["schedule"]["student_epochs"] == 2 and on_disk["total_seconds"] > 0
    assert set(on_disk["stage_seconds"]) == set(stages)
    for key in ("data", "teacher", "cache", "summary", "plot"):
        assert on_disk["outputs"][key]
    assert [r["epoch"] for r in read_metrics(out / "student-random-kd")] == [1, 2]
    for line in ("teacher (resnet20, all data)", "student: random 0.25, cached KD", "bytes per sample"):
        assert line in printed
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run finds every stage finished and only rebuilds the report.
    again = main(["--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert printed.count("done already, skipped") == len(stages)
    assert "$ kdcache" not in printed
    assert again["students"] == summary["students"]
    assert again["stage_seconds"] == summary["stage_seconds"]  # what each stage cost when it ran
    assert again["this_run_seconds"] < summary["this_run_seconds"]


@pytest.mark.slow
def test_demo_rerun_with_other_options_redoes_what_they_change(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["--out", str(out), *TINY])
    capsys.readouterr()
    again = main(["--out", str(out), *TINY, "--fraction", "0.5"])  # the later value of an option wins
    printed = capsys.readouterr().out
    for skipped in ("data", "teacher", "dump"):
        assert f"== {skipped}: done already, skipped" in printed
    assert "== select\n" in printed and printed.count("$ kdcache train") == 3  # never a stale student
    assert [s["num_selected"] for s in again["students"]] == [200, 200, 200]
