"""`kdcache demo` (`make demo`): the whole pipeline through the public `kdcache` commands, ending in a
result table and a plot.

Stages: data -> teacher (full data, no KD) -> dump (+ info) -> select -> three students on the same
kept fraction: random without a teacher, random with the cached teacher, score-selected with the
cached teacher. Every stage's output is complete or absent, so a rerun redoes only what is missing,
or what other options change (and the stages after it).

    kdcache demo --out runs/demo                       # Fashion-MNIST (the default)
    kdcache demo --out runs/c10 --source cifar10 --src ../shared/datasets/cifar10

It drives the other commands as a user would type them, so it lives with the front end, not in the
library.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from types import SimpleNamespace

import click

from kdcache.files import atomic, write_json
from kdcache.run_folder import read_metrics
from kdcache.store import is_complete_cache

SHOW = {"show_default": True}


def kdcache(*args) -> None:
    """Run one `kdcache` command in this process, as a user would type it."""
    from kdcache_cli.main import cli

    args = [str(a) for a in args]
    print(f"\n$ kdcache {shlex.join(args)}", flush=True)
    try:
        cli.main(args=args, prog_name="kdcache", standalone_mode=False)
    except SystemExit as e:
        if e.code:  # the command has said why on stderr; keep its exit status (2: a user's mistake)
            click.echo(f"demo stopped: `kdcache {args[0]}` failed (exit {e.code})", err=True)
            raise SystemExit(e.code)


def plot(path: Path, students: dict[str, Path], teacher_acc: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, run in students.items():
        rows = [r for r in read_metrics(run) if r["test_acc"] is not None]
        ax.plot([r["epoch"] for r in rows], [100 * r["test_acc"] for r in rows], marker="o", ms=3, label=label)
    ax.axhline(100 * teacher_acc, color="k", ls="--", lw=1, label=f"teacher (full data) {100 * teacher_acc:.1f}%")
    ax.set_ylim(top=max(ax.get_ylim()[1], 100 * teacher_acc) + 2)  # keep the teacher's line off the frame
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@click.command()
@click.option("--out", default="runs/demo", **SHOW, help="Folder for every output.")
@click.option("--source", default="fashion-mnist", **SHOW, help="kdcache data source.")
@click.option("--src", default=None, help="Source folder, where the source needs one.")
@click.option("--data-option", multiple=True, metavar="OPT=VALUE",
              help="Extra `kdcache data` option, e.g. num-train=400 for synthetic data (repeatable).")
@click.option("--teacher-arch", default="resnet20", **SHOW)
@click.option("--student-arch", default="resnet8", **SHOW)
@click.option("--teacher-epochs", default=2, **SHOW)
@click.option("--student-epochs", default=60, **SHOW,
              help="Soft targets pay off over long schedules; 60 epochs of 2% are 72k images (~1 min on 2 cores).")
@click.option("--eval-every", default=10, **SHOW, help="Students' test evaluations: every N epochs.")
@click.option("--augment/--no-augment", default=False, **SHOW,
              help="Random crop + flip (off by default: these short schedules converge faster without).")
@click.option("--temperature", default=4.0, **SHOW, help="KD temperature.")
@click.option("--batch-size", default=256, **SHOW)
@click.option("--teacher-lr", default=0.2, **SHOW)
@click.option("--lr", default=0.1, **SHOW, help="Students' peak learning rate.")
@click.option("--fraction", default=0.02, **SHOW,
              help="Kept fraction: small, where the teacher's knowledge matters most.")
@click.option("--score", default="el2n", **SHOW, help="Score for the third student.")
@click.option("--keep", type=click.Choice(["hard", "easy"]), default="hard", **SHOW,
              help="End of --score to keep, per class (as in the papers).")
@click.option("--seed", default=0, **SHOW)
@click.option("--workers", default=-1, **SHOW, help="Loader threads (-1: all cores).")
def demo(**options) -> dict:
    """Run the whole pipeline on a small dataset and print what the cached teacher adds."""
    return run(SimpleNamespace(**options))


def main(argv: list[str] | None = None) -> dict:
    """`kdcache demo` with these arguments, in this process; returns the summary."""
    return demo.main(args=argv, prog_name="kdcache demo", standalone_mode=False)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, cache, teacher = out / "data", out / "cache.zarr", out / "teacher"
    train_beton = data / "train.beton"
    common = ["--batch-size", args.batch_size, "--seed", args.seed, "--workers", args.workers,
              "--augment" if args.augment else "--no-augment"]
    # each finished stage's time is kept, so a rerun that skips it still reports what it cost; and its
    # commands, so that a rerun with other options redoes it (and every stage after it) instead of
    # reporting stale results
    times_path, commands_path = out / "stage_seconds.json", out / "stage_commands.json"
    timings: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    ran: dict[str, list] = json.loads(commands_path.read_text()) if commands_path.is_file() else {}
    t_start = time.perf_counter()
    redo_rest = False

    def stage(name: str, done: bool, *commands: list) -> None:
        nonlocal redo_rest
        wanted = [[str(a) for a in command] for command in commands]
        if done and ran.get(name) == wanted and not redo_rest:
            print(f"\n== {name}: done already, skipped", flush=True)
            timings.setdefault(name, 0.0)
            return
        redo_rest = True
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        for command in commands:
            kdcache(*command)
        timings[name] = round(time.perf_counter() - t0, 1)
        ran[name] = wanted
        print(f"== {name}: {timings[name]:.1f} s", flush=True)
        write_json(times_path, timings)
        write_json(commands_path, ran)

    extra = [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.data_option]
    stage("data", (data / "manifest.json").is_file(),
          ["data", args.source, "--out", data, *(["--src", args.src] if args.src else []), *extra])
    stage("teacher", (teacher / "summary.json").is_file(),
          ["train", "--data", train_beton, "--out", teacher, "--arch", args.teacher_arch, "--fraction", 1,
           "--alpha", 0, "--epochs", args.teacher_epochs, "--lr", args.teacher_lr, *common, "--overwrite"])
    stage("dump", is_complete_cache(str(cache)),
          ["dump", "--teacher", args.teacher_arch, "--checkpoint", teacher / "model.pt", "--data", train_beton,
           "--out", cache, "--overwrite", "--workers", args.workers, "--batch-size", 500, "--chunk-rows", 5000],
          ["info", cache])
    selection = out / f"select-{args.score}.npy"
    stage("select", selection.is_file() and selection.with_suffix(".json").is_file(),
          # class-balanced: one end of a score alone can leave whole classes out
          ["select", "--store", cache, "--data", train_beton, "--method", args.score, "--keep", args.keep,
           "--class-balanced", "--fraction", args.fraction, "--seed", args.seed, "--out", selection])
    student = ["--data", train_beton, "--arch", args.student_arch, "--epochs", args.student_epochs, "--lr", args.lr,
               "--eval-every", args.eval_every, "--temperature", args.temperature, *common]
    runs = {
        f"random {args.fraction:g}, no teacher": (out / "student-random-ce", ["--fraction", args.fraction,
                                                                               "--alpha", 0]),
        f"random {args.fraction:g}, cached KD": (out / "student-random-kd", ["--fraction", args.fraction,
                                                                              "--alpha", "auto", "--cache", cache]),
        f"{args.score} ({args.keep}, per class) {args.fraction:g}, cached KD": (
            out / f"student-{args.score}-kd", ["--indices", selection, "--alpha", "auto", "--cache", cache]),
    }
    for label, (run, options) in runs.items():  # a stage runs only when not done with these commands
        stage(f"student: {label}", (run / "summary.json").is_file(),
              ["train", *student, "--out", run, *options, "--overwrite"])

    stages = ["data", "teacher", "dump", "select"] + [f"student: {label}" for label in runs]
    return report(out, args, teacher, cache, runs, {k: timings[k] for k in stages}, time.perf_counter() - t_start)


def report(out: Path, args, teacher: Path, cache: Path, runs: dict, timings: dict, wall: float) -> dict:
    from kdcache.store import describe_store

    t_sum = json.loads((teacher / "summary.json").read_text())
    store = describe_store(str(cache))
    summaries = {label: json.loads((run / "summary.json").read_text()) for label, (run, _) in runs.items()}
    base = next(iter(summaries.values()))["test_acc"]
    students = [{"name": label, "run": str(run), "test_acc": s["test_acc"],
                 "gain_over_no_teacher": s["test_acc"] - base, "alpha": s["alpha"],
                 "num_selected": s["num_selected"], "images_per_sec": s["images_per_sec"]}
                for (label, (run, _)), s in zip(runs.items(), summaries.values())]
    summary = {
        "dataset": args.source, "teacher": {"arch": args.teacher_arch, "epochs": args.teacher_epochs,
                                            "test_acc": t_sum["test_acc"], "images_per_sec": t_sum["images_per_sec"],
                                            "run": str(teacher)},
        "students": students,
        "schedule": {"student_arch": args.student_arch, "student_epochs": args.student_epochs,
                     "fraction": args.fraction, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "temperature": args.temperature, "augment": args.augment, "teacher_lr": args.teacher_lr,
                     "score": args.score, "keep": args.keep},
        "cache": {"path": str(cache), "bytes_per_sample": store["bytes_per_sample"],
                  "teacher_accuracy_on_train": store["attrs"].get("teacher_accuracy")},
        "stage_seconds": timings, "total_seconds": round(sum(timings.values()), 1),
        "this_run_seconds": round(wall, 1),
        "outputs": {"data": str(out / "data"), "teacher": str(teacher / "model.pt"), "cache": str(cache),
                    "students": [str(run) for run, _ in runs.values()], "summary": str(out / "summary.json"),
                    "plot": str(out / "demo.png")},
    }
    plot(out / "demo.png", {label: run for label, (run, _) in runs.items()}, t_sum["test_acc"],
         f"{args.source}: students on {args.fraction:.0%} of the data, {args.student_arch}")
    write_json(out / "summary.json", summary)
    print(table(summary))
    return summary


def table(s: dict) -> str:
    t = s["teacher"]
    sch = s["schedule"]
    lines = [
        "",
        f"kdcache demo on {s['dataset']}: students see {sch['fraction']:.0%} of the training data",
        f"schedule: teacher {t['arch']} {t['epochs']} epochs on all data (lr {sch['teacher_lr']}); students "
        f"{sch['student_arch']} {sch['student_epochs']} epochs (lr {sch['lr']}, T {sch['temperature']}); "
        f"batch {sch['batch_size']}, augmentation {'on' if sch['augment'] else 'off'}, seed {sch['seed']}",
        "",
        f"{'model':50s} {'test acc':>9s} {'gain':>8s} {'alpha':>6s} {'img/s':>7s}",
        f"{'teacher (' + t['arch'] + ', all data)':50s} {100 * t['test_acc']:8.2f}% {'':>8s} {0:6.2f} "
        f"{t['images_per_sec']:7.0f}",
    ]
    for st in s["students"]:
        gain = f"{100 * st['gain_over_no_teacher']:+7.2f}" if st is not s["students"][0] else "     --"
        lines.append(f"{'student: ' + st['name']:50s} {100 * st['test_acc']:8.2f}% {gain:>8s} {st['alpha']:6.2f} "
                     f"{st['images_per_sec']:7.0f}")
    lines += [
        "",
        f"cache: {s['cache']['bytes_per_sample']} bytes per sample ({s['cache']['path']})",
        "stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in s["stage_seconds"].items())
        + f"; total {s['total_seconds']:.0f} s (this run {s['this_run_seconds']:.0f} s)",
        "outputs: data " + s["outputs"]["data"] + ", teacher " + s["outputs"]["teacher"] + ", students "
        + ", ".join(s["outputs"]["students"]),
        f"summary: {s['outputs']['summary']}   plot: {s['outputs']['plot']}",
    ]
    return "\n".join(lines)

