"""`kdcache dump` (placeholder until its issue lands)."""
import click

from kdcache.errors import UserError


@click.command()
def dump():
    """Not implemented yet."""
    raise UserError("kdcache dump is not implemented yet")


@click.command()
def info():
    """Not implemented yet."""
    raise UserError("kdcache info is not implemented yet")
