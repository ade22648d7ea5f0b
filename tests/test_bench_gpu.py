"""The one-command GPU benchmark runs at toy size on the CPU, so it cannot rot between GPU loans."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SUBPROCESS_TIMEOUT


@pytest.mark.slow
def test_gpu_benchmark_runs_at_toy_size_on_cpu(tmp_path):
    # (f) on "real" images carried as an .npz, the form a GPU machine gets them in (see --make-real)
    real = tmp_path / "real.npz"
    rng = np.random.default_rng(0)
    np.savez(real, classes=np.array(["a", "b"]), train_images=rng.integers(0, 256, (48, 16, 16, 3), np.uint8),
             train_labels=np.arange(48) % 2, test_images=rng.integers(0, 256, (16, 16, 16, 3), np.uint8),
             test_labels=np.arange(16) % 2)
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick",
                        "--workers", "1", "--out", str(out), "--real", str(real), "--real-epochs", "1",
                        "--real-arch", "resnet8"],
                       capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT, cwd=ROOT / "benchmarks")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["quick"] and r["samples"] == 256
    speed = r["images_per_sec"]
    assert set(speed) == {"ce", "cached_kd", "cached_kd_views2", "online_kd_resnet50", "online_kd_resnet8", "ce_ffcv"}
    assert r["ratios"]["resident_over_ffcv"] == pytest.approx(speed["ce"] / speed["ce_ffcv"])
    attainable = 1 + r["bound_images_per_sec"] / r["resnet50_forward_images_per_sec"]
    assert r["attainable_cached_over_online_resnet50"] == pytest.approx(attainable)
    assert r["ratios"]["online_resnet50_of_attainable"] == pytest.approx(
        r["ratios"]["cached_over_online_resnet50"] / attainable)
    assert r["syncs_per_5_steps"] == {"ce": 0, "cached_kd": 0}  # no synchronising operator in a step
    assert r["ring"]["torn"] == 0 and r["ring"]["batches"] == 8  # 256 samples, batch 32
    assert r["ratios"]["views_over_cached"] == pytest.approx(speed["cached_kd_views2"] / speed["cached_kd"])
    assert r["views"] == 2 and r["dump_views_samples_per_sec"] > 0
    assert all(v > 0 for v in speed.values()) and r["bound_images_per_sec"] > 0
    assert r["ratios"]["cached_over_ce"] == pytest.approx(speed["cached_kd"] / speed["ce"])
    assert r["ratios"]["dump_over_bare"] == pytest.approx(r["dump_samples_per_sec"] / r["bare_samples_per_sec"])
    assert set(r["met"]) == set(r["targets"])
    acc = r["accuracy"]
    assert acc["data"] == str(real) and acc["samples"] == 48 and acc["epochs"] == 1 and 0 <= acc["test_acc"] <= 1
    assert acc["arch"] == "resnet8" and r["first_dump_samples_per_sec"] > 0
    assert f"(f) test accuracy {acc['test_acc']:.4f}: resnet8, 1 CE epochs on 48 samples" in p.stdout
