"""`kdcache data`: convert a dataset into FFCV betons."""
import click

from kdcache.errors import UserError
from kdcache.sources import SOURCES

SHOW = {"show_default": True}


@click.command()
@click.argument("source", type=click.Choice(SOURCES))
@click.option("--src", type=click.Path(), default=None,
              help="Source folder (default for fashion-mnist: /usr/share/datasets/fashion-mnist).")
@click.option("--out", type=click.Path(), required=True, help="Folder for train.beton, test.beton, manifest.json.")
@click.option("--max-side", default=256, **SHOW, help="imagefolder: longest stored image side (JPEG).")
@click.option("--jpeg-quality", default=90, **SHOW, help="imagefolder: JPEG quality.")
@click.option("--crop-side", type=int, default=None,
              help="imagefolder: the side models see [default: 224 when --max-side >= 256, else 7/8 of it].")
@click.option("--workers", default=-1, **SHOW, help="Writer processes (-1: all cores).")
@click.option("--num-train", default=1000, **SHOW, help="synthetic: training samples.")
@click.option("--num-test", default=500, **SHOW, help="synthetic: test samples.")
@click.option("--num-classes", default=10, **SHOW, help="synthetic: classes.")
@click.option("--image-size", default=32, **SHOW, help="synthetic: image side in pixels.")
@click.option("--seed", default=0, **SHOW, help="synthetic: generator seed.")
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


