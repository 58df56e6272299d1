"""The input manifest: which input files a run reads, so that a resume can prove
it reads the very same input.

``_work/input_manifest.json`` (written when a run starts) holds::

    {"version": 1, "input_path": "<input.path as configured>",
     "files": [{"path": "/abs/a.csv", "size": 10, "mtime_ns": 1700000000000000000}, ...]}

``files`` is in shard order: the shard id ``FFFFF-CCCCC`` uses a file's index
in this list.  An entry is a plain dict so that object-storage inputs can add
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
