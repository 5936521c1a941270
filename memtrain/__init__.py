"""memtrain: the project's import name, so ``python -m memtrain`` and ``memtrain.__version__`` work as users
expect. The code lives in ``pipeline`` (the stages) and ``data_prep`` (books -> shards)."""

from pipeline import __version__

__all__ = ["__version__"]
