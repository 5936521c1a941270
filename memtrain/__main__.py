"""``python -m memtrain ...``: the same CLI as the ``memtrain`` console script (for a node where the script is
not on PATH, e.g. an environment activated by its python only)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
