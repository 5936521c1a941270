"""Real English text for memory experiments: the King James Bible (Debian package ``bible-kjv``), one book per file.

``python -m data_prep.kjv OUT_DIR`` writes the 66 books as ``OUT_DIR/NN-<name>.txt`` (public domain),
ready for ``data.source: OUT_DIR``. The package's ``bible`` command prints chapters as a header line
("Genesis 1", after a blank line) followed by numbered, wrapped verses; here verse numbers are
stripped and each chapter becomes one reflowed paragraph, so a book reads as continuous prose.
Install the text with ``apt-get install bible-kjv``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from data_prep.atomic import replace_dir
from data_prep.errors import UserError

WHOLE_BIBLE = "gen1:1-rev22:21"
BOOKS = 66
_HEADER = re.compile(r"^(\S.*) (\d+)$")
_VERSE = re.compile(r"^\s+\d+ ")


def split_books(text: str) -> list[tuple[str, str]]:
    """``bible``'s output -> [(book name, reflowed text)] in canonical order."""
    books: list[tuple[str, list[list[str]]]] = []
    previous = ""
    for line in text.splitlines():
        header = _HEADER.match(line) if not previous.strip() else None
        previous = line
        if header:
            if header.group(2) == "1":
                books.append((header.group(1), []))
            books[-1][1].append([])
        elif line.strip() and books:
            books[-1][1][-1].append(_VERSE.sub("", line).strip())
    return [(name, "\n\n".join(" ".join(chapter) for chapter in chapters) + "\n") for name, chapters in books]


def write_books(out_dir: Path) -> int:
    """Write the books into ``out_dir`` (replaced atomically); the number of books."""
    if shutil.which("bible") is None:
        raise UserError("the `bible` command is missing: install the Debian package bible-kjv "
                        "(apt-get install bible-kjv)")
    text = subprocess.run(["bible", WHOLE_BIBLE], check=True, capture_output=True, text=True).stdout
    books = split_books(text)
    if len(books) != BOOKS:
        raise UserError(f"bible printed {len(books)} books, expected {BOOKS}: is bible-kjv complete?")

    def fill(tmp: Path) -> None:
        for i, (name, body) in enumerate(books, start=1):
            (tmp / f"{i:02d}-{name.replace(' ', '_')}.txt").write_text(body, encoding="utf-8")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(out_dir, fill)
    return len(books)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m data_prep.kjv OUT_DIR")
    try:
        print(f"wrote {write_books(Path(sys.argv[1]))} books to {sys.argv[1]}")
    except UserError as err:
        sys.exit(f"data_prep.kjv: error: {err}")


if __name__ == "__main__":
    main()
