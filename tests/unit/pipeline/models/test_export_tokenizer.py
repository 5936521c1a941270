"""The export's tokenizer in a process that cannot import memtrain, stdin closed: it loads without any
custom-code prompt and round-trips text in the ways the README shows.

Plain ``AutoTokenizer.from_pretrained(export)`` (no ``trust_remote_code``) still prompts: transformers
5.23's ``AutoTokenizer.from_pretrained`` calls ``AutoConfig.from_pretrained(dir, trust_remote_code=None)``
before it reads tokenizer_config.json, and ``AutoConfig`` asks whenever config.json's ``auto_map`` names an
``AutoConfig`` for a ``model_type`` transformers does not know (tokenization_auto.py, "elif config is
None"; configuration_auto.py, ``has_remote_code``/``has_local_code``). No file of the export can avoid it
without declaring a built-in model_type, which would make transformers load the wrong model; on EOF or
after 15 s it falls back to a bare config and loads the right tokenizer. The xfail below pins that, so the
test says so when a transformers release changes it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from clean_python import run_without_project
from model_support import tiny_model
from tokenizers import Tokenizer

from data_prep.tokenizer import train_sentencepiece
from pipeline.config import DataConfig

PROMPT = "Do you wish to run the custom code"
TEXT = "The captain kept the brass key in the kitchen of the old house.\nMara found it there."

CHILD = textwrap.dedent("""
    import contextlib, io, json, sys

    folder, text = sys.argv[1], sys.argv[2]
    results = {}
    # in this order: the tokenizer class alone first, so no custom code is imported before it
    for how in ("fast_class", "auto", "auto_trusted"):
        printed = io.StringIO()  # the prompt (input() writes it to stdout) and transformers' log (its handler
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):  # binds stderr at import)
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

            if how == "fast_class":
                tok = PreTrainedTokenizerFast.from_pretrained(folder)
            else:
                tok = AutoTokenizer.from_pretrained(folder, **({"trust_remote_code": True} if how == "auto_trusted" else {}))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        results[how] = {"printed": printed.getvalue(), "ids": ids, "decoded": tok.decode(ids),
                        "custom_modules": sorted(m for m in sys.modules if m.startswith("transformers_modules"))}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model beside a tokenizer written by memtrain's own tokenizer training."""
    folder = tmp_path_factory.mktemp("export")
    lines = (f"{TEXT} Line {i} of the book, with words {i * 7 % 13} and {i % 5}." for i in range(400))
    train_sentencepiece(lines, DataConfig(vocab_size=320, tokenizer_sample_sentences=1000, tokenizer_threads=1),
                        folder / "tokenizer")
    tiny_model("rmt").save_pretrained(folder)
    for file in (folder / "tokenizer").iterdir():
        file.rename(folder / file.name)
    return folder


@pytest.fixture(scope="module")
def loaded(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_without_project(CHILD, str(export_dir), TEXT, tmp=tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("how", ["auto_trusted", "fast_class"])
def test_the_readme_ways_load_without_a_prompt_and_round_trip(export_dir: Path, loaded: dict, how: str) -> None:
    result = loaded[how]
    assert PROMPT not in result["printed"] and "model of type" not in result["printed"], result["printed"]
    assert result["ids"] == Tokenizer.from_file(str(export_dir / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert result["decoded"] == TEXT
    assert json.loads((export_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    if how == "fast_class":
        assert result["custom_modules"] == []  # no custom code was imported for the tokenizer


def test_plain_auto_tokenizer_loads_the_same_tokenizer(loaded: dict) -> None:
    assert (loaded["auto"]["ids"], loaded["auto"]["decoded"]) == (loaded["fast_class"]["ids"], TEXT)


@pytest.mark.xfail(strict=True, reason="transformers 5.23: AutoTokenizer resolves config.json's auto_map first "
                                       "and asks before custom code (see the module docstring)")
def test_plain_auto_tokenizer_asks_nothing(loaded: dict) -> None:
    assert PROMPT not in loaded["auto"]["printed"]
