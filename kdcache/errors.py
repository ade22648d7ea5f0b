class UserError(Exception):
    """A mistake in the user's input: the CLI prints the message on one line and exits with status 2."""
