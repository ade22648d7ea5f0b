"""`kdcache train` (placeholder until its issue lands)."""
import click

from kdcache.errors import UserError


@click.command()
def train():
    """Not implemented yet."""
    raise UserError("kdcache train is not implemented yet")
