"""Rows of an output's Parquet files by (file, row), and thumbnails of their stored images."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema as S
from curate.io.files import InputError

#: not returned with search results (and not usable in ``where``): large per-row values
BULK_COLUMNS = (S.IMAGE, S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING)
#: a stored image claiming more pixels is not decoded for a thumbnail
MAX_THUMB_SOURCE_PIXELS = 50_000_000


class RowReader:
    """Rows of one directory's Parquet files by (file, row), reading only the row groups that hold them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _file(self, name: str) -> tuple[pq.ParquetFile, np.ndarray]:
        with self._lock:
            if name not in self._files:
                if "/" in name or name.startswith("."):
                    raise InputError(f"bad file name {name!r}")
                pf = pq.ParquetFile(self.directory / name)
                sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
                self._files[name] = (pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            return self._files[name]

    def columns(self, name: str) -> list[str]:
        return self._file(name)[0].schema_arrow.names

    def locate(self, name: str, rows: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row group, row within it) of each of ``rows`` of a file; InputError for a row it does not have."""
        starts = self._file(name)[1]
        rows_a = np.asarray(rows, np.int64)
        if len(rows_a) and (rows_a.min() < 0 or rows_a.max() >= starts[-1]):
            raise InputError(f"{name}: row out of range")
        groups = np.searchsorted(starts, rows_a, side="right") - 1
        return groups, rows_a - starts[groups]

    def row_group(self, name: str, group: int, columns: list[str]) -> pa.Table:
        return self._file(name)[0].read_row_group(group, columns=columns)

    def read(self, name: str, rows: list[int] | np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The given rows of one file, in the given order (columns: all but BULK_COLUMNS by default)."""
        pf, starts = self._file(name)
        if columns is None:
            columns = [c for c in pf.schema_arrow.names if c not in BULK_COLUMNS]
        group_of, within = self.locate(name, rows)
        groups = sorted(set(group_of.tolist()))
        part = pf.read_row_groups(groups, columns=columns)
        sizes = np.diff(starts)[groups]
        first = dict(zip(groups, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()))  # in ``part``
        local = [first[int(g)] + int(w) for g, w in zip(group_of, within)]
        return part.take(pa.array(local, pa.int64()))


def thumbnail_bytes(data: bytes, size: int = 256) -> bytes:
    """A JPEG thumbnail of stored image bytes (bounded: stored images passed the pipeline's limits)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > MAX_THUMB_SOURCE_PIXELS:
            raise InputError("image too large")
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        return buf.getvalue()
