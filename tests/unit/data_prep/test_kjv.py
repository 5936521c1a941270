from pathlib import Path

import pytest

from data_prep.kjv import BOOKS, split_books, write_books
from pipeline.errors import UserError

PRINTED = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 Samuel 1

  1 Now there was a certain man of Ramathaimzophim, of mount Ephraim, and his
name was Elkanah.
"""


def test_books_are_cut_at_chapter_one_with_verse_numbers_stripped_and_lines_reflowed() -> None:
    assert split_books(PRINTED) == [
        ("Genesis", "In the beginning God created the heaven and the earth. And the earth was without form, and "
                    "void; and darkness was upon the face of the deep.\n\n"
                    "Thus the heavens and the earth were finished.\n"),
        ("1 Samuel", "Now there was a certain man of Ramathaimzophim, of mount Ephraim, and his name was Elkanah.\n"),
    ]


def test_the_packaged_bible_gives_66_books_of_prose(tmp_path: Path) -> None:
    assert write_books(tmp_path / "books") == BOOKS
    files = sorted((tmp_path / "books").iterdir())
    assert [f.name for f in files[:2]] == ["01-Genesis.txt", "02-Exodus.txt"] and files[-1].name == "66-Revelation.txt"
    genesis = files[0].read_text()
    assert genesis.startswith("In the beginning God created the heaven and the earth. And the earth was")
    assert "  1 " not in genesis and genesis.count("\n\n") == 49  # 50 chapters, one paragraph each


def test_a_missing_bible_command_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="install the Debian package bible-kjv"):
        write_books(tmp_path / "books")
    assert not (tmp_path / "books").exists()
