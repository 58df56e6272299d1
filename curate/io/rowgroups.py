"""One Parquet file read by row position: its footer read once, a few of its row groups kept.

:class:`RowGroups` is the reader under the tables ``curate serve`` pages through by position -- the
duplicate-groups table (curate.dup_groups) and the sort indexes (curate.serve.sort_index): a row group
read once serves every slice of rows that falls in it, until it drops out of a small cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class RowGroups:
    """A Parquet file read by row group (thread-safe): :meth:`group` reads one row group (every column, or
    some), :meth:`slice` rows [start, stop) of every column.  The last ``cache`` row groups read (per column
    selection) are kept, least recently used dropped first; one lock serialises the reads of the file."""

    def __init__(self, path: str | Path, cache: int = 8) -> None:
        self.path = Path(path)
        self.pf = pq.ParquetFile(path)
        md = self.pf.metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # first row of each row group
        self.n = int(self.starts[-1])
        self.cache = cache
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, pa.Table] = OrderedDict()

    def group(self, g: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Row group ``g``: every column, or only ``columns``."""
        key = (g, None if columns is None else tuple(columns))
        with self._lock:
            t = self._cache.get(key)
            if t is not None:
                self._cache.move_to_end(key)
                return t
            t = self.pf.read_row_group(g, columns=None if columns is None else list(columns))
            self._cache[key] = t
            while len(self._cache) > self.cache:
                self._cache.popitem(last=False)
            return t

    def group_of(self, i: int) -> int:
        """The row group holding row ``i``."""
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def slice(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) (clipped to the file), every column."""
        start, stop = max(0, start), min(self.n, stop)
        if stop <= start:
            return self.pf.schema_arrow.empty_table()
        g0, g1 = self.group_of(start), self.group_of(stop - 1)
        t = pa.concat_tables([self.group(g) for g in range(g0, g1 + 1)])
        return t.slice(start - int(self.starts[g0]), stop - start)
