"""`kdcache select`: a pruned subset of the training set, as sample indices."""
import sys

import click

from kdcache.selection import METHODS_HELP, SelectOptions

SHOW = {"show_default": True}
S = SelectOptions()


@click.command()
@click.option("--store", default=None, help="Store with scores (path or URL): a logit cache or a dynamics store.")
@click.option("--method", required=True, help=f"Selection method: {METHODS_HELP}.")
@click.option("--fraction", type=float, required=True, help="Fraction of training samples kept, in (0, 1].")
@click.option("--keep", type=click.Choice(["hard", "easy"]), default=S.keep, **SHOW,
              help="Which end of the score to keep (score methods).")
@click.option("--class-balanced", is_flag=True, default=False, **SHOW,
              help="Keep the same fraction of every class.")
@click.option("--seed", default=0, **SHOW, help="Seed for random choices and tie-breaking.")
@click.option("--data", type=click.Path(), default=None,
              help="Training .beton: labels and a check that the store belongs to it "
                   "[default: the store's labels, unchecked].")
@click.option("--ccs-beta", default=S.ccs_beta, **SHOW,
              help="ccs: fraction of hardest samples dropped first (Zheng et al. tune it per fraction, e.g. "
                   "0.3 at 10% kept on CIFAR-10).")
@click.option("--ccs-strata", default=S.ccs_strata, **SHOW, help="ccs: number of equal-width score strata.")
@click.option("--ccs-score", default=S.ccs_score, show_default="aum if the store has it, else el2n",
              help="ccs: the score that defines the strata.")
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
