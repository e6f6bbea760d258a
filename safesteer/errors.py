"""The one error type of the package: bad input from the user (a file, an option, a model), never a bug.

The stages print it as one line `error: ...` and exit 2 (cli.run_cli). It imports nothing, so every module,
the porter's core included, can raise it without pulling in the command line."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
