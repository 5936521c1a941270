"""The one exception type that the CLI turns into a single clear line and a non-zero exit.

It lives in data_prep, the lower package, so data_prep never imports pipeline; ``pipeline.errors``
re-exports it (one class: an error raised in prep is caught by the CLI as ``pipeline.errors.UserError``).
"""


class UserError(Exception):
    """Bad input from the user (config, paths, data): printed as one line, no traceback."""

    exit_code = 2
