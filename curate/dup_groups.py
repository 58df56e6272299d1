"""The duplicate-groups table of an output: ``OUT/duplicate_groups/``, written once, read by position.

The dedup stages mark each removed copy in ``rejected/`` with ``duplicate_of`` (the uid of the row kept
in its group), ``duplicate_kind`` (``exact``, ``phash``, ``semantic``) and a ``reject_detail`` naming the
distance (``phash distance 3 to UID``, ``cosine 0.9871 with UID``, ``same image bytes as UID``).  A
group is a kept row (its ``duplicate_of``) with its copies.  :func:`write_duplicate_groups` gathers
them once (a DuckDB pass over ``rejected/`` and a semi-join on ``data/`` and ``rejected/`` for where
each kept row is stored) into three Parquet files:

* ``groups.parquet``: one row per group, largest first (then by kept uid): ``keeper``, ``kinds``
  (comma-separated), ``members``, where the kept row is stored (``keeper_view``, ``keeper_file``,
  ``keeper_row``; null when no row has that uid), and ``first_member`` (its first row in
  ``members.parquet``);
* ``members.parquet``: one row per copy, grouped in the order of ``groups.parquet`` and, in a group, by
  kind, ``distance``, then uid: ``keeper``, ``uid``, ``kind``, ``stage``, ``reason``, ``detail``, ``distance``
  (0 for exact, Hamming bits for phash, 1 - cosine for semantic), ``file``, ``row`` (in ``rejected/``);
* ``by_keeper.parquet``: ``keeper`` -> ``position`` (its row in ``groups.parquet``), sorted by keeper.

``manifest.json`` records the version, the counts and a fingerprint of the ``data/`` and ``rejected/``
files it was built from (names and sizes): a table whose fingerprint differs is stale.  Every page
of ``curate serve`` over it reads one or two row groups (:class:`DuplicateGroups`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema as S
from curate.io.rowgroups import RowGroups
from curate.io.sql import sql_string
from curate.layout import Layout
from curate.query import parquet_files

log = logging.getLogger(__name__)

DIR = "duplicate_groups"
VERSION = 1
ROW_GROUP = 2048
FILES = ("groups.parquet", "members.parquet", "by_keeper.parquet")


def fingerprint_of(entries: list[tuple[str, str, int]]) -> str:
    """A fingerprint of (directory label, file name, size) entries."""
    h = hashlib.sha256()
    for d, name, size in sorted(entries):
        h.update(f"{d}\0{name}\0{size}\n".encode())
    return h.hexdigest()[:32]


def output_fingerprint(layout: Layout) -> str:
    entries = []
    for label, d in (("data", layout.data), ("rejected", layout.rejected)):
        for p in parquet_files(d):
            try:
                entries.append((label, p.name, p.stat().st_size))
            except OSError:
                pass
    return fingerprint_of(entries)


def table_dir(output: str | Path) -> Path:
    return Path(output) / DIR


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if m.get("version") != VERSION or not all((folder / f).exists() for f in FILES):
        return None
    return m


def is_current(folder: Path, fingerprint: str) -> bool:
    m = read_manifest(folder)
    return m is not None and m.get("fingerprint") == fingerprint


def _schema(p: Path) -> pa.Schema:
    return pq.read_schema(p)


def _src(files: list[Path], schemas: dict[Path, pa.Schema]) -> str:
    """One read_parquet per distinct schema, unioned by name (``union_by_name`` would hold every footer at once)."""
    groups: dict[str, list[str]] = {}
    for p in files:
        key = schemas[p].remove_metadata().to_string(show_field_metadata=False)
        groups.setdefault(key, []).append(sql_string(str(p)))
    parts = [f"read_parquet([{', '.join(g)}], filename = '_cg_file', file_row_number = true)" for g in groups.values()]
    return parts[0] if len(parts) == 1 else "(" + " UNION ALL BY NAME ".join(f"SELECT * FROM {x}" for x in parts) + ")"


def _has(files: list[Path], column: str, schemas: dict[Path, pa.Schema]) -> list[Path]:
    return [p for p in files if column in schemas[p].names]


def write_duplicate_groups(output: str | Path, dest: str | Path | None = None, threads: int | None = None,
                           force: bool = False, memory_limit: str | None = None) -> dict[str, Any]:
    """Write the table of ``output``'s duplicate groups to ``dest`` (default ``OUT/duplicate_groups``); returns
    its manifest.  An up-to-date table is left as it is (``force``: rewritten).  Atomic: written beside, then
    renamed into place.  ``threads`` / ``memory_limit``: DuckDB's (beyond the limit it spills beside the table)."""
    import duckdb

    from curate.io.remote import is_uri

    if is_uri(str(output)) or not isinstance(output, (str, Path)):
        raise ValueError("duplicate groups: only a local output (an output on object storage is not supported)")
    layout = Layout(Path(output).expanduser().resolve())
    dest = Path(dest) if dest is not None else table_dir(layout.root)
    fp = output_fingerprint(layout)
    if not force and is_current(dest, fp):
        return read_manifest(dest) or {}
    t0 = time.time()
    rejected = parquet_files(layout.rejected)
    kept_files = parquet_files(layout.data)
    schemas = {p: _schema(p) for p in rejected + kept_files}
    with_dups = _has(rejected, S.DUPLICATE_OF, schemas)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    con = duckdb.connect()
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
        con.execute(f"SET temp_directory = {sql_string(str(tmp.parent / (tmp.name + '.spill')))}")
        opts = f"(FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP}, COMPRESSION zstd)"
        if with_dups:
            kind = S.DUPLICATE_KIND if all(S.DUPLICATE_KIND in schemas[p].names for p in with_dups) \
                else "CAST(NULL AS VARCHAR)"
            con.execute(f"""CREATE TEMP TABLE m AS SELECT
                CAST({S.DUPLICATE_OF} AS VARCHAR) AS keeper, CAST({S.UID} AS VARCHAR) AS uid,
                CAST({kind} AS VARCHAR) AS kind,
                CAST({S.REJECT_STAGE} AS VARCHAR) AS stage, CAST({S.REJECT_REASON} AS VARCHAR) AS reason,
                CAST({S.REJECT_DETAIL} AS VARCHAR) AS detail,
                parse_filename(_cg_file) AS file, CAST(file_row_number AS BIGINT) AS row
                FROM {_src(with_dups, schemas)} WHERE {S.DUPLICATE_OF} IS NOT NULL""")
        else:
            con.execute("CREATE TEMP TABLE m (keeper VARCHAR, uid VARCHAR, kind VARCHAR, stage VARCHAR, "
                        "reason VARCHAR, detail VARCHAR, file VARCHAR, row BIGINT)")
        con.execute("""CREATE TEMP TABLE g AS SELECT keeper, count(*) AS members,
            string_agg(DISTINCT kind, ', ' ORDER BY kind) AS kinds FROM m GROUP BY keeper""")
        loc = []
        for view, d in (("kept", kept_files), ("rejected", rejected)):
            files = _has(d, S.UID, schemas)
            if files:
                loc.append(f"SELECT CAST({S.UID} AS VARCHAR) AS uid, '{view}' AS view, parse_filename(_cg_file) AS file, "
                           f"CAST(file_row_number AS BIGINT) AS row, {0 if view == 'kept' else 1} AS pri "
                           f"FROM {_src(files, schemas)} WHERE {S.UID} IN (SELECT keeper FROM g)")
        if loc:
            con.execute(f"CREATE TEMP TABLE k AS SELECT uid, arg_min(view, pri) AS view, arg_min(file, pri) AS file, "
                        f"arg_min(row, pri) AS row FROM ({' UNION ALL '.join(loc)}) GROUP BY uid")
        else:
            con.execute("CREATE TEMP TABLE k (uid VARCHAR, view VARCHAR, file VARCHAR, row BIGINT)")
        con.execute("""CREATE TEMP TABLE go AS SELECT g.keeper, g.kinds, g.members, k.view AS keeper_view,
            k.file AS keeper_file, k.row AS keeper_row,
            (row_number() OVER (ORDER BY g.members DESC, g.keeper) - 1) AS position,
            (sum(g.members) OVER (ORDER BY g.members DESC, g.keeper ROWS UNBOUNDED PRECEDING) - g.members)::BIGINT
                AS first_member
            FROM g LEFT JOIN k ON k.uid = g.keeper""")
        con.execute(f"COPY (SELECT keeper, kinds, members, keeper_view, keeper_file, keeper_row, first_member "
                    f"FROM go ORDER BY position) TO {sql_string(str(tmp / 'groups.parquet'))} {opts}")
        con.execute(f"COPY (SELECT keeper, position FROM go ORDER BY keeper) "
                    f"TO {sql_string(str(tmp / 'by_keeper.parquet'))} {opts}")
        distance = ("CASE m.kind WHEN 'exact' THEN 0.0 "
                    "WHEN 'phash' THEN TRY_CAST(regexp_extract(m.detail, 'phash distance ([0-9]+)', 1) AS DOUBLE) "
                    "WHEN 'semantic' THEN 1.0 - TRY_CAST(regexp_extract(m.detail, 'cosine ([-0-9.eE+]+)', 1) AS DOUBLE) "
                    "END")
        con.execute(f"""COPY (SELECT m.keeper, m.uid, m.kind, m.stage, m.reason, m.detail,
            CAST({distance} AS FLOAT) AS distance, m.file, m.row
            FROM m JOIN go ON go.keeper = m.keeper
            ORDER BY go.position, m.kind NULLS LAST, {distance} ASC NULLS LAST, m.uid) TO {sql_string(str(tmp / 'members.parquet'))} {opts}""")
        groups, members = con.execute("SELECT count(*), coalesce(sum(members), 0) FROM go").fetchone()
    finally:
        con.close()
        shutil.rmtree(tmp.parent / (tmp.name + ".spill"), ignore_errors=True)
    manifest = {"version": VERSION, "fingerprint": fp, "groups": int(groups), "members": int(members),
                "built_seconds": round(time.time() - t0, 2), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    old = dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}.old"
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    log.info("duplicate groups: %d groups, %d copies -> %s (%.1f s)", groups, members, dest, time.time() - t0)
    return manifest


