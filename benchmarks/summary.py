"""One table of every benchmark result in benchmarks/results/ (what `make bench` ends with), against the
targets; printed as Markdown and written to benchmarks/results/summary.md, so README can show it as is."""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def rows_of(r: dict) -> list[tuple[str, float, float | None, str]]:
    """(measure, value, target or None, detail) of one benchmark's result; a value meets its target when
    it is at least the target."""
    rows = []
    if r["benchmark"] == "loader":
        for path_name, label in (("small", "CIFAR-10, pad-4 crop + flip"), ("large", "JPEG folder, RRC + flip")):
            x = r[path_name]
            rows.append((f"loader / torch DataLoader ({label})", x["ratio_later"], r["target_ratio"],
                         f"{x['kdcache_img_s']['later_epochs']:,.0f} vs {x['torch_img_s']['later_epochs']:,.0f} img/s, "
                         f"{r['workers']} workers; first epoch {x['ratio_first']:.2f}x"))
    elif r["benchmark"] == "gpu" and not r["quick"]:
        for key, target in r["targets"].items():
            rows.append((f"GPU {key.replace('_', ' ')}", r["ratios"][key], target, f"batch {r['batch_size']}"))
    elif r["benchmark"] == "study":
        for teacher, t in r["by_teacher"].items():
            target = r["target_speedup_resnet50"] if teacher == "resnet50" else None
            even = t["break_even_students"]
            rows.append((f"study of {r['students']} students: cache / online ({teacher})", t["speedup"], target,
                         f"{t['cached_study_seconds']:,.0f} s vs {t['online_seconds_scaled']:,.0f} s; "
                         + (f"break-even at {even:.1f} students" if even else "never breaks even")))
    elif r["benchmark"] == "host":
        for batch, b in r["by_batch"].items():
            u = b["us_per_step"]
            rows.append((f"bare step / trainer step on CPU (resident path, batch {batch})", 1 / b["overhead_ratio"],
                         1 / r["goal"], f"{u['resident']:,.0f} vs {u['bare']:,.0f} us per step (overhead_ratio "
                         f"{b['overhead_ratio']:.2f}, goal <= {r['goal']}); FFCV path {u['ffcv']:,.0f} us "
                         f"({b['ffcv_ratio']:.2f}x); {r['arch']}, {r['image_size']} px"))
    elif r["benchmark"] == "dump":
        rows.append(("dump / bare teacher inference", r["ratio"], 0.95,
                     f"{r['dump_samples_per_s']:,.0f} vs {r['bare_samples_per_s']:,.0f} samples/s, {r['teacher']}"
                     + (f", {r['num_samples']:,} samples end to end" if "num_samples" in r else "")))
        if "per_sample_ratio" in r:  # fitted over two sizes (bench_dump.py)
            sizes = " and ".join(f"{int(n):,}" for n in r["by_size"])
            d, b = r["fit"]["dump"], r["fit"]["bare"]
            rows.append(("dump / bare teacher inference: per-sample rate", r["per_sample_ratio"],
                         r["goal_per_sample_ratio"],
                         f"fitted over {sizes} samples: {d['per_sample_us']:,.1f} vs {b['per_sample_us']:,.1f} us per "
                         f"sample; the dump's fixed overhead {r['fixed_overhead_s']:.2f} s, {r['teacher']}"))
    elif r["benchmark"] == "train":
        ips = r["images_per_sec"]
        rows.append(("cached KD / CE only", r["cached_over_ce"], 0.97,
                     f"{ips['cached_kd']:,.0f} vs {ips['ce']:,.0f} img/s, {r['student']}"))
        for key in ("vs_online_big", "vs_online_small"):
            o = r[key]
            rows.append((f"cached / online KD ({o['teacher']}): step time saved", o["saving"], o["teacher_share"],
                         f"{o['cached_over_online']:.2f}x faster; the teacher's share of the online step "
                         f"{o['teacher_share']:.0%}"))
    return rows


def main() -> None:
    lines = ["| measure | value | target | met | detail | machine |", "|---|---|---|---|---|---|"]
    for path in [*sorted(RESULTS.glob("bench_*.json")), *RESULTS.glob("host.json"), *RESULTS.glob("gpu.json")]:
        r = json.loads(path.read_text())
        for name, value, target, detail in rows_of(r):
            met = "" if target is None else "yes" if value >= target else "no"
            lines.append(f"| {name} | {value:.2f} | {'' if target is None else f'>= {target:.3g}'} | {met} | "
                         f"{detail} | {r['machine']} |")
    if len(lines) == 2:
        raise SystemExit("no results yet: run make bench-loader / bench-dump / bench-train / bench-study")
    table = "\n".join(lines) + "\n"
    (RESULTS / "summary.md").write_text(table)
    print("\n" + table + f"-> {RESULTS / 'summary.md'}")


if __name__ == "__main__":
    main()
