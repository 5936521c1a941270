"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (config, paths, data): printed as one line, no traceback."""

    exit_code = 2
