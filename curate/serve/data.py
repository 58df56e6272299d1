"""What the web app reads: pages of rows, facets, duplicate groups, thumbnails, SQL, subsets.

One read-only DuckDB database per app (curate.sql_guard): the views ``kept``, ``rejected``,
``samples`` plus ``kept_pos`` / ``rejected_pos`` (the same rows with ``_file`` and ``_row``, where
a thumbnail is read from), created before the lock.  Each request uses its own cursor.  Pages are
LIMIT/OFFSET over the files in storage order (never a whole table in memory); filters are bound
parameters, column names are checked against the view's columns.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate import schema as S
from curate.io.files import InputError
from curate.io.sql import sql_string
from curate.layout import Layout
from curate.query import parquet_files
from curate.row_reader import RowReader

log = logging.getLogger(__name__)

VIEWS = ("kept", "rejected")
PAGE_MAX = 200
SQL_MAX_ROWS = 200
SQL_TIMEOUT = 30.0
NUMERIC = ("FLOAT", "DOUBLE", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "UINTEGER", "UBIGINT", "DECIMAL")
CARD_COLUMNS = (S.UID, S.CAPTION, S.URL, S.CLIP_SCORE, S.CAPTION_PERPLEXITY, S.WIDTH, S.HEIGHT, S.REJECT_REASON,
                S.REJECT_STAGE, S.REJECT_DETAIL, S.DUPLICATE_OF, S.DUPLICATE_KIND, S.LANGUAGE, S.RECAPTION)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass
class Filter:
    """The filters of a rows page; ``where()`` renders them as SQL (values bound or quoted)."""
    reason: str = ""
    stage: str = ""
    metric: str = ""
    lo: float | None = None
    hi: float | None = None
    where: str = ""
    columns: list[str] = field(default_factory=list)

    def parts(self) -> tuple[list[str], dict[str, Any]]:
        sql, params = [], {}
        if self.reason:
            sql.append(f"{S.REJECT_REASON} = $reason")
            params["reason"] = self.reason
        if self.stage:
            sql.append(f"{S.REJECT_STAGE} = $stage")
            params["stage"] = self.stage
        if self.metric and (self.lo is not None or self.hi is not None):
            if self.metric not in self.columns:
                raise InputError(f"no numeric column {self.metric[:80]!r}")
            if self.lo is not None:
                sql.append(f'"{self.metric}" >= $lo')
                params["lo"] = float(self.lo)
            if self.hi is not None:
                sql.append(f'"{self.metric}" <= $hi')
                params["hi"] = float(self.hi)
        if self.where.strip():
            sql.append(f"({self.where})")
        return sql, params

    def literal(self) -> str:
        """The same condition with literal values (for refilter/export, which take an SQL string)."""
        sql, params = self.parts()
        text = " AND ".join(sql) or "true"
        for k, v in params.items():
            text = text.replace(f"${k}", repr(float(v)) if isinstance(v, float) else sql_string(v))
        return text


class Explorer:
    def __init__(self, output: str | Path, subsets_dir: str | Path | None = None) -> None:
        from curate.query import connect, scan_sql
        from curate.sql_guard import lock_down

        self.layout = Layout(Path(output).expanduser().resolve())
        self.subsets = Path(subsets_dir).expanduser().resolve() if subsets_dir else self.layout.root / "subsets"
        con = connect(self.layout.root)
        for view in VIEWS:
            src = scan_sql(self.layout, view)
            if src:
                src = src[:-1] + ", filename = '_file', file_row_number = true)"
                con.execute(f"CREATE VIEW {view}_pos AS SELECT * EXCLUDE (file_row_number), "
                            f"file_row_number AS _row FROM {src}")
            else:
                con.execute(f"CREATE VIEW {view}_pos AS SELECT *, NULL::VARCHAR AS _file, NULL::BIGINT AS _row "
                            f"FROM {view} LIMIT 0")
        lock_down(con, [self.layout.data, self.layout.rejected])
        self.con = con
        rel = con.sql("SELECT * FROM samples LIMIT 0")
        self.columns = list(rel.columns)
        self.numeric = [c for c, t in zip(rel.columns, rel.types) if str(t).split("(")[0] in NUMERIC
                        and not S.is_internal(c) and c not in (S.SOURCE_ROW,)]
        from curate.index import view_dir

        self._readers = {v: RowReader(view_dir(self.layout, v)) for v in VIEWS}
        # the files the views above were made of (a thumbnail names one of them; listed once, not per request)
        self._files = {v: {f.name for f in parquet_files(view_dir(self.layout, v))} for v in VIEWS}
        self._images: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._searcher = None

    def cursor(self):
        return self.con.cursor()

    # -- rows -----------------------------------------------------------------------------------
    def filter(self, **kw: Any) -> Filter:
        return Filter(columns=self.numeric, **kw)

    def page(self, view: str, flt: Filter, page: int, per: int, order: str = "") -> tuple[list[dict], int]:
        """(rows of one page as dicts, total matching rows)."""
        from curate.sql_guard import SqlRefused, check_condition, one_line

        if view not in VIEWS:
            raise InputError(f"no view {view[:40]!r}")
        per, page = max(1, min(int(per), PAGE_MAX)), max(0, int(page))
        cur = self.cursor()
        try:
            if flt.where.strip():
                check_condition(cur, flt.where)
            parts, params = flt.parts()
            where = (" WHERE " + " AND ".join(parts)) if parts else ""
            order_sql = ""
            if order:
                col, _, direction = order.partition(":")
                if col not in self.numeric:
                    raise InputError(f"cannot order by {col[:80]!r}")
                order_sql = f' ORDER BY "{col}" {"ASC" if direction == "asc" else "DESC"} NULLS LAST'
            cols = ", ".join(f'"{c}"' for c in CARD_COLUMNS if c in self.columns)
            total = cur.execute(f"SELECT count(*) FROM {view}{where}", params).fetchone()[0]
            rel = cur.execute(f"SELECT {cols}, _file, _row FROM {view}_pos{where}{order_sql} LIMIT {per} "
                              f"OFFSET {page * per}", params)
            names = [d[0] for d in rel.description]
            rows = [dict(zip(names, r)) for r in rel.fetchall()]
        except SqlRefused:
            raise
        except Exception as e:  # duckdb.Error: a user's condition
            raise SqlRefused(one_line(e)) from None
        finally:
            cur.close()
        for r in rows:
            r["view"], r["_file"] = view, os.path.basename(r["_file"] or "")
        return rows, int(total)

    def facets(self, view: str) -> dict[str, list[tuple[str, int]]]:
        cur = self.cursor()
        try:
            out = {}
            for col in (S.REJECT_REASON, S.REJECT_STAGE):
                out[col] = [(str(v), n) for v, n in cur.execute(
                    f"SELECT {col}, count(*) FROM {view} WHERE {col} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 "
                    "LIMIT 200").fetchall()]
            return out
        finally:
            cur.close()

    def rows_by_uid(self, uids: list[str], view: str = "samples") -> list[dict]:
        cur = self.cursor()
        try:
            cols = ", ".join(f'"{c}"' for c in CARD_COLUMNS if c in self.columns)
            out = []
            for v in VIEWS if view == "samples" else (view,):
                rel = cur.execute(f"SELECT {cols}, _file, _row FROM {v}_pos WHERE uid IN (SELECT unnest($u)) "
                                  "LIMIT 1000", {"u": list(uids)})
                names = [d[0] for d in rel.description]
                out += [dict(zip(names, r), view=v) for r in rel.fetchall()]
            for r in out:
                r["_file"] = os.path.basename(r["_file"] or "")
            return out
        finally:
            cur.close()

    # -- duplicates -----------------------------------------------------------------------------
    def duplicate_groups(self, page: int, per: int) -> tuple[list[tuple], int]:
        if S.DUPLICATE_OF not in self.columns:
            return [], 0
        cur = self.cursor()
        try:
            base = f"FROM rejected WHERE {S.DUPLICATE_OF} IS NOT NULL"
            total = cur.execute(f"SELECT count(DISTINCT {S.DUPLICATE_OF}) {base}").fetchone()[0]
            kinds = f"string_agg(DISTINCT {S.DUPLICATE_KIND}, ', ')"
            rows = cur.execute(f"SELECT {S.DUPLICATE_OF}, {kinds}, count(*) {base} "
                               f"GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT $per OFFSET $off",
                               {"per": per, "off": page * per}).fetchall()
            return rows, int(total)
        finally:
            cur.close()

    def duplicate_group(self, uid: str) -> tuple[list[dict], list[dict]]:
        cur = self.cursor()
        try:
            members = [r[0] for r in cur.execute(f"SELECT uid FROM rejected WHERE {S.DUPLICATE_OF} = $u LIMIT 1000",
                                                 {"u": uid}).fetchall()] if S.DUPLICATE_OF in self.columns else []
        finally:
            cur.close()
        return self.rows_by_uid([uid]), self.rows_by_uid(members, "rejected") if members else []

    # -- thumbnails -----------------------------------------------------------------------------
    def image_bytes(self, view: str, file: str, row: int) -> bytes | None:
        """The stored image of one row; the image column of the last few row groups read is cached."""
        if view not in VIEWS:
            raise InputError("bad view")
        if file not in self._files[view]:
            raise InputError("no such file")
        reader = self._readers[view]
        try:
            (g,), (i,) = reader.locate(file, [row])
        except InputError:
            raise InputError("no such row") from None
        if S.IMAGE not in reader.columns(file):
            raise InputError("no such row")
        key = (view, file, int(g))
        with self._lock:
            col = self._images.get(key)
            if col is not None:
                self._images.move_to_end(key)
        if col is None:
            col = reader.row_group(file, int(g), [S.IMAGE]).column(0)
            with self._lock:
                self._images[key] = col
                while len(self._images) > 4:
                    self._images.popitem(last=False)
        return col[int(i)].as_py()

    # -- search and subsets ---------------------------------------------------------------------
    def searcher(self):
        from curate.index import meta_path
        from curate.search import Searcher

        with self._lock:
            if self._searcher is None:
                if not meta_path(self.layout.root).exists():
                    raise InputError(f"no index: run `curate index {self.layout.root}` first")
                self._searcher = Searcher(self.layout.root)
            return self._searcher

    def save_subset(self, name: str, kind: str, condition: str) -> dict[str, Any]:
        """Write a subset of the kept rows satisfying ``condition`` (checked read-only first)."""
        from curate.export import export_datacomp_uids
        from curate.sql_guard import check_condition, one_line
        from curate.subset import refilter

        if not NAME_RE.fullmatch(name or "") or ".." in name:
            raise InputError("subset name: letters, digits, '_', '-', '.' (up to 100)")
        cur = self.cursor()
        try:
            check_condition(cur, condition)
            n = cur.execute(f"SELECT count(*) FROM kept WHERE ({condition})").fetchone()[0]
        except InputError:
            raise
        except Exception as e:  # duckdb.Error
            raise InputError(f"subset: {one_line(e)}") from None
        finally:
            cur.close()
        self.subsets.mkdir(parents=True, exist_ok=True)
        if kind == "output":
            dest = self.subsets / name
            if dest.exists():
                raise FileExistsError(f"subset {name} exists")
            res = refilter(self.layout.root, dest, condition, reason="not_in_subset", readonly_sql=True)
            return {"kind": kind, "path": str(dest), "rows": res["kept_after"], "of": res["kept_before"]}
        if kind == "datacomp-uids":
            dest = self.subsets / (name if name.endswith(".npy") else name + ".npy")
            if dest.exists():
                raise FileExistsError(f"subset {dest.name} exists")
            try:  # DataComp's uids are 32 hex digits; other uids are hashed (md5), as `export --hash-uids`
                info = export_datacomp_uids(self.layout.root, dest, where=f"({condition})")
            except InputError:
                info = export_datacomp_uids(self.layout.root, dest, where=f"({condition})", hash_uids=True)
            return {"kind": kind, "path": info["path"], "rows": info["uids"], "of": n}
        raise InputError("subset kind: output or datacomp-uids")
