"""Input files on object storage (``s3://``, ``gs://``, any filesystem fsspec knows).

An input path that is a URI becomes a ``UPath`` (universal_pathlib: pathlib's interface over fsspec),
so the readers treat local and remote files alike (``name``, ``open``, ``stat``).  Credentials come
from the usual environment (``AWS_ACCESS_KEY_ID``..., instance roles) and from the optional
``storage:`` config section (endpoint, region, anonymous access, extra fsspec options).

A remote file's manifest entry holds its URI, size and ETag (S3, GCS) -- or modification time where
the store has no ETag -- so a resume refuses a changed object just as it refuses a changed local file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB = re.compile(r"[*?\[]")


def is_uri(spec: str | Path) -> bool:
    """A URI of a non-local filesystem (``file://`` counts as local)."""
    s = str(spec)
    return bool(_URI.match(s)) and not s.startswith("file://")


def is_remote(path: Any) -> bool:
    return not isinstance(path, Path) or is_uri(str(path))


def storage_options(storage: Any, uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` from the ``storage:`` config section (None: the environment only)."""
    if storage is None:
        return {}
    opts: dict[str, Any] = dict(storage.options or {})
    protocol = uri.split("://", 1)[0].lower()
    if protocol in ("s3", "s3a"):
        if storage.endpoint_url:
            opts.setdefault("endpoint_url", storage.endpoint_url)
        if storage.region:
            opts.setdefault("client_kwargs", {}).setdefault("region_name", storage.region)
        if storage.anonymous:
            opts.setdefault("anon", True)
    elif protocol in ("gs", "gcs"):
        if storage.endpoint_url:
            opts.setdefault("endpoint_url", storage.endpoint_url)
        if storage.anonymous:
            opts.setdefault("token", "anon")
    return opts


def upath(uri: str, storage: Any = None):
    from upath import UPath

    return UPath(uri, **storage_options(storage, uri))


def input_path(spec: str, storage: Any = None) -> Any:
    """A local ``Path`` or, for a URI, a ``UPath``."""
    return upath(spec, storage) if is_uri(spec) else Path(spec)


def output_root(spec: Any, storage: Any = None) -> Any:
    """An output directory: a local ``Path`` (resolved), or a ``UPath`` for a URI (credentials and
    endpoint from ``storage`` and the environment, e.g. ``AWS_ENDPOINT_URL``)."""
    if not isinstance(spec, (str, Path)):
        return spec  # already a UPath
    if is_uri(spec):
        return upath(str(spec).rstrip("/"), storage)
    return Path(spec).expanduser().resolve()


def remove(path: Any) -> None:
    """Delete a file or a folder (recursively), local or on object storage; absent: nothing to do."""
    import shutil

    if is_remote(path):
        if path.fs.exists(path.path):
            path.fs.rm(path.path, recursive=True)
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def abort_upload(f: Any) -> None:
    """Give up an object being written (an fsspec file opened "wb"): its multipart upload is aborted, so no
    object appears, and closing it later commits nothing."""
    if hasattr(f, "discard"):
        f.discard()
        f.closed = True


_MEMO_CLASSES: dict[tuple[type, bool], type] = {}


def memo_filesystem(fs: Any, listings: bool = False) -> Any:
    """A private copy of the fsspec filesystem ``fs`` that remembers every file's info (size, ETag) it was
    told, and with ``listings`` every folder listing, for its own life.  For a DuckDB connection: DuckDB asks
    fsspec for a file's info about 14 times per file it reads (each one an S3 HEAD), and globs again on every
    query.  Only what exists is remembered (a file written later is found); a connection is short-lived, and
    the files it reads do not change under it (work files are written once, a finished output is read)."""
    cls = type(fs)
    key = (cls, listings)
    if key not in _MEMO_CLASSES:
        def _remember(name: str, lists: bool):
            base = getattr(cls, name)
            is_async = name.startswith("_")

            if is_async:
                async def method(self, path, *a, **kw):
                    k = (name, self._strip_protocol(path) if isinstance(path, str) else str(path), a,
                         tuple(sorted((x, str(y)) for x, y in kw.items())))
                    if k not in self._curate_memo:
                        self._curate_memo[k] = await base(self, path, *a, **kw)
                    return self._curate_memo[k]
            else:
                def method(self, path, *a, **kw):
                    k = (name, self._strip_protocol(path) if isinstance(path, str) else str(path), a,
                         tuple(sorted((x, str(y)) for x, y in kw.items())))
                    if k not in self._curate_memo:
                        self._curate_memo[k] = base(self, path, *a, **kw)
                    return self._curate_memo[k]
            return method

        names = ["_info", "info"] + (["_ls", "ls", "_lsdir", "_find", "find", "_glob", "glob", "_exists", "exists",
                                      "_isdir", "isdir"] if listings else [])
        attrs = {n: _remember(n, listings) for n in names if hasattr(cls, n)
                 and (n.startswith("_") or not hasattr(cls, "_" + n))}  # async filesystems: their async method
        _MEMO_CLASSES[key] = type(f"Memo{cls.__name__}", (cls,), attrs)
    opts = dict(getattr(fs, "storage_options", {}) or {})
    opts.pop("skip_instance_cache", None)
    copy = _MEMO_CLASSES[key](skip_instance_cache=True, **opts)
    copy._curate_memo = {}
    return copy


def register(con: Any, root: Any) -> None:
    """Let a DuckDB connection read ``root``'s files when they are on object storage (through fsspec:
    DuckDB's own httpfs extension is not needed).  The connection reads a finished output: its listings and
    file infos are asked once (:func:`memo_filesystem`)."""
    if is_remote(root):
        con.register_filesystem(memo_filesystem(root.fs, listings=True))


def list_files(spec: str, storage: Any, keep) -> list[Any]:
    """Files at a URI: the object itself, every object under a prefix (recursively), or a glob's matches;
    ``keep(path)`` filters them by name.  Sorted by URI."""
    m = _GLOB.search(spec)
    if m:
        base_end = spec.rfind("/", 0, m.start())
        base, pattern = spec[:base_end], spec[base_end + 1:]
        found = list(upath(base, storage).glob(pattern))
    else:
        p = upath(spec, storage)
        if p.is_file():
            return [p]
        found = [f for f in p.rglob("*") if not any(part.startswith((".", "_")) for part in
                                                    str(f)[len(str(p).rstrip("/")) + 1:].split("/")[:-1])]
    return sorted((f for f in found if keep(f)), key=str)


def file_entry(path: Any) -> dict[str, Any]:
    """Manifest entry of a remote file: URI, size and ETag (else the modification time)."""
    info = path.fs.info(path.path)
    entry: dict[str, Any] = {"path": str(path), "size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        entry["etag"] = str(etag).strip('"')
    else:
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
        entry["mtime"] = str(mtime)
    return entry


def parquet_file(path: Any):
    """``pq.ParquetFile`` of a local or remote file."""
    import pyarrow.parquet as pq

    if is_remote(path):
        return pq.ParquetFile(path.path, filesystem=path.fs)
    return pq.ParquetFile(path)
