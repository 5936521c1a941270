"""Raw book bytes -> clean text, or a ``SkipBook`` saying why the book is unusable.

Cleaning: decode (UTF-8, BOM dropped), CRLF/CR -> LF, Unicode NFC, Project Gutenberg header and
footer removed (the text between ``*** START OF ...`` and ``*** END OF ...``), outer blank lines
stripped. Skip reasons are short fixed strings so the summary can count them.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
import zlib

EMPTY = "empty"
BINARY = "binary"
NOT_UTF8 = "not utf-8"
CORRUPT_GZIP = "corrupt gzip"
UNREADABLE = "unreadable"
INVALID_JSON = "invalid json"
DUPLICATE = "duplicate"
TOO_SHORT = "shorter than one sample"

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.MULTILINE | re.IGNORECASE)
# Control characters other than tab/newline/CR/form feed: a text file has (almost) none.
_CONTROL = bytes(c for c in range(32) if c not in (9, 10, 12, 13))


class SkipBook(Exception):
    """This book is not usable; ``reason`` is one of the constants above."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_book_file(path: str) -> str:
    """Read a .txt or .txt.gz file and return its cleaned text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise SkipBook(UNREADABLE) from None
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            raise SkipBook(CORRUPT_GZIP) from None
    return clean_text(decode_bytes(data))


def decode_bytes(data: bytes) -> str:
    """UTF-8 text, BOM removed; binary data and other encodings are skipped."""
    head = data[:8192]
    if b"\x00" in head or (head and sum(head.count(bytes([c])) for c in _CONTROL) > len(head) // 100):
        raise SkipBook(BINARY)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipBook(NOT_UTF8) from None
    return text


def clean_text(text: str) -> str:
    """Normalize one book's text; raise SkipBook(EMPTY) if nothing is left."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = strip_gutenberg(text).strip("\n ")
    if not text.strip():
        raise SkipBook(EMPTY)
    return text


def strip_gutenberg(text: str) -> str:
    """The part between the Project Gutenberg START and END markers (the whole text without them)."""
    start = _GUTENBERG_START.search(text, 0, 100_000)
    if start:
        text = text[start.end():]
    tail_from = max(0, len(text) - 100_000)
    end = None
    for end in _GUTENBERG_END.finditer(text, tail_from):
        break
    if end:
        text = text[: end.start()]
    return text
