"""Paths that are local or on object storage: the work folder's files, wherever it is.

Everything a run keeps between steps -- ingest bases, column groups, fit views, done markers, global stages'
states and partitioned files -- lives in the work folder.  On a cluster whose nodes share nothing but a
bucket that folder is a URI (``output.work_path: s3://bucket/prefix``, or ``OUTPUT/_work`` for an output on
object storage), so a path here is a local ``Path`` or a ``UPath``, and these helpers read, write, list and
delete either:

* ``as_path(s)`` turns a string that travelled (a Ray task's argument, a name in a fit view, a SQL literal)
  back into a path.  A URI gets the run's storage options (endpoint, region...): :func:`set_storage` keeps
  them in this process and in the environment variable ``CURATE_STORAGE``, which the processes the run starts
  inherit (a Ray cluster curate connects to gets it as the job's ``runtime_env``, see :func:`ray_env`).
* An object appears whole when its upload completes (``curate.io.files`` writes atomically on both).
* Listings never come from a cache (other processes write the same folder) and list by key prefix, so
  finding a shard's files costs one request however many files the folder holds.
* DuckDB reads and writes URIs through the fsspec filesystem registered on its connection (its httpfs
  extension is not needed); its spill folder is always local scratch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.io import remote

ENV = "CURATE_STORAGE"
_storage: dict[str, Any] | None = None
#: set by the Ray session curate started (its workers got ``CURATE_STORAGE`` at start); else calls pass it
ray_env_inherited = False


class _Storage:
    """The ``storage:`` config section as ``curate.io.remote.storage_options`` reads it."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.endpoint_url = d.get("endpoint_url")
        self.region = d.get("region")
        self.anonymous = bool(d.get("anonymous"))
        self.options = dict(d.get("options") or {})


def set_storage(storage: Any) -> None:
    """Use the ``storage:`` config section (a pydantic model, a dict, or None) for every URI made here."""
    global _storage
    d = storage.model_dump() if hasattr(storage, "model_dump") else dict(storage or {})
    _storage = d
    os.environ[ENV] = json.dumps(d, sort_keys=True)


def storage() -> _Storage:
    global _storage
    if _storage is None:
        _storage = json.loads(os.environ.get(ENV) or "{}")
    return _Storage(_storage)


def ray_env() -> dict[str, Any]:
    """Options for a Ray task or actor that reads or writes URIs: the storage settings travel in its
    environment, unless the workers inherited them (the Ray session curate started)."""
    raw = os.environ.get(ENV)
    if ray_env_inherited or not raw or raw == "{}":
        return {}
    return {"runtime_env": {"env_vars": {ENV: raw}}}


def is_uri(p: Any) -> bool:
    return remote.is_uri(str(p)) if isinstance(p, (str, Path)) else remote.is_remote(p)


def as_path(p: Any) -> Any:
    """A local ``Path`` or, for a URI (or a ``UPath``), a ``UPath`` with the run's storage options."""
    if isinstance(p, Path):
        return p
    if not isinstance(p, str):
        return p  # a UPath already
    if remote.is_uri(p):
        opts = remote.storage_options(storage(), p)
        opts.setdefault("use_listings_cache", False)  # other processes write here: never list from a cache
        from upath import UPath

        return UPath(p.rstrip("/"), **opts)
    return Path(p)


def exists(p: Any) -> bool:
    p = as_path(p)
    return p.fs.exists(p.path) if is_uri(p) else p.exists()


def makedirs(p: Any) -> None:
    """A folder to write files in (object storage has no folders: nothing to do there)."""
    p = as_path(p)
    if not is_uri(p):
        p.mkdir(parents=True, exist_ok=True)


def remove(p: Any) -> None:
    """Delete a file or a folder (recursively); absent: nothing to do."""
    p = as_path(p)
    if is_uri(p):
        try:
            p.fs.rm(p.path, recursive=True)
        except FileNotFoundError:
            pass
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def listdir(folder: Any, prefix: str = "", suffix: str = "", recursive: bool = False) -> list[Any]:
    """Files directly in ``folder`` (``recursive``: at any depth) whose names start with ``prefix`` and end
    with ``suffix``, sorted.  On object storage one LIST by key prefix (paginated), never the whole folder
    for a ``prefix``.  A missing folder: none."""
    folder = as_path(folder)
    if is_uri(folder):
        fs, base = folder.fs, folder.path.rstrip("/")
        try:
            found = fs.find(base, prefix=prefix, maxdepth=None if recursive else 1) if prefix else \
                fs.find(base, maxdepth=None if recursive else 1)
        except FileNotFoundError:
            return []
        proto = str(folder).split("://", 1)[0]
        names = [f for f in found if f.endswith(suffix) and (recursive or "/" not in f[len(base) + 1:])]
        return [as_path(f"{proto}://{f}") for f in sorted(names)]
    if not folder.is_dir():
        return []
    it = folder.rglob(f"{_escape(prefix)}*{suffix}") if recursive else folder.glob(f"{_escape(prefix)}*{suffix}")
    return sorted(f for f in it if not f.name.startswith(".") and f.is_file())  # .NAME.tmp: a write under way


