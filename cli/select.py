"""`kdcache select`: a pruned subset of the training set, as sample indices."""
import sys

import click

from .options import selection_options

SHOW = {"show_default": True}


@click.command()
@click.option("--store", default=None, help="Store with scores (path or URL): a logit cache or a dynamics store.")
@selection_options(required=("method", "fraction"))
@click.option("--seed", default=0, **SHOW, help="Seed for random choices and tie-breaking.")
@click.option("--data", type=click.Path(), default=None,
              help="Training .beton: labels and a check that the store belongs to it "
                   "[default: the store's labels, unchecked].")
@click.option("--out", type=click.Path(), required=True, help="Output .npy of sorted indices (+ .json sidecar).")
def select(store, method, fraction, keep, class_balanced, seed, data, ccs_beta, ccs_strata, ccs_score, out):
    """Select a subset of the training set: write its sorted sample indices and a JSON sidecar."""
    from kdcache.beton import dataset_info
    from kdcache.selection import choose_subset, save_selection, sidecar_path

    if not out.endswith(".npy"):
        out += ".npy"  # what np.load and `kdcache train --indices` expect; the sidecar goes beside it
    if sys.stderr.isatty():  # a progress note for a person waiting; errors stay one line in logs and pipes
        click.echo(f"selecting {fraction:g} of the training set by {method} ...", err=True)
    info = dataset_info(data) if data else None
    indices, sidecar = choose_subset(info, method, fraction, store=store, keep=keep,
                                     class_balanced=class_balanced, seed=seed, ccs_beta=ccs_beta,
                                     ccs_strata=ccs_strata, ccs_score=ccs_score)
    save_selection(out, indices, sidecar)
    what = method if method in ("random", "ccs") else f"{method}, keep {keep}"
    click.echo(f"selected {sidecar['num_selected']} of {sidecar['num_samples']} samples ({what}"
               f"{', class-balanced' if class_balanced else ''}); per class {sidecar['class_counts']} "
               f"-> {out} (+ {sidecar_path(out).name})")
