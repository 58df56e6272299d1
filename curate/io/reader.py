"""Streaming readers for parquet, csv/tsv and jsonl inputs (optionally gzipped).

Each reader yields ``RawBatch`` objects: the rows it could parse as a table
(with their 0-based row number in the file) and the rows it could not
(malformed lines), so that a bad line becomes a rejected row, not a crash.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curate.io.files import InputError, format_of

ROW = "__row"


@dataclass
class Malformed:
    row: int | None
    detail: str


@dataclass
class RawBatch:
    table: pa.Table  # parsed rows; column ROW holds the row number in the file
    malformed: list[Malformed] = field(default_factory=list)


def input_columns(path: Path, fmt: str) -> list[str]:
    """Column names of an input file, read cheaply (footer, header line, first JSON lines)."""
    try:
        if fmt == "parquet":
            return pq.read_schema(path).names
        if fmt in ("csv", "tsv"):
            with _open_text(path) as f:
                header = f.readline()
            if not header.strip():
                return []
            delim = "\t" if fmt == "tsv" else ","
            return next(csv.reader([header], delimiter=delim))
        names: dict[str, None] = {}
        with _open_text(path) as f:
            for i, line in enumerate(f):
                if i >= 1000:
                    break
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    names.update(dict.fromkeys(obj))
        return list(names)
    except (OSError, pa.ArrowException, UnicodeDecodeError, EOFError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from None


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def iter_raw(path: Path, fmt: str, batch_rows: int, string_cols: list[str]) -> Iterator[RawBatch]:
    fmt = format_of(path, fmt)
    try:
        if fmt == "parquet":
            yield from _iter_parquet(path, batch_rows)
        elif fmt in ("csv", "tsv"):
            yield from _iter_csv(path, fmt, batch_rows, string_cols)
        else:
            yield from _iter_jsonl(path, batch_rows, string_cols)
    except (OSError, pa.ArrowException, EOFError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None


def _iter_parquet(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    pf = pq.ParquetFile(path)
    start = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        t = pa.Table.from_batches([rb])
        t = t.append_column(ROW, pa.array(range(start, start + t.num_rows), pa.int64()))
        start += t.num_rows
        yield RawBatch(t)


def _iter_csv(path: Path, fmt: str, batch_rows: int, string_cols: list[str]) -> Iterator[RawBatch]:
    bad: list[Malformed] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        n = None if row.number is None else row.number - 2  # 1-based line incl. header -> 0-based data row
        bad.append(Malformed(n, f"expected {row.expected_columns} fields, got {row.actual_columns}: "
                                f"{row.text[:200]!r}"))
        return "skip"

    header = input_columns(path, fmt)
    if not header:
        return
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True,
                                          invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in string_cols if c in header},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    start = 0
    pending: list[pa.RecordBatch] = []
    rows = 0
    for rb in reader:
        pending.append(rb)
        rows += rb.num_rows
        if rows >= batch_rows:
            t = pa.Table.from_batches(pending)
            yield RawBatch(t.append_column(ROW, pa.array(range(start, start + t.num_rows), pa.int64())), bad[:])
            start += t.num_rows
            pending, rows, bad[:] = [], 0, []
    if pending or bad:
        t = pa.Table.from_batches(pending, schema=reader.schema)
        yield RawBatch(t.append_column(ROW, pa.array(range(start, start + t.num_rows), pa.int64())), bad[:])


def _iter_jsonl(path: Path, batch_rows: int, string_cols: list[str]) -> Iterator[RawBatch]:
    rows: list[dict] = []
    nums: list[int] = []
    bad: list[Malformed] = []
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                bad.append(Malformed(i, f"invalid JSON: {e}"))
                continue
            if not isinstance(obj, dict):
                bad.append(Malformed(i, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            rows.append(obj)
            nums.append(i)
            if len(rows) >= batch_rows:
                yield RawBatch(_rows_to_table(rows, nums, string_cols), bad)
                rows, nums, bad = [], [], []
    if rows or bad:
        yield RawBatch(_rows_to_table(rows, nums, string_cols), bad)


def bad_type_column(col: str) -> str:
    """Name of the boolean column flagging values of ``col`` that were not strings."""
    return f"__bad_type_{col}"


def _rows_to_table(rows: list[dict], nums: list[int], string_cols: list[str]) -> pa.Table:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    cols = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        if k in string_cols:
            bad = [v is not None and not isinstance(v, str) for v in values]
            cols[k] = pa.array([None if b else v for v, b in zip(values, bad)], pa.string())
            cols[bad_type_column(k)] = pa.array(bad, pa.bool_())
            continue
        try:
            cols[k] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # mixed types: keep strings as they are, JSON-encode the rest
            cols[k] = pa.array([v if (v is None or isinstance(v, str)) else json.dumps(v) for v in values],
                               pa.string())
    cols[ROW] = pa.array(nums, pa.int64())
    return pa.table(cols)
