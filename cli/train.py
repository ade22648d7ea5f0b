"""`kdcache train`: a student on a pruned subset, distilled from cached teacher logits.

Defaults come from `TrainConfig` and `SelectOptions`, so the help shows what the library does."""
import click

from kdcache.distill import DEFAULT_TEMPERATURE
from kdcache.models import ARCH_HELP
from kdcache.selection import METHODS_HELP, SelectOptions
from kdcache.train import TrainConfig as C

SHOW = {"show_default": True}
S = SelectOptions()


@click.command()
@click.option("--data", type=click.Path(), required=True, help="Training .beton (from `kdcache data`).")
@click.option("--test", type=click.Path(), default=None, help="Test .beton [default: test.beton beside --data].")
@click.option("--out", type=click.Path(), required=True, help="Run folder for config, metrics, model.")
@click.option("--arch", default=C.arch, **SHOW, help=f"Student model: {ARCH_HELP}.")
@click.option("--cache", default=None, help="Teacher-logit store from `kdcache dump` (path or URL).")
@click.option("--store", default=None, help="Store holding selection scores [default: --cache].")
@click.option("--fraction", type=float, default=None, show_default=str(S.fraction),
              help="Fraction of training samples kept, in (0, 1].")
@click.option("--method", default=None, show_default=S.method, help=f"Selection: {METHODS_HELP}.")
@click.option("--keep", type=click.Choice(["hard", "easy"]), default=None, show_default=S.keep,
              help="Score end kept.")
@click.option("--class-balanced", is_flag=True, help="Select the same fraction within every class.")
@click.option("--ccs-beta", default=C.ccs_beta, **SHOW, help="ccs: fraction of hardest samples dropped first.")
@click.option("--ccs-strata", default=C.ccs_strata, **SHOW, help="ccs: number of equal-width score strata.")
@click.option("--ccs-score", default=C.ccs_score, show_default="aum if the store has it, else el2n",
              help="ccs: the score that defines the strata.")
@click.option("--indices", type=click.Path(), default=None,
              help="Train on these indices (.npy from `kdcache select`) instead of selecting here.")
@click.option("--alpha", default=C.alpha, **SHOW, help="KD weight in [0, 1], or auto (from the fraction).")
@click.option("--temperature", type=float, default=None, show_default=str(DEFAULT_TEMPERATURE),
              help="KD temperature T [default: a top-k cache's own, else the value shown].")
@click.option("--epochs", default=C.epochs, **SHOW, help="Passes over the selected subset.")
@click.option("--steps", type=int, default=None, help="Fixed number of optimisation steps (overrides --epochs).")
@click.option("--batch-size", default=C.batch_size, **SHOW, help="Per process (under torchrun: x world size).")
@click.option("--lr", default=C.lr, **SHOW, help="Peak learning rate (SGD, Nesterov).")
@click.option("--momentum", default=C.momentum, **SHOW)
@click.option("--weight-decay", default=C.weight_decay, **SHOW, help="Not applied to norms and biases.")
@click.option("--warmup", default=C.warmup, **SHOW,
              help="Fraction of steps with linear warm-up (0: none; else at least 10 steps, or a quarter of a "
                   "shorter run), then cosine decay.")
@click.option("--bn-batches", default=C.bn_batches, **SHOW,
              help="Re-estimate BatchNorm statistics over this many training batches before each evaluation "
                   "(0: off).")
@click.option("--label-smoothing", default=C.label_smoothing, **SHOW)
@click.option("--augment/--no-augment", default=C.augment, **SHOW,
              help="Random crop (4 px padding) + flip; image folders: random-resized crop + flip.")
@click.option("--seed", default=C.seed, **SHOW, help="Seed for selection, initialisation and data order.")
@click.option("--device", default=C.device, **SHOW, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=C.amp, **SHOW, help="Autocast on CUDA.")
@click.option("--compile", is_flag=True, help="torch.compile the student.")
@click.option("--workers", default=C.workers, **SHOW, help="FFCV loader threads (-1: all cores).")
@click.option("--eval-every", default=C.eval_every, **SHOW, help="Evaluate on the test set every N epochs.")
@click.option("--teacher-online", default=None, help="Run this teacher in the loop instead of reading a cache.")
@click.option("--teacher-checkpoint", type=click.Path(), default=None, help="Checkpoint of --teacher-online.")
@click.option("--record-dynamics", is_flag=True, help="Record per-sample training dynamics and derive scores.")
@click.option("--dynamics-store", default=None, help="Store for dynamics [default: OUT/dynamics.zarr].")
@click.option("--el2n-early-fraction", default=C.el2n_early_fraction, **SHOW,
              help="Dynamics: el2n_early is EL2N this far into training (Paul et al.: epoch 20 of 200).")
@click.option("--aum-fraction", default=C.aum_fraction, **SHOW,
              help="Dynamics: AUM averages the margin over this first part of training (Pleiss et al. stop "
                   "before the learning rate decays; cosine decays from the start).")
@click.option("--resume", is_flag=True, help="Continue a killed run in --out from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Start over although --out holds a run (finished or killed).")
def train(**options):
    """Train a student on a pruned subset with knowledge distillation from a cached teacher.

    With --fraction 1 --alpha 0 and no cache, this trains the teacher on the full data."""
    from kdcache.train import train as run

    summary = run(C(**options))
    if summary:
        click.echo(f"test accuracy {summary['test_acc']:.4f} (alpha {summary['alpha']}, "
                   f"{summary['num_selected']} samples, {summary['images_per_sec']:.0f} img/s) -> {options['out']}")
