"""`kdcache select` (placeholder until its issue lands)."""
import click

from kdcache.errors import UserError


@click.command()
def select():
    """Not implemented yet."""
    raise UserError("kdcache select is not implemented yet")
