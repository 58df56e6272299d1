"""The input manifest: which input files a run reads, so that a resume can prove
it reads the very same input.

``_work/input_manifest.json`` (written when a run starts) holds::

    {"version": 1, "input_path": "<input.path as configured>",
     "files": [{"path": "/abs/a.csv", "size": 10, "mtime_ns": 1700000000000000000}, ...]}

A shard id is ``HHHHHHHHHHHHHHHH-CCCCC``: a digest of the file's path and the chunk index, so that it
never depends on where the file sorts among the inputs (``--append`` adds files anywhere).  An entry is a plain dict so that object-storage inputs can add
their own fields later (e.g. ``etag`` instead of ``mtime_ns``); ``file_key``
and ``describe_changes`` use every field an entry has.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from curate.io.files import InputError

log = logging.getLogger(__name__)

VERSION = 1
#: how many changed files a refusal names before it says "and N more"
MAX_NAMED = 5

Entry = dict[str, Any]


def file_entry(path: Any) -> Entry:
    """The manifest entry of a file: local: resolved path, size and mtime in nanoseconds; on object
    storage: URI, size and ETag (``curate.io.remote``)."""
    from curate.io import remote

    if remote.is_remote(path):
        try:
            return remote.file_entry(path)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read: {' '.join(str(e).split()) or type(e).__name__}") from None
    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_manifest(input_path: str, files: list[Any]) -> dict[str, Any]:
    return {"version": VERSION, "input_path": input_path, "files": [file_entry(f) for f in files]}


def file_key(entry: Entry) -> str:
    """A stable key of one version of one input file (its ingest done marker is named by it)."""
    data = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The recorded manifest, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable input manifest (%s)", path, e)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def entry_change(old: Entry, new: Entry) -> str:
    """What differs between two versions of one file, e.g. "size 10 -> 12, mtime changed"."""
    parts = []
    for k in sorted((set(old) | set(new)) - {"path"}, key=lambda k: (k != "size", k)):
        if old.get(k) != new.get(k):
            parts.append("mtime changed" if k == "mtime_ns" else f"{k} {old.get(k)} -> {new.get(k)}")
    return ", ".join(parts)


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """None when both manifests list the same files in the same versions, else one line naming the changes."""
    if old.get("version") != new.get("version"):
        return f"input manifest version {old.get('version')} -> {new.get('version')}"
    before = {e["path"]: e for e in old["files"]}
    after = {e["path"]: e for e in new["files"]}
    changes = [f"added {p}" for p in after if p not in before]
    changes += [f"removed {p}" for p in before if p not in after]
    changes += [f"rewritten {p} ({entry_change(before[p], after[p])})"
                for p in after if p in before and before[p] != after[p]]
    if not changes and [e["path"] for e in old["files"]] != [e["path"] for e in new["files"]]:
        changes.append("the input files are listed in another order")
    if not changes:
        return None
    more = len(changes) - MAX_NAMED
    return ", ".join(changes[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def added_files(old: dict[str, Any], new: dict[str, Any]) -> list[str] | None:
    """The paths ``new`` adds to ``old`` when that is its only change (every old file still there, unchanged);
    None otherwise (a file removed or rewritten)."""
    if old.get("version") != new.get("version"):
        return None
    after = {e["path"]: e for e in new["files"]}
    if any(after.get(e["path"]) != e for e in old["files"]):
        return None
    before = {e["path"] for e in old["files"]}
    return [p for p in after if p not in before]


def relative_path(path: str, input_path: str) -> str:
    """``path`` (a manifest entry's: resolved local path or URI) relative to ``input.path`` (a folder or file)."""
    from curate.io import remote

    wild = [i for i in (str(input_path).find(c) for c in "*?[") if i >= 0]
    if wild:  # a glob: relative to the folder above its first wildcard
        input_path = str(input_path)[:min(wild)].rsplit("/", 1)[0] or "/"
    if remote.is_remote(path):
        root = str(input_path).rstrip("/")
        return path[len(root) + 1:] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
    root = Path(input_path).expanduser().resolve()
    p = Path(path)
    try:
        return p.relative_to(root).as_posix() if root.is_dir() else p.name
    except ValueError:
        return p.name


def file_id(entry: Entry, input_path: str) -> str:
    """The shard id prefix of an input file: 16 hex digits of the SHA-256 of its path relative to ``input.path``
    (the same wherever the input folder is; 64 bits: no two files of a corpus of millions share one -- checked
    at ingest anyway)."""
    rel = relative_path(str(entry["path"]), input_path)
    return hashlib.sha256(rel.encode("utf-8", "surrogatepass")).hexdigest()[:16]
