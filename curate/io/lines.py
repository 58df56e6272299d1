"""Reading text input defensively: physical lines of bounded length, undecodable bytes
kept visible (as lone surrogates, or U+FFFD plus a flag in Arrow tables) so that one bad
record is rejected, never the whole file, and never silently altered."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

BOM = b"\xef\xbb\xbf"
#: a lone surrogate: an undecodable byte (``surrogateescape``) or a JSON ``\ud800`` escape
_SURROGATE = re.compile("[\ud800-\udfff]")
_SKIP_CHUNK = 1 << 20


class LineTooLong(Exception):
    """One physical line was longer than the limit; it was skipped, reading can go on."""


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes (a local ``Path`` or a ``UPath`` on object storage), gunzipped when its name
    ends in ``.gz``."""
    f = path.open("rb")
    if path.name.lower().endswith(".gz"):
        return _Gunzip(f)  # type: ignore[return-value]
    return f


class _Gunzip(gzip.GzipFile):
    """A GzipFile that also closes the file it reads."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__(fileobj=f, mode="rb")
        self._raw = f

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


class Lines:
    """The physical lines (newline kept) of a binary stream, each at most ``limit`` bytes.

    A longer line is skipped up to its end and raises ``LineTooLong`` once; the next
    call goes on with the following line.  ``number`` is the 0-based index of the line
    last returned or skipped.  A UTF-8 byte order mark at the start is dropped.
    """

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f = f
        self.limit = limit
        self.number = -1

    def __iter__(self) -> "Lines":
        return self

    def __next__(self) -> bytes:
        line = self.f.readline(self.limit)
        if not line:
            raise StopIteration
        self.number += 1
        if self.number == 0 and line.startswith(BOM):
            line = line[len(BOM):]
        if len(line) >= self.limit and not line.endswith(b"\n"):
            rest = self.f.readline(_SKIP_CHUNK)
            if rest:  # more than `limit` bytes before the newline: skip to the end of the line
                while rest and not rest.endswith(b"\n"):
                    rest = self.f.readline(_SKIP_CHUNK)
                raise LineTooLong(f"line longer than {self.limit} bytes")
        return line


class TextLines:
    """``Lines`` decoded as UTF-8; undecodable bytes become lone surrogates (``surrogateescape``).

    ``undecodable`` turns true when a line had such bytes; the caller resets it.
    """

    def __init__(self, lines: Lines) -> None:
        self.lines = lines
        self.undecodable = False

    def __iter__(self) -> "TextLines":
        return self

    def __next__(self) -> str:
        raw = next(self.lines)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.undecodable = True
            return raw.decode("utf-8", "surrogateescape")


def has_surrogates(text: str) -> bool:
    """True when ``text`` holds undecodable bytes or lone surrogates (it cannot be written as UTF-8)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def replace_surrogates(text: str) -> str:
    """``text`` with every undecodable byte / lone surrogate shown as U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def preview(text: str, n: int = 200) -> str:
    """A short, printable excerpt of a bad record for a reject_detail."""
    return repr(replace_surrogates(text[:n]))


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_utf8(t: pa.Table) -> tuple[pa.Table, list[str | None]]:
    """String columns of a Parquet file may hold bytes that are not UTF-8 (pyarrow reads them as they are).

    Returns the table with such values shown as U+FFFD (such a column becomes a plain string
    column) and, per row, the comma-separated names of its bad columns (None when none).
    """
    bad_cols: list[list[str]] = [[] for _ in range(t.num_rows)]
    for i, f in enumerate(t.schema):
        if not _is_text(f.type):
            continue
        col = t.column(i)
        try:
            col.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        chunks = [c.dictionary_decode() if isinstance(c, pa.DictionaryArray) else c for c in col.chunks]
        fixed: list[str | None] = []
        for r, v in enumerate(v for c in chunks for v in c.cast(pa.large_binary(), safe=False).to_pylist()):
            try:
                fixed.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                fixed.append(v.decode("utf-8", "replace"))
                bad_cols[r].append(f.name)
        plain = pa.large_string() if pa.types.is_large_string(f.type) else pa.string()
        t = t.set_column(i, f.name, pa.array(fixed, plain))
    return t, [",".join(c) if c else None for c in bad_cols]
