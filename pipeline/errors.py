"""The one exception type that the CLI turns into a single clear line and a non-zero exit.

Defined in ``data_prep.errors`` (the arrow runs pipeline -> data_prep); this is the same class.
"""

from data_prep.errors import UserError

__all__ = ["UserError"]
