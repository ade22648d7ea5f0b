"""`kdcache train`: a student on a pruned subset, distilled from cached teacher logits.

Every option is a field of `TrainConfig` (the selection group: `SelectOptions`), declared once in
`kdcache.config`."""
import click

from kdcache.config import TrainConfig as C
from kdcache.models import ARCH_HELP

from .options import options_of, selection_options


@click.command()
@options_of(C, archs=ARCH_HELP)
@selection_options(unset=("fraction", "method", "keep"))
def train(**options):
    """Train a student on a pruned subset with knowledge distillation from a cached teacher.

    With --fraction 1 --alpha 0 and no cache, this trains the teacher on the full data."""
    from kdcache.train import train as run

    summary = run(C(**options))
    if summary:
        click.echo(f"test accuracy {summary['test_acc']:.4f} (alpha {summary['alpha']}, "
                   f"{summary['num_selected']} samples, {summary['images_per_sec']:.0f} img/s) -> {options['out']}")
