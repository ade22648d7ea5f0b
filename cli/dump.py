"""`kdcache dump` (teacher logits and scores into a Zarr store) and `kdcache info` (describe a store)."""
import json

import click

from kdcache.dump import DumpOptions
from kdcache.models import ARCH_HELP

SHOW = {"show_default": True}
D = DumpOptions()


@click.command()
@click.option("--teacher", required=True, help=f"Teacher model: {ARCH_HELP}.")
@click.option("--checkpoint", type=click.Path(), default=None, help="Teacher checkpoint written by kdcache train.")
@click.option("--pretrained", is_flag=True, default=False, **SHOW,
              help="Use torchvision's pretrained weights (needs network access or a cached download).")
@click.option("--data", type=click.Path(), required=True, help="The training split's .beton.")
@click.option("--out", required=True, help="Store path or URL (file://, s3://, ...).")
@click.option("--batch-size", default=D.batch_size, **SHOW, help="Samples per teacher batch.")
@click.option("--chunk-rows", default=D.chunk_rows, **SHOW,
              help="Samples per store chunk, the unit of resuming; a multiple of --batch-size.")
@click.option("--topk", default=D.topk, **SHOW,
              help="Store only the K most probable classes' log-probabilities (0: all logits).")
@click.option("--temperature", default=D.temperature, **SHOW,
              help="With --topk or --sample: the teacher's temperature for the targets; students train at it.")
@click.option("--sample", default=D.sample, **SHOW,
              help="Store S classes drawn from the tempered teacher with their counts: unbiased sparse targets "
                   "(Sparse Logit Sampling; 0: off).")
@click.option("--sample-seed", default=D.sample_seed, **SHOW, help="Seed of the --sample draws.")
@click.option("--views", default=D.views, **SHOW,
              help="1: the teacher's outputs on the clean image. K > 1: on K augmented views per sample (pad-4 "
                   "crop + flip), stored with their parameters; students are shown exactly those views.")
@click.option("--view-seed", default=D.view_seed, **SHOW, help="Seed of the --views draws.")
@click.option("--device", default=D.device, **SHOW, help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option("--workers", default=D.workers, **SHOW, help="FFCV loader threads (-1: all cores).")
@click.option("--overwrite", is_flag=True, default=False, **SHOW,
              help="Start over when --out holds another dump's store.")
def dump(teacher, checkpoint, pretrained, data, out, batch_size, chunk_rows, topk, temperature, sample, sample_seed,
         views, view_seed, device, workers, overwrite):
    """Run the teacher once over the training set; cache its logits and difficulty scores in a Zarr
    store. A killed dump resumes when run again; under torchrun the ranks share the work."""
    from kdcache.device import rank
    from kdcache.dump import dump as run_dump

    attrs = run_dump(teacher=teacher, checkpoint=checkpoint, pretrained=pretrained, data=data, out=out,
                     batch_size=batch_size, chunk_rows=chunk_rows, topk=topk, temperature=temperature, sample=sample,
                     sample_seed=sample_seed, views=views, view_seed=view_seed, device=device, workers=workers,
                     overwrite=overwrite)
    if rank() == 0:
        click.echo(f"{attrs['num_samples']} samples, teacher {teacher} accuracy "
                   f"{100 * attrs['teacher_accuracy']:.2f}% -> {out}")


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, default=False, **SHOW, help="Print JSON.")
def info(store, as_json):
    """Describe a kdcache STORE (path or URL): arrays, teacher, accuracy, completeness, scores."""
    from kdcache.store import TRAIN_FINGERPRINT, describe_store

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
        if (a.get("views") or 1) > 1:
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
