"""Books -> cleaned text -> tokenizer -> multi-segment sample shards (Arrow + manifest.json).

``prepare(cfg)`` runs it from Python; ``data_prep.shards.open_split`` and
``data_prep.manifest.read_manifest`` read the result.
"""

from __future__ import annotations


def prepare(cfg, shard_index: int | None = None, num_shards: int | None = None):
    """Run prep for an ExperimentConfig (see data_prep.run); returns a PrepResult."""
    from data_prep.run import prepare as run  # lazy: every data_prep import runs this file

    return run(cfg, shard_index, num_shards)