class DuplicateGroups:
    """A written duplicate-groups table (thread-safe reads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder) or {}
        self.groups = RowGroups(self.folder / "groups.parquet")
        self.members = RowGroups(self.folder / "members.parquet")
        self.by_keeper = RowGroups(self.folder / "by_keeper.parquet")
        md = self.by_keeper.pf.metadata
        col = self.by_keeper.pf.schema_arrow.get_field_index("keeper")
        self._kmin = [md.row_group(i).column(col).statistics.min if md.row_group(i).column(col).statistics
                      and md.row_group(i).column(col).statistics.has_min_max else None
                      for i in range(md.num_row_groups)]

    @property
    def total(self) -> int:
        return self.groups.n

    def page(self, offset: int, count: int) -> list[dict[str, Any]]:
        return self.groups.slice(offset, offset + count).to_pylist()

    def find(self, keeper: str) -> tuple[int, dict[str, Any]] | None:
        """(position, group row) of the group whose kept row is ``keeper``."""
        import bisect

        if not self.by_keeper.n:
            return None
        g = max(0, bisect.bisect_right([k if k is not None else "" for k in self._kmin], keeper) - 1)
        t = self.by_keeper.group(g)
        keys = t.column("keeper").to_pylist()
        i = bisect.bisect_left(keys, keeper)
        if i >= len(keys) or keys[i] != keeper:
            return None
        pos = int(t.column("position")[i].as_py())
        return pos, self.groups.slice(pos, pos + 1).to_pylist()[0]

    def members_of(self, group: dict[str, Any], offset: int = 0, count: int = 1000) -> list[dict[str, Any]]:
        first, n = int(group["first_member"]), int(group["members"])
        offset = max(0, min(offset, n))
        return self.members.slice(first + offset, first + min(n, offset + count)).to_pylist()


def summary(output: str | Path) -> str:
    """Write (or keep, when up to date) ``output``'s duplicate-groups table; one line saying what it holds
    (``curate index`` prints it).  An output on object storage is left alone."""
    from curate.io.remote import is_uri

    if is_uri(str(output)):
        return "duplicate groups: not written for an output on object storage"
    m = write_duplicate_groups(output)
    return (f"duplicate groups: {m['groups']} groups, {m['members']} rejected copies -> "
            f"{table_dir(Path(output).expanduser().resolve())}")


def write_after_run(output: Any) -> None:
    """The run's last step: write the table when the run deduplicated (its rows have ``duplicate_of``); never
    fails the finished run (a problem is logged; ``curate serve`` writes the table on first use instead)."""
    from curate.io.remote import is_uri

    if not isinstance(output, (str, Path)) or is_uri(str(output)):
        return
    try:
        layout = Layout(Path(output))
        files = parquet_files(layout.rejected) or parquet_files(layout.data)
        if not files or S.DUPLICATE_OF not in pq.read_schema(files[0]).names:
            return
        write_duplicate_groups(layout.root)
    except Exception:  # a finished run stays finished
        log.exception("could not write the duplicate-groups table of %s", output)
