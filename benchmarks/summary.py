"""One table of every benchmark result in benchmarks/results/ (what `make bench` ends with)."""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

rows = []
for path in sorted(RESULTS.glob("bench_*.json")) + sorted(RESULTS.glob("gpu.json")):
    r = json.loads(path.read_text())
    if r["benchmark"] == "loader":
        for path_name, label in (("small", "pad-4 crop + flip"), ("large", "RRC + flip, JPEG")):
            x = r[path_name]
            rows.append((f"loader / torch DataLoader ({path_name})", f"{x['ratio_later']:.1f}x", ">= 5x",
                         f"{x['kdcache_img_s']['later_epochs']:.0f} vs {x['torch_img_s']['later_epochs']:.0f} "
                         f"img/s, {label}, {r['workers']} workers; first epoch {x['ratio_first']:.2f}x"))
    elif r["benchmark"] == "gpu" and not r["quick"]:
        for key, target in r["targets"].items():
            rows.append((f"GPU {key.replace('_', ' ')}", f"{r['ratios'][key]:.3f}", f">= {target}", r["machine"]))
    elif r["benchmark"] == "study":
        for teacher, t in r["by_teacher"].items():
            target = f">= {r['target_speedup_resnet50']}x" if teacher == "resnet50" else ""
            rows.append((f"study of {r['students']}: cache / online ({teacher})", f"{t['speedup']:.1f}x", target,
                         f"{t['cached_study_seconds']:.0f} s vs {t['online_seconds_scaled']:.0f} s; break-even at "
                         f"{t['break_even_students'] or float('inf'):.1f} students"))
    elif r["benchmark"] == "dump":
        rows.append(("dump / bare teacher inference", f"{r['ratio']:.3f}", ">= 0.95",
                     f"{r['dump_samples_per_s']:.0f} vs {r['bare_samples_per_s']:.0f} samples/s, {r['teacher']}"))
    elif r["benchmark"] == "train":
        ips = r["images_per_sec"]
        rows.append(("cached KD / CE only", f"{r['cached_over_ce']:.3f}", ">= 0.97",
                     f"{ips['cached_kd']:.0f} vs {ips['ce']:.0f} img/s, {r['student']}"))
        for key in ("vs_online_big", "vs_online_small"):
            o = r[key]
            rows.append((f"cached / online KD ({o['teacher']})", f"{o['cached_over_online']:.2f}x",
                         f"saves >= {o['teacher_share']:.0%}", f"saves {o['saving']:.0%}"))
    machine = r["machine"]
if not rows:
    raise SystemExit("no results yet: run make bench-loader / make bench-dump / make bench-train")
print(f"\n{'measure':34s} {'value':>8s}  {'target':16s} detail   ({machine})")
for name, value, target, detail in rows:
    print(f"{name:34s} {value:>8s}  {target:16s} {detail}")
