"""The one exception type that the CLI turns into a single clear line and a non-zero exit.

It lives in data_prep, the lower package, so data_prep never imports pipeline; ``pipeline.errors``
re-exports it (one class: an error raised in prep is caught by the CLI as ``pipeline.errors.UserError``).
"""


class UserError(Exception):
    """Bad input from the user (config, paths, data): printed as one line, no traceback.

    ``every_rank``: raised by all ranks of a job together, with the same message (after a collective
    that made them agree); rank 0 alone prints it, so a job says it once, not once per rank."""

    exit_code = 2

    def __init__(self, message: str, *, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank
