"""Rows per reject reason and reject stage of a view (the facets beside a rows page of ``curate serve``).

From ``stats.json`` when it agrees with the files' row counts, else counted once per state of the files (in
the background for a large view).
"""

from __future__ import annotations

from curate import schema as S


class Facets:
    """Facet counts (a part of :class:`curate.serve.data.Explorer`, whose ``__init__`` makes the state it uses: its
    facet cache, snapshots and connections)."""

    def facets(self, view: str, wait: bool = True) -> dict[str, list[tuple[str, int]]]:
        """Rows per reject_reason and reject_stage: from stats.json when it agrees with the files' row counts,
        else counted once per state of the files (in the background for a large view)."""
        snap = self.snapshot(view)
        fp = snap.fingerprint
        with self._lock:
            got = self._facets.get(view)
        if got is not None and got[0] == fp:
            return got[1]
        out = self._facets_from_stats(view, snap)
        if out is None:
            from curate.serve.catalog import source_sql

            def count() -> None:
                cur = self._bg_con.cursor() if self._thread is not None else self.page_cursor()
                res: dict[str, list[tuple[str, int]]] = {S.REJECT_REASON: [], S.REJECT_STAGE: []}
                try:
                    for col in res:
                        have = [i for i in range(len(snap.files)) if snap.has_column(i, col)]
                        if not have:
                            continue
                        src = source_sql(snap, have)
                        res[col] = [(str(v), n) for v, n in cur.execute(
                            f"SELECT {col}, count(*) FROM {src} WHERE {col} IS NOT NULL GROUP BY 1 "
                            "ORDER BY 2 DESC, 1 LIMIT 200").fetchall()]
                finally:
                    cur.close()
                with self._lock:
                    self._facets[view] = (fp, res)

            if snap.total <= 200_000 or self._thread is None:
                count()
            else:
                self._job(("facets", view, fp), count, 0.0)
            with self._lock:
                got = self._facets.get(view)
            return got[1] if got is not None and got[0] == fp else {S.REJECT_REASON: [], S.REJECT_STAGE: []}
        with self._lock:
            self._facets[view] = (fp, out)
        return out

    def _facets_from_stats(self, view: str, snap) -> dict[str, list[tuple[str, int]]] | None:
        import json

        try:
            stats = json.loads(self.layout.stats.read_text())
            run = stats["run"]
            kept, rejected = int(run["kept"]), int(run["rejected"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if kept != self.total("kept") or rejected != self.total("rejected"):
            return None
        if view == "kept":
            return {S.REJECT_REASON: [], S.REJECT_STAGE: []}
        reasons = {str(k): int(v) for k, v in (run.get("rejected_by_reason") or {}).items() if v}
        stages: dict[str, int] = {}
        for st in stats.get("stages") or []:
            n = sum(int(v) for v in (st.get("rejected") or {}).values())
            if n:
                stages[str(st.get("id"))] = stages.get(str(st.get("id")), 0) + n
        if sum(reasons.values()) != rejected or sum(stages.values()) != rejected:
            return None

        def order(d: dict[str, int]) -> list[tuple[str, int]]:
            return sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:200]

        return {S.REJECT_REASON: order(reasons), S.REJECT_STAGE: order(stages)}
