"""`kdcache` command line: one subcommand per pipeline stage. Library code lives in `kdcache/`."""
from __future__ import annotations

import sys

import click

from kdcache import __version__
from kdcache.errors import UserError


class Group(click.Group):
    """Turns a UserError (a mistake in the input) into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdcache")
def cli() -> None:
    """Data pruning with knowledge distillation from a cached teacher."""


from kdcache_cli import data, demo, dump, select, sweep, train  # noqa: E402  (each module defines its commands)

for command in (data.data, dump.dump, dump.info, train.train, select.select, demo.demo, sweep.sweep, sweep.report):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
