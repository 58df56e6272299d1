"""Finding input files and writing files atomically (errors name the file)."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


class InputError(ValueError):
    """The input as a whole is unusable: the message names the file (and column)."""


def format_of(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise InputError(f"{path}: cannot tell the format from the name; set input.format")


#: file names of the formats that auto-detection never picks
DECLARED_SUFFIXES = {"webdataset": (".tar",), "img2dataset": (".parquet",)}


def _input_name_ok(name: str, declared: str = "auto") -> bool:
    """An input file's name: not hidden or private, with a suffix of the (declared) format."""
    low = name.lower().removesuffix(".gz")
    suffixes = DECLARED_SUFFIXES.get(declared, tuple(SUFFIXES))
    return not name.startswith((".", "_")) and any(low.endswith(s) for s in suffixes)


def _is_input_name(p: Path, declared: str = "auto") -> bool:
    return p.is_file() and _input_name_ok(p.name, declared)


def list_input_files(spec: str, declared: str = "auto", storage: Any = None) -> list[Any]:
    """A file, a directory (searched recursively) or a glob, sorted; never empty.  A URI (``s3://...``)
    lists objects (``curate.io.remote``): a key, every key under a prefix, or a glob's matches."""
    from curate.io import remote

    if remote.is_uri(spec):
        try:
            files = remote.list_files(spec, storage, lambda f: _input_name_ok(f.name, declared))
        except (OSError, ValueError) as e:
            raise InputError(f"input.path: cannot list {spec}: {' '.join(str(e).split()) or type(e).__name__}") from None
        if not files:
            raise InputError(f"input.path: no parquet/csv/jsonl files at {spec}")
        return files
    p = Path(spec).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():  # hidden and _private folders (e.g. a curate output's _work) are skipped
        files = sorted(f for f in p.rglob("*") if _is_input_name(f, declared)
                       and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if declared in ("auto", *DECLARED_SUFFIXES):
        files = [f for f in files if _is_input_name(f, declared) or f == p]
    if not files:
        raise InputError(f"input.path: no parquet/csv/jsonl files at {spec}")
    return [f.resolve() for f in files]


def _write_error(path: Path, e: OSError) -> OSError:
    """The same error, with a one-line message naming the file we could not write."""
    errno = e.errno
    found = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)  # pyarrow: "... Detail: [errno 28] ..."
    if errno is None and found:
        errno = int(found.group(1))
    if errno:
        reason = os.strerror(errno)
    else:
        reason = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return OSError(errno, f"cannot write {path}: {reason}")


def _atomic(path: Any, write: Callable[[Any], None]) -> None:
    """Write ``path`` so that readers never see half a file: ``write(f)`` fills a binary file object.

    Local: a temp file beside ``path``, renamed over it.  Object storage (a ``UPath``) has no rename,
    but an object appears only when its upload completes: the object is written in place, and on an
    error the upload is discarded (a killed process never completes it either).

    Any OSError (disk full, file too large, permission denied...) becomes one whose
    message names ``path``; the temp file is removed.
    """
    from curate.io.remote import abort_upload, is_remote

    if is_remote(path):
        f = path.fs.open(path.path, "wb")
        try:
            write(f)
        except BaseException:
            abort_upload(f)
            raise
        try:
            f.close()
        except OSError as e:
            raise _write_error(path, e) from None
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # see remove_stale_temps
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            log.warning("could not remove the temp file %s", tmp)



