"""Subsets and searches of ``curate serve``: a named subset of the kept rows written from an SQL condition
(an output or a DataComp uid list), and the text / image searcher of the output's index.
"""

from __future__ import annotations

import re
from typing import Any

from curate.io.files import InputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class Subsets:
    """Searches and subsets (a part of :class:`curate.serve.data.Explorer`, whose ``__init__`` makes the state it uses:
    its views connection, subsets folder and lock)."""

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
