"""Where a page of rows sits, and the cursors that name it (issue #28; curate.serve.pages).

A :class:`Window` is one page of a view as storage positions (file index, row) with what is known around
it (its index among the view's rows, the total, the cursors of the pages before and after it).  Cursors:
``FILE:ROW`` (a storage position: storage-order views, filtered or not) and ``VALUE|UID`` (a sorted
view's keyset, :func:`key_text`).  :func:`read_window` reads a window's rows (or takes those a sort
index carried).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curate.io.files import InputError
from curate.serve.catalog import Handles, Snapshot, read_positions

FILE_COL = "_curate_file"  # the file name column of a DuckDB scan over a view's files


def parse_cursor(text: str) -> tuple[str, int] | None:
    """``FILE:ROW`` (a storage position) or None."""
    if not text:
        return None
    name, sep, row = text.rpartition(":")
    if not sep or not name or "/" in name or not row.lstrip("-").isdigit():
        raise InputError(f"bad cursor {text[:80]!r}")
    return name, int(row)


def parse_key(text: str) -> tuple[float | None, str] | None:
    """``VALUE|UID`` (a sorted view's keyset; VALUE ``null`` for NULL) or None."""
    if not text:
        return None
    value, sep, uid = text.partition("|")
    if not sep:
        raise InputError(f"bad cursor {text[:80]!r}")
    if value == "null":
        return None, uid
    try:
        v = float(value)
    except ValueError:
        raise InputError(f"bad cursor {text[:80]!r}") from None
    if math.isnan(v):
        raise InputError("bad cursor: NaN")
    return v, uid


def key_text(value: Any, uid: str) -> str:
    return f"null|{uid}" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{float(value)!r}|{uid}"


@dataclass
class Window:
    """Where one page sits: file positions of its rows, and what is known around it."""
    files: np.ndarray
    rows: np.ndarray
    first: int | None = None  # index of its first row among the view's (filtered) rows, when known
    total: int | None = None  # rows of the (filtered) view, when known
    has_prev: bool = False
    has_next: bool = False
    after: str = ""  # cursor of the next page (its last row)
    before: str = ""  # cursor of the previous page (its first row)
    note: str = ""  # the page is partial: how far it searched
    counted: float | None = None  # share of the view's files counted (filtered views)
    keys: list[str] = field(default_factory=list)  # sorted views: the keyset of each row
    pending: str = ""  # nothing to show yet (a count or an index being built): why
    cards: Any = None  # the page's rows already read (a sort index carries them), else None


def read_window(snap: Snapshot, handles: Handles, w: Window, columns: list[str]) -> list[dict]:
    if not len(w.files):
        return []
    if w.cards is not None:  # columns no file of the view has are simply absent
        return w.cards.select([c for c in columns if c in w.cards.column_names] + ["_file", "_row"]).to_pylist()
    t = read_positions(snap, handles, w.files, w.rows, columns)
    return t.to_pylist()
