"""`kdcache data`: convert a dataset into FFCV betons."""
import click

from kdcache.config import DataOptions
from kdcache.errors import UserError
from kdcache.sources import SOURCES

from .options import options_of


@click.command()
@click.argument("source", type=click.Choice(SOURCES))
@options_of(DataOptions, exclude=("source",))
def data(source, src, out, max_side, jpeg_quality, crop_side, workers, num_train, num_test, num_classes, image_size,
         seed):
    """Convert a dataset SOURCE into FFCV train/test .beton files with a manifest."""
    from kdcache.beton import convert
    from kdcache.sources import load_source

    if crop_side is not None and not 8 <= crop_side <= max_side:  # before minutes of loading
        raise UserError(f"--crop-side must be between 8 and --max-side ({max_side}), got {crop_side}")
    ds = load_source(source, src, num_train=num_train, num_test=num_test, num_classes=num_classes,
                     image_size=image_size, seed=seed)
    m = convert(ds, out, max_side=max_side, jpeg_quality=jpeg_quality, num_workers=workers, src=src,
                crop_side=crop_side)
    click.echo(f"{source}: {m['splits']['train']['size']} train / {m['splits']['test']['size']} test, "
               f"{m['num_classes']} classes, fingerprint {m['fingerprint']} (train split "
               f"{m['splits']['train']['fingerprint']}, which stores and selections record) -> {out}")


