"""Streaming readers for parquet, csv/tsv and jsonl inputs (optionally gzipped).

Each reader yields ``RawBatch`` objects: the rows it could parse as a table
(with their ``source_row`` in column ``ROW``) and the records it could not
(``Malformed``), so that a bad record becomes a rejected row, not a crash.

``source_row`` is the 0-based index of the record in its file: the Parquet row;
for CSV/TSV the record after the header (a quoted field spanning lines is one
record, malformed records are counted, blank lines are not records); for JSONL
the physical line (blank lines counted).  Text that is not valid UTF-8 is never
replaced silently: the row is kept with U+FFFD in place of the bad bytes and
its column names in ``BAD_ENCODING``, and ingest rejects it as ``invalid_encoding``.
CSV/TSV have no types: every column read from them is a string.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from curate.io.files import InputError, format_of
from curate.io.remote import parquet_file
from curate.io.lines import (LineTooLong, Lines, TextLines, check_utf8, has_surrogates, open_binary, preview,
                             replace_surrogates)

ROW = "__row"
#: comma-separated names of the columns of a row that were not valid UTF-8 (null when all were)
BAD_ENCODING = "__bad_encoding"
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
_JSON_SNIFF_LINES = 1000


@dataclass
class Malformed:
    row: int | None
    detail: str
    reason: str = "malformed_row"
    error_type: str = "parse_error"


def invalid_encoding(row: int, detail: str) -> Malformed:
    return Malformed(row, detail, "invalid_encoding", "encoding_error")


@dataclass
class RawBatch:
    table: pa.Table  # parsed rows; column ROW holds source_row, BAD_ENCODING flags undecodable values
    malformed: list[Malformed] = field(default_factory=list)


def bad_type_column(col: str) -> str:
    """Name of the boolean column flagging values of ``col`` that were not strings."""
    return f"__bad_type_{col}"


def input_columns(path: Path, fmt: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[str]:
    """Column names of an input file, read cheaply (footer, header record, first JSON lines)."""
    try:
        if fmt == "webdataset":
            return []  # samples have no fixed columns (checked row by row)
        if fmt == "img2dataset":
            from curate.io.images import I2D_COLUMNS, IMAGE

            return [I2D_COLUMNS.get(c, c) for c in parquet_file(path).schema_arrow.names] + [IMAGE]
        if fmt == "parquet":
            return parquet_file(path).schema_arrow.names
        if fmt in ("csv", "tsv"):
            with open_binary(path) as f:
                return _csv_header(path, _csv_reader(TextLines(Lines(f, max_line_bytes)), fmt, max_line_bytes))
        names: dict[str, None] = {}
        with open_binary(path) as f:
            lines = Lines(f, max_line_bytes)
            while lines.number < _JSON_SNIFF_LINES - 1:
                try:
                    obj = json.loads(replace_surrogates(next(lines).decode("utf-8", "surrogateescape")))
                except StopIteration:
                    break
                except (LineTooLong, ValueError):
                    continue
                if isinstance(obj, dict):
                    names.update(dict.fromkeys(obj))
        return list(names)
    except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def iter_raw(path: Path, fmt: str, batch_rows: int, string_cols: list[str],
             max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_image_bytes: int = 32 << 20) -> Iterator[RawBatch]:
    import tarfile

    from curate.io import images

    fmt = format_of(path, fmt)
    try:
        if fmt == "parquet":
            yield from _iter_parquet(path, batch_rows)
        elif fmt == "webdataset":
            yield from _numbered(images.iter_webdataset(path, batch_rows, max_image_bytes))
        elif fmt == "img2dataset":
            yield from _numbered(images.iter_img2dataset(path, batch_rows, max_image_bytes))
        elif fmt in ("csv", "tsv"):
            yield from _iter_csv(path, fmt, batch_rows, max_line_bytes)
        else:
            yield from _iter_jsonl(path, batch_rows, string_cols, max_line_bytes)
    except (OSError, EOFError, zlib.error, pa.ArrowException, tarfile.TarError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _numbered(tables: Iterator[pa.Table]) -> Iterator[RawBatch]:
    """Raw batches from tables of rows: ``source_row`` numbers them, strings are checked for UTF-8."""
    start = 0
    for t in tables:
        t, flags = check_utf8(t)
        t = t.append_column(BAD_ENCODING, pa.array(flags, pa.string()))
        t = t.append_column(ROW, pa.array(range(start, start + t.num_rows), pa.int64()))
        start += t.num_rows
        yield RawBatch(t)


# -- parquet -------------------------------------------------------------------------------

def _iter_parquet(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    pf = parquet_file(path)
    start = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        t, flags = check_utf8(pa.Table.from_batches([rb]))
        t = t.append_column(BAD_ENCODING, pa.array(flags, pa.string()))
        t = t.append_column(ROW, pa.array(range(start, start + t.num_rows), pa.int64()))
        start += t.num_rows
        yield RawBatch(t)


# -- csv / tsv -----------------------------------------------------------------------------

def _delim(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


def _csv_reader(text: TextLines, fmt: str, max_line_bytes: int) -> Any:
    # the field size limit is process-wide; a quoted field may span lines, the limit bounds it too
    csv.field_size_limit(max(max_line_bytes, 1 << 17))
    return csv.reader(text, delimiter=_delim(fmt), strict=False)


def _csv_header(path: Path, reader: Any) -> list[str]:
    """The first non-blank record; [] for an empty file."""
    try:
        for rec in reader:
            if rec:
                break
        else:
            return []
    except (csv.Error, LineTooLong) as e:
        raise InputError(f"{path}: cannot read the header line: {e}") from None
    names = [replace_surrogates(n) for n in rec]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{path}: duplicate column names in the header: {', '.join(dup)}")
    return names


def _iter_csv(path: Path, fmt: str, batch_rows: int, max_line_bytes: int) -> Iterator[RawBatch]:
    with open_binary(path) as f:
        text = TextLines(Lines(f, max_line_bytes))
        reader = _csv_reader(text, fmt, max_line_bytes)
        header = _csv_header(path, reader)
        if not header:
            return
        n_fields = len(header)
        recs: list[list[str]] = []
        rows: list[int] = []
        flags: list[str | None] = []
        bad: list[Malformed] = []
        record = 0
        while True:
            text.undecodable = False  # set again if a line of the next record has bad bytes
            try:
                rec = next(reader)
            except StopIteration:
                break
            except LineTooLong as e:
                bad.append(Malformed(record, str(e)))
            except csv.Error as e:
                bad.append(Malformed(record, f"cannot parse: {e}"))
            else:
                if not rec:  # a blank line is not a record
                    continue
                enc = [header[j] if j < n_fields else f"field {j}" for j, v in enumerate(rec)
                       if has_surrogates(v)] if text.undecodable else []
                if len(rec) != n_fields:
                    detail = f"expected {n_fields} fields, got {len(rec)}: {preview(_delim(fmt).join(rec))}"
                    bad.append(invalid_encoding(record, "not valid UTF-8; " + detail) if enc
                               else Malformed(record, detail))
                else:
                    recs.append([replace_surrogates(v) for v in rec] if enc else rec)
                    rows.append(record)
                    flags.append(",".join(enc) if enc else None)
            record += 1
            if len(rows) + len(bad) >= batch_rows:
                yield RawBatch(_csv_table(header, recs, rows, flags), bad)
                recs, rows, flags, bad = [], [], [], []
        if rows or bad:
            yield RawBatch(_csv_table(header, recs, rows, flags), bad)


def _csv_table(header: list[str], recs: list[list[str]], rows: list[int], flags: list[str | None]) -> pa.Table:
    cols = list(zip(*recs)) if recs else [() for _ in header]
    data = {name: pa.array(values, pa.string()) for name, values in zip(header, cols)}
    data[BAD_ENCODING] = pa.array(flags, pa.string())
    data[ROW] = pa.array(rows, pa.int64())
    return pa.table(data)


# -- jsonl ---------------------------------------------------------------------------------

def _iter_jsonl(path: Path, batch_rows: int, string_cols: list[str], max_line_bytes: int) -> Iterator[RawBatch]:
    rows: list[dict] = []
    nums: list[int] = []
    flags: list[str | None] = []
    bad: list[Malformed] = []
    with open_binary(path) as f:
        lines = Lines(f, max_line_bytes)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except LineTooLong as e:
                bad.append(Malformed(lines.number, str(e)))
                continue
            i = lines.number
            if not raw.strip():
                continue
            parsed = _parse_json_line(raw, i)
            if isinstance(parsed, Malformed):
                bad.append(parsed)
            else:
                rows.append(parsed[0])
                nums.append(i)
                flags.append(parsed[1])
            if len(rows) + len(bad) >= batch_rows:
                yield RawBatch(_rows_to_table(rows, nums, flags, string_cols), bad)
                rows, nums, flags, bad = [], [], [], []
    if rows or bad:
        yield RawBatch(_rows_to_table(rows, nums, flags, string_cols), bad)


def _parse_json_line(raw: bytes, i: int) -> Malformed | tuple[dict, str | None]:
    """One JSON object (string values with bad bytes shown as U+FFFD) and its bad columns, or why not."""
    try:
        line = raw.decode("utf-8")
        undecodable = False
    except UnicodeDecodeError:
        line = raw.decode("utf-8", "surrogateescape")
        undecodable = True
    try:
        obj = json.loads(line)
    except ValueError as e:
        if undecodable:
            return invalid_encoding(i, f"not valid UTF-8 (and not valid JSON): {preview(line)}")
        return Malformed(i, f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return Malformed(i, f"expected a JSON object, got {type(obj).__name__}")
    if any(has_surrogates(k) for k in obj):
        return invalid_encoding(i, f"a key is not valid UTF-8: {preview(line)}")
    enc = [k for k, v in obj.items() if isinstance(v, str) and has_surrogates(v)]
    for k in enc:
        obj[k] = replace_surrogates(obj[k])
    return obj, (",".join(enc) if enc else None)


def _rows_to_table(rows: list[dict], nums: list[int], flags: list[str | None], string_cols: list[str]) -> pa.Table:
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
            # mixed types: keep strings as they are, JSON-encode the rest (lone surrogates as \u escapes)
            cols[k] = pa.array([v if (v is None or isinstance(v, str)) else json.dumps(v) for v in values],
                               pa.string())
    cols[BAD_ENCODING] = pa.array(flags, pa.string())
    cols[ROW] = pa.array(nums, pa.int64())
    return pa.table(cols)
