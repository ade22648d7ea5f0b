"""`kdcache dump` (teacher logits and scores into a Zarr store) and `kdcache info` (describe a store)."""
import json

import click

from kdcache.config import DumpConfig
from kdcache.models import ARCH_HELP

from .options import options_of

SHOW = {"show_default": True}
FIRST = ("teacher", "checkpoint", "pretrained", "data", "out")  # listed first in --help


@click.command()
@options_of(DumpConfig, exclude=[n for n in DumpConfig.__dataclass_fields__ if n not in FIRST], archs=ARCH_HELP)
@options_of(DumpConfig, exclude=FIRST)
def dump(**options):
    """Run the teacher once over the training set; cache its logits and difficulty scores in a Zarr
    store. A killed dump resumes when run again; under torchrun the ranks share the work."""
    from kdcache.device import rank
    from kdcache.dump import dump as run_dump

    attrs = run_dump(DumpConfig(**options))
    if rank() == 0:
        click.echo(f"{attrs['num_samples']} samples, teacher {options['teacher']} accuracy "
                   f"{100 * attrs['teacher_accuracy']:.2f}% -> {options['out']}")


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, default=False, **SHOW, help="Print JSON.")
def info(store, as_json):
    """Describe a kdcache STORE (path or URL): arrays, teacher, accuracy, completeness, scores."""
    from kdcache.store import TRAIN_FINGERPRINT, describe_store, views_of

    d = describe_store(store)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    a = d["attrs"]
    lines = [f"store      {d['url']}  ({d['kind']}, schema {a.get('schema_version')})"]
    ds = d["dataset"]
    if ds.get("source"):
        lines.append(f"dataset    {ds['source']}, {a.get('num_samples')} samples, {ds['num_classes']} classes, "
                     f"train fingerprint {a.get(TRAIN_FINGERPRINT)}")
    elif a.get(TRAIN_FINGERPRINT):
        lines.append(f"dataset    train fingerprint {a[TRAIN_FINGERPRINT]}")
    if a.get("teacher"):
        acc = a.get("teacher_accuracy")
        lines.append(f"teacher    {a['teacher']} from {a.get('checkpoint')}"
                     + (f" (sha256 {a['checkpoint_sha256'][:16]}...)" if a.get("checkpoint_sha256") else ""))
        lines.append("accuracy   " + (f"{100 * acc:.2f}% on the samples it saw" if acc is not None
                                      else "not yet known (dump unfinished)"))
    status = "complete" if d["complete"] else "INCOMPLETE"
    lines.append(f"chunks     {d['chunks_done']} of {d['chunks_total']} done: {status}")
    if d["bytes_per_sample"]:
        form = (f"top-{a['topk']} at temperature {a['temperature']:g}" if a.get("topk")
                else f"{a['sample']} draws at temperature {a['temperature']:g}, classes + counts" if a.get("sample")
                else "all logits, any temperature")
        if views_of(a) > 1:
            form += f"; {a['views']} stored views ({a['view_recipe']}, seed {a['view_seed']}) with their parameters"
        lines.append(f"bytes      {d['bytes_per_sample']} per sample of teacher output ({form})")
    lines.append("arrays")
    width = max(len(k) for k in d["arrays"]) if d["arrays"] else 0
    for name, arr in d["arrays"].items():
        lines.append(f"  {name:<{width}}  {tuple(arr['shape'])!s:<14} {arr['dtype']:<8} "
                     f"chunks {tuple(arr['chunks'])}")
    if d["scores"]:
        lines.append(f"scores{'':<{max(width - 4, 8)}}{'min':>10} {'median':>10} {'max':>10}")
        for name, s in d["scores"].items():
            nums = " ".join(f"{v:>10.4g}" if v is not None else f"{'-':>10}" for v in
                            (s["min"], s["median"], s["max"]))
            arrow = "" if s["higher_is_harder"] else "  (higher = easier)"
            lines.append(f"  {name:<{max(width - 2, 10)}}{nums}{arrow}")
        lines += [f"  {name}: {s['description']}" for name, s in d["scores"].items() if s["description"]]
    for key in ("created", "kdcache_version", "command"):
        if a.get(key):
            lines.append(f"{key.split('_')[0]:<10} {a[key]}")
    click.echo("\n".join(lines))
