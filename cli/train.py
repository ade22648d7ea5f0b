"""`kdcache train`: a student on a pruned subset, distilled from cached teacher logits."""
import click

SHOW = {"show_default": True}


@click.command()
@click.option("--data", type=click.Path(), required=True, help="Training .beton (from `kdcache data`).")
@click.option("--test", type=click.Path(), default=None, help="Test .beton [default: test.beton beside --data].")
@click.option("--out", type=click.Path(), required=True, help="Run folder for config, metrics, model.")
@click.option("--arch", default="resnet20", **SHOW, help="Student model (CIFAR resnet20/32/56 or a torchvision name).")
@click.option("--cache", default=None, help="Teacher-logit store from `kdcache dump` (path or URL).")
@click.option("--store", default=None, help="Store holding selection scores [default: --cache].")
@click.option("--fraction", default=1.0, **SHOW, help="Fraction of training samples kept, in (0, 1].")
@click.option("--method", default="random", **SHOW, help="Selection: random, ccs, or a score in the store.")
@click.option("--keep", type=click.Choice(["hard", "easy"]), default="hard", **SHOW, help="Score end kept.")
@click.option("--class-balanced", is_flag=True, help="Select the same fraction within every class.")
@click.option("--indices", type=click.Path(), default=None, help="Train on these indices (.npy from `kdcache select`).")
@click.option("--alpha", default="auto", **SHOW, help="KD weight in [0, 1], or auto (from the fraction).")
@click.option("--temperature", default=4.0, **SHOW, help="KD temperature T.")
@click.option("--epochs", default=200, **SHOW, help="Passes over the selected subset.")
@click.option("--steps", type=int, default=None, help="Fixed number of optimisation steps (overrides --epochs).")
@click.option("--batch-size", default=128, **SHOW)
@click.option("--lr", default=0.1, **SHOW, help="Peak learning rate (SGD, Nesterov).")
@click.option("--momentum", default=0.9, **SHOW)
@click.option("--weight-decay", default=5e-4, **SHOW)
@click.option("--warmup", default=0.02, **SHOW, help="Fraction of steps with linear warm-up (then cosine decay).")
@click.option("--label-smoothing", default=0.0, **SHOW)
@click.option("--augment/--no-augment", default=True, **SHOW, help="Random crop (4 px padding) + flip.")
@click.option("--seed", default=0, **SHOW, help="Seed for selection, initialisation and data order.")
@click.option("--device", default="auto", **SHOW, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default="bf16", **SHOW, help="Autocast on CUDA.")
@click.option("--compile", is_flag=True, help="torch.compile the student.")
@click.option("--workers", default=-1, **SHOW, help="FFCV loader threads (-1: all cores).")
@click.option("--eval-every", default=1, **SHOW, help="Evaluate on the test set every N epochs.")
@click.option("--teacher-online", default=None, help="Run this teacher in the loop instead of reading a cache.")
@click.option("--teacher-checkpoint", type=click.Path(), default=None, help="Checkpoint of --teacher-online.")
@click.option("--record-dynamics", is_flag=True, help="Record per-sample training dynamics and derive scores.")
@click.option("--dynamics-store", default=None, help="Store for dynamics [default: --cache, else OUT/dynamics.zarr].")
@click.option("--resume", is_flag=True, help="Continue a killed run in --out from its last epoch.")
def train(**options):
    """Train a student on a pruned subset with knowledge distillation from a cached teacher.

    With --fraction 1 --alpha 0 and no cache, this trains the teacher on the full data."""
    from kdcache.train import TrainConfig
    from kdcache.train import train as run

    summary = run(TrainConfig(**options))
    if summary:
        click.echo(f"test accuracy {summary['test_acc']:.4f} (alpha {summary['alpha']}, "
                   f"{summary['num_selected']} samples, {summary['images_per_sec']:.0f} img/s) -> {options['out']}")
