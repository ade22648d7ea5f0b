"""`kdcache sweep` (run a protocol's unfinished stages) and `kdcache report` (tables, plots, verdicts)."""
import click

SHOW = {"show_default": True}


@click.command()
@click.argument("protocol")
@click.option("--out", default=None, help="Sweep folder [default: runs/<protocol file stem>].")
@click.option("--shard", default="0/1", **SHOW,
              help="i/n: run only the i-th (from 0) of n deterministic shares of the students, e.g. a job "
                   "array's index; prerequisite stages are shared under file locks.")
@click.option("--dry-run", is_flag=True, help="List the stages and students with their status; run nothing.")
@click.option("--workers", default=-1, **SHOW, help="FFCV loader and writer threads (-1: all cores).")
@click.option("--device", default="auto", **SHOW, help="auto, cpu, cuda or cuda:N.")
def sweep(protocol, out, shard, dry_run, workers, device):
    """Run every unfinished stage of PROTOCOL (a .toml file, or a name under protocols/): data, teachers,
    dumps, selections, students. Finished stages are skipped, killed ones resumed."""
    from kdcache.sweep import run_sweep

    run_sweep(protocol, out=out, shard=shard, dry=dry_run, workers=workers, device=device,
              echo=lambda line: click.echo(line))


@click.command()
@click.argument("sweep_dir")
@click.option("--out", default=None, help="Report folder [default: SWEEP_DIR/report].")
@click.option("--margin", type=float, default=None,
              help="Non-inferiority margin of 'matches or beats' claims, in accuracy points [default: the "
                   "protocol's [report] margin, else 1].")
def report(sweep_dir, out, margin):
    """Turn the run folders of SWEEP_DIR (written by kdcache sweep), or a report folder holding results.csv and
    protocol.toml, into report.md, CSVs, verdicts.json and plots."""
    from kdcache.report import write_report

    result = write_report(sweep_dir, out=out, margin=margin)
    for claim in result["claims"]:
        click.echo(f"claim {claim['id']}: {claim['verdict']:<22} {claim['claim']}")
    click.echo(f"{result['runs_finished']} of {result['runs_total']} runs finished -> "
               f"{out or sweep_dir.rstrip('/') + '/report'}/report.md")
