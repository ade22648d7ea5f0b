"""`make bench` ends with one table of every result against its target."""
import importlib.util
import json

from conftest import ROOT


def load_summary():
    spec = importlib.util.spec_from_file_location("summary", ROOT / "benchmarks" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_table_says_which_targets_are_met(tmp_path, capsys):
    summary = load_summary()
    summary.RESULTS = tmp_path
    (tmp_path / "bench_dump.json").write_text(json.dumps(
        {"benchmark": "dump", "machine": "cpu A", "ratio": 0.96, "dump_samples_per_s": 960.0,
         "bare_samples_per_s": 1000.0, "teacher": "resnet20"}))
    (tmp_path / "bench_study.json").write_text(json.dumps(
        {"benchmark": "study", "machine": "cpu A", "students": 12, "target_speedup_resnet50": 3.0,
         "by_teacher": {"resnet50": {"speedup": 2.5, "cached_study_seconds": 400.0, "online_seconds_scaled": 1000.0,
                                     "break_even_students": 5.25},
                        "resnet8": {"speedup": 0.5, "cached_study_seconds": 400.0, "online_seconds_scaled": 200.0,
                                    "break_even_students": None}}}))
    summary.main()
    table = (tmp_path / "summary.md").read_text()
    assert table in capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| measure | value | target | met | detail | machine |" and len(lines) == 5
    assert lines[2] == ("| dump / bare teacher inference | 0.96 | >= 0.95 | yes | 960 vs 1,000 samples/s, resnet20 "
                        "| cpu A |")
    assert lines[3].startswith("| study of 12 students: cache / online (resnet50) | 2.50 | >= 3 | no | 400 s vs "
                               "1,000 s; break-even at 5.2 students |")
    assert "| 0.50 |  |  | 400 s vs 200 s; never breaks even |" in lines[4]


def test_summary_states_the_host_overhead_against_its_goal(tmp_path, capsys):
    summary = load_summary()
    summary.RESULTS = tmp_path
    (tmp_path / "host.json").write_text(json.dumps(
        {"benchmark": "host", "machine": "cpu A", "arch": "resnet8", "image_size": 8, "goal": 1.25,
         "by_batch": {"16": {"us_per_step": {"bare": 1000.0, "resident": 1200.0, "ffcv": 3000.0},
                             "overhead_ratio": 1.2, "ffcv_ratio": 3.0}}}))
    summary.main()
    row = (tmp_path / "summary.md").read_text().splitlines()[2]
    assert row.startswith("| bare step / trainer step on CPU (resident path, batch 16) | 0.83 | >= 0.8 | yes | "
                          "1,200 vs 1,000 us per step (overhead_ratio 1.20, goal <= 1.25); FFCV path 3,000 us (3.00x)")
