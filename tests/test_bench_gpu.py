"""The one-command GPU benchmark runs at toy size on the CPU, so it cannot rot between GPU loans."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, SUBPROCESS_TIMEOUT


def test_gpu_benchmark_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick",
                        "--workers", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT, cwd=ROOT / "benchmarks")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["quick"] and r["samples"] == 256
    speed = r["images_per_sec"]
    assert set(speed) == {"ce", "cached_kd", "online_kd_resnet50", "online_kd_resnet8"}
    assert all(v > 0 for v in speed.values()) and r["bound_images_per_sec"] > 0
    assert r["ratios"]["cached_over_ce"] == pytest.approx(speed["cached_kd"] / speed["ce"])
    assert r["ratios"]["dump_over_bare"] == pytest.approx(r["dump_samples_per_sec"] / r["bare_samples_per_sec"])
    assert set(r["met"]) == set(r["targets"]) and 0 <= r["accuracy_after_ce_run"] <= 1
    assert "(f) accuracy after 2 CE epochs" in p.stdout
