"""The one tiny experiment of the tests that run memtrain's stages, and its variants.

``TINY`` is a model of ~40k parameters on 16 short synthetic books: seconds per stage on 2 CPU cores.
A test that needs something else states only what differs::

    tree = experiment(root, train={"max_steps": 16}, memory={"num_tokens": 2})
    config = write_experiment(root / "run.yaml", tree)      # for `memtrain ... --config`
    memtrain("demo", "--set", *as_overrides(tree))         # the same tree as dotted --set overrides

``experiment`` merges section by section, key by key (nested mappings too), so a variant never
restates TINY, and every output (data, run folder, MLflow store) lies under ``root``.

Tests that build a model, an eval split or a prep run in process take a validated config of one of
the VARIANTS instead (each as small as its tests need; what it does not set is the config default)::

    cfg = tiny_config("model", "memory.kind=armt", "model.arch=llama")   # then --set-style overrides
    cfg = tiny_config("prep", data={"output_dir": str(tmp_path / "out"), "vocab_size": 700})
    overrides = as_overrides(tiny_tree("zero3"))                          # for a subprocess's load_config
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ExperimentConfig, apply_overrides, build_config

TINY: dict[str, Any] = {
    "data": {"source": "synthetic:16", "segment_len": 32, "n_segments": 4, "vocab_size": 512,
             "val_fraction": 0.25, "test_fraction": 0.0, "tokenizer_threads": 1,
             "synthetic": {"words_per_book": 1200, "facts_per_book": 3, "min_recall_distance_segments": 1}},
    "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_positions": 64},
    "memory": {"kind": "rmt", "num_tokens": 4},
    "train": {"max_steps": 4, "save_every": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 2},
    "eval": {"max_samples": 8, "batch_size": 4},
    "tracking": {"enabled": False},
    "export": {"max_shard_size": "50KB", "tags": ["tiny"]},
}


# name -> the sections it sets. "stages" is TINY (the stage tests, through ``experiment``); the others
# are the in-process model tests ("model"), the eval tests ("eval"), the 2-rank ZeRO-3 model steps
# ("zero3") and the data-prep tests ("prep").
VARIANTS: dict[str, dict[str, Any]] = {
    "stages": TINY,
    "model": {"data": {"segment_len": 8, "n_segments": 4},
              "model": {"hidden_size": 32, "num_heads": 2, "num_layers": 2, "intermediate_size": 64,
                        "max_positions": 64, "segment_checkpointing": False},
              "memory": {"num_tokens": 3, "armt_d_mem": 8, "armt_nu": 2}},
    "eval": {"data": {"segment_len": 8, "n_segments": 3},
             "model": {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64,
                       "max_positions": 64},
             "memory": {"kind": "rmt", "num_tokens": 2},
             "eval": {"batch_size": 3, "max_samples": 5}},
    "zero3": {"data": {"segment_len": 8, "n_segments": 3},
              "model": {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "max_positions": 32,
                        "segment_checkpointing": True},
              "memory": {"num_tokens": 2, "armt_d_mem": 4, "armt_nu": 2}},
    "prep": {"data": {"source": "synthetic:8", "segment_len": 16, "n_segments": 8, "vocab_size": 600,
                      "tokenizer_sample_sentences": 1000, "tokenizer_threads": 2, "samples_per_shard": 16,
                      "val_fraction": 0.2, "test_fraction": 0.2,
                      "synthetic": {"words_per_book": 600, "facts_per_book": 4, "min_recall_distance_segments": 2}}},
}


def tiny_tree(variant: str = "stages", **sections: dict[str, Any]) -> dict[str, Any]:
    """The variant's tree with ``sections`` laid over it (merged key by key, as ``experiment`` does)."""
    return merged(VARIANTS[variant], sections)


def tiny_config(variant: str = "stages", *overrides: str, **sections: dict[str, Any]) -> ExperimentConfig:
    """The variant as a validated config: ``sections`` laid over it, then ``--set``-style ``overrides``."""
    return build_config(apply_overrides(tiny_tree(variant, **sections), list(overrides)))


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, nested mappings merged key by key (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def experiment(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """TINY with its outputs under ``root`` (data/, train/, mlflow.db when tracking is enabled) and ``sections`` laid over it."""
    tree = merged(TINY, {"data": {"output_dir": str(root / "data")}, "train": {"output_dir": str(root / "train")}})
    tree = merged(tree, sections)
    if tree["tracking"].get("enabled", True) and "uri" not in tree["tracking"]:
        tree["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"  # never the working directory's store
    return tree


def write_experiment(path: Path, tree: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def as_overrides(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The tree as `--set` items (``data.segment_len=32``, lists and strings in YAML flow form)."""
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += as_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return items