def subdirs(folder: Any, prefix: str = "") -> list[Any]:
    """Immediate sub-folders of ``folder`` whose names start with ``prefix`` (on object storage: the common
    key prefixes of one delimited LIST)."""
    folder = as_path(folder)
    if is_uri(folder):
        try:
            found = folder.fs.ls(folder.path, detail=True)
        except FileNotFoundError:
            return []
        proto = str(folder).split("://", 1)[0]
        return sorted(as_path(f"{proto}://{d['name']}") for d in found
                      if d["type"] == "directory" and d["name"].rstrip("/").rsplit("/", 1)[-1].startswith(prefix))
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith(prefix))


def _escape(s: str) -> str:
    import glob

    return glob.escape(s)


def copy(src: Any, dst: Any) -> None:
    """``dst`` becomes a copy of the file ``src``, whole or not at all: locally a hard link (no bytes copied;
    a plain copy where links fail) put in place by a rename, on object storage a server-side copy."""
    src, dst = as_path(src), as_path(dst)
    if is_uri(dst):
        dst.fs.copy(src.path, dst.path)
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def identity(p: Any) -> list | None:
    """What tells one version of a file from another without reading it: size, modification time in
    nanoseconds and inode (a rewrite renames a new file into place); object storage: size and ETag.  None if
    it does not exist."""
    p = as_path(p)
    try:
        if is_uri(p):
            info = p.fs.info(p.path)
            return [info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("LastModified"))]
        st = p.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def read_bytes(p: Any) -> bytes:
    """The whole file; an object in one GET (no HEAD first: the work folder's files are small)."""
    p = as_path(p)
    return p.fs.cat_file(p.path, start=0) if is_uri(p) else p.read_bytes()


def read_json(p: Any) -> Any:
    return json.loads(read_bytes(p))


def write_bytes(data: bytes, p: Any) -> None:
    from curate.io.files import write_bytes_atomic

    write_bytes_atomic(data, as_path(p))


def _arrow_args(p: Any) -> tuple[str, Any]:
    p = as_path(p)
    return (p.path, p.fs) if is_uri(p) else (str(p), None)


def read_table(p: Any, columns: list[str] | None = None, only_present: bool = False, **kw: Any) -> pa.Table:
    """A Parquet file as a table; an object is fetched whole in one GET (no HEAD, no ranged reads: the work
    folder's files -- column groups, views, partitions -- are read whole or nearly so).  ``only_present``: of
    ``columns``, those the file holds (a column group's part lacks the columns no row of it reached), taken
    from the footer the read parses anyway, not from a read of the schema first."""
    path, fs = _arrow_args(p)
    src = path if fs is None else pa.BufferReader(fs.cat_file(path, start=0))
    if only_present and columns is not None:
        with pq.ParquetFile(src) as f:
            names = set(f.schema_arrow.names)
            return f.read(columns=[c for c in columns if c in names], **kw)
    return pq.read_table(src, columns=columns, **kw)


_TAIL = 64 << 10


def _footer(path: str, fs: Any) -> pa.BufferReader:
    """The end of a Parquet object holding its whole footer: one suffix-range GET (two for a footer larger
    than 64 KiB)."""
    tail = fs.cat_file(path, start=-_TAIL)
    need = int.from_bytes(tail[-8:-4], "little") + 8 if len(tail) >= 8 else 0
    if need > len(tail):
        tail = fs.cat_file(path, start=-need)
    return pa.BufferReader(tail)


def read_schema(p: Any) -> pa.Schema:
    path, fs = _arrow_args(p)
    return pq.read_schema(path) if fs is None else pq.read_schema(_footer(path, fs))


def read_metadata(p: Any) -> pq.FileMetaData:
    path, fs = _arrow_args(p)
    return pq.read_metadata(path) if fs is None else pq.read_metadata(_footer(path, fs))


def write_table(table: pa.Table, p: Any, **kw: Any) -> None:
    """``pq.write_table`` to a local file or an object (whole or not at all on both)."""
    from curate.io.files import _atomic

    _atomic(as_path(p), lambda f: pq.write_table(table, f, **kw))


def save_npy(p: Any, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, a)
    write_bytes(buf.getvalue(), p)


def load_npy(p: Any, mmap: bool = False) -> np.ndarray:
    """An ``.npy`` array (``mmap``: memory-mapped where the file is local)."""
    p = as_path(p)
    if not is_uri(p):
        return np.load(p, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(p.read_bytes()))


def register(con: Any, paths: Iterable[Any]) -> None:
    """Let a DuckDB connection read and write the URIs among ``paths`` (their fsspec filesystems)."""
    for p in paths:
        if p is None or not is_uri(p):
            continue
        fs = as_path(p).fs
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if not con.filesystem_is_registered(protocol):  # file infos asked once (DuckDB asks ~14 times a file)
            con.register_filesystem(remote.memo_filesystem(fs))