def remove_stale_temps(*folders: Any) -> int:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files that writes killed half-way (SIGKILL, a lost node) left in local
    ``folders`` (object storage has none: a PUT is whole or absent); returns how many.  Called when a run builds on
    an earlier one, which no other run writes to at the same time."""
    from curate.io.remote import is_remote

    n = 0
    for folder in folders:
        if folder is None or is_remote(folder) or not Path(folder).is_dir():
            continue
        for parent, _, names in os.walk(folder):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    Path(parent, name).unlink(missing_ok=True)
                    n += 1
    return n

def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: all but float vectors (embeddings), whose distinct values fill a
    dictionary that costs more than it saves (a 100-row group of float16 embeddings: 28% larger)."""
    def vector(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
            and pa.types.is_floating(t.value_type)

    return [f.name for f in schema if not vector(f.type)]


#: defaults of ``output.row_group_rows`` / ``output.row_group_bytes``: the row groups of ``data/`` and ``rejected/``
ROW_GROUP_ROWS = 1_000
ROW_GROUP_BYTES = 64 << 20


def _value_bytes(t: pa.DataType) -> float | None:
    """Bytes a value of a fixed-width type takes in memory (a bool: 1/8); None for other types."""
    try:
        return t.bit_width / 8
    except ValueError:
        return None


def row_sizes(table: pa.Table) -> np.ndarray:
    """Each row's bytes in memory (float64): the actual lengths of its strings, binaries (images) and lists
    of fixed-width values (embeddings), the fixed widths of other scalars; any other column (structs,
    lists of strings...) spread evenly over its rows."""
    n = table.num_rows
    out = np.zeros(n, np.float64)
    if not n:
        return out
    for col in table.columns:
        t = col.type
        if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) \
                or pa.types.is_large_string(t) or pa.types.is_binary_view(t) or pa.types.is_string_view(t):
            out += pc.fill_null(pc.binary_length(col), 0).to_numpy().astype(np.float64)
            out += 8 if pa.types.is_large_binary(t) or pa.types.is_large_string(t) else 4
        elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and _value_bytes(t.value_type) is not None:
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.float64)
            out += lengths * _value_bytes(t.value_type) + (8 if pa.types.is_large_list(t) else 4)
        elif _value_bytes(t) is not None:
            out += _value_bytes(t)
        else:
            out += col.nbytes / n
    return out


def row_group_cuts(table: pa.Table, max_rows: int, max_bytes: int) -> list[int]:
    """Where the row groups of ``table`` start (and, last, its row count): each group has at most ``max_rows``
    rows and at most ``max_bytes`` bytes of rows (:func:`row_sizes`), whichever is hit first; a row larger
    than ``max_bytes`` is a group alone.  An empty table: ``[0]``."""
    n = table.num_rows
    if n == 0:
        return [0]
    cum = np.concatenate(([0.0], np.cumsum(row_sizes(table))))
    cuts, start = [0], 0
    while start < n:
        by_bytes = int(np.searchsorted(cum, cum[start] + max_bytes, side="right")) - 1
        start = max(start + 1, min(start + max_rows, n, by_bytes))
        cuts.append(start)
    return cuts


def write_parquet_atomic(table: pa.Table, path: Any, compression: str = "zstd", row_group_rows: int | None = None,
                         row_group_bytes: int | None = None) -> None:
    """Write ``table`` as one Parquet file (:func:`_atomic`).  ``row_group_rows`` / ``row_group_bytes`` bound
    its row groups (:func:`row_group_cuts`; the deliverables ``data/`` and ``rejected/``); without them the
    whole table is one row group (up to Arrow's default of 1Mi rows).  The table is never copied: each row
    group is written from a zero-copy slice."""
    options = {"compression": None if compression == "none" else compression,
               "use_dictionary": _dictionary_columns(table.schema)}
    if row_group_rows is None and row_group_bytes is None:
        _atomic(path, lambda f: pq.write_table(table, f, **options))
        return
    cuts = row_group_cuts(table, row_group_rows or max(table.num_rows, 1), row_group_bytes or float("inf"))

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, table.schema, **options) as writer:
            if table.num_rows == 0:  # one empty row group, as pq.write_table writes
                writer.write_table(table)
            for lo, hi in zip(cuts, cuts[1:]):
                writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)

    _atomic(path, write)


def write_bytes_atomic(data: bytes, path: Any) -> None:
    _atomic(path, lambda f: f.write(data))


def write_json_atomic(data: Any, path: Path) -> None:
    write_bytes_atomic(json.dumps(data, indent=2, sort_keys=False, default=str).encode(), path)


def write_text_atomic(text: str, path: Path) -> None:
    write_bytes_atomic(text.encode(), path)
