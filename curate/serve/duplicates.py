"""The duplicate-groups pages of ``curate serve``, from the groups table (curate.dup_groups).

The table is ``OUT/duplicate_groups`` when up to date for the current files, else written once (there, or in a
folder of the server's own when the output is read-only) in the background; each page then reads one or two
of its row groups, and the cards of the rows it names by position.
"""

from __future__ import annotations

from curate.io.files import InputError
from curate.serve.connection import BUILD_MEMORY


class DuplicatePages:
    """Duplicate groups (a part of :class:`curate.serve.data.Explorer`, whose ``__init__`` makes the state it uses: its
    snapshots, the table of the current files, writable folders and background jobs)."""

    def _dup_fingerprint(self) -> str:
        from curate.dup_groups import fingerprint_of

        entries = [(label, f.name, f.size) for label, view in (("data", "kept"), ("rejected", "rejected"))
                   for f in self.snapshot(view).files]
        return fingerprint_of(entries)

    def duplicate_table(self, wait: float = 3.0):
        """The duplicate-groups table (curate.dup_groups) of the current files: ``OUT/duplicate_groups`` when up
        to date, else written once (there, or in a folder of this process's own when the output is read-only),
        in the background, waiting up to ``wait`` s; None while it is being written."""
        from curate.dup_groups import DuplicateGroups, is_current, table_dir, write_duplicate_groups

        fp = self._dup_fingerprint()
        with self._lock:
            if self._dups is not None and self._dups[0] == fp:
                return self._dups[1]
        for folder in (table_dir(self.layout.root), self._writable_dir("duplicate_groups")):
            if is_current(folder, fp):
                t = DuplicateGroups(folder)
                with self._lock:
                    self._dups = (fp, t)
                return t
        dest = self._writable_dir("duplicate_groups")

        def build() -> None:
            if not is_current(dest, fp):
                write_duplicate_groups(self.layout.root, dest, threads=1 if self._thread is not None else None,
                                       memory_limit=BUILD_MEMORY)

        if not self._job(("dups", fp), build, wait):
            return None
        if not is_current(dest, fp):  # the files changed while it was written
            return None
        t = DuplicateGroups(dest)
        with self._lock:
            self._dups = (fp, t)
        return t

    def duplicate_groups(self, page: int, per: int) -> tuple[list[tuple], int]:
        """(kept uid, kinds, copies) of one page of groups (largest first), and the number of groups."""
        t = self.duplicate_table()
        if t is None:
            return [], -1
        return [(g["keeper"], g["kinds"], g["members"]) for g in t.page(page * per, per)], t.total

    def duplicate_group_page(self, uid: str, offset: int = 0, count: int = 1000):
        """(group, [the kept row's card], cards of its copies [offset, offset+count)) of the group whose kept row
        is ``uid``; None: no such group.  Each copy's card carries ``distance``, ``dup_kind``, ``dup_detail``."""
        t = self.duplicate_table()
        if t is None:
            raise InputError("the duplicate-groups table is being written; try again in a moment")
        found = t.find(uid)
        if found is None:
            return None
        _, g = found
        keeper = self.rows_at(g["keeper_view"], [(g["keeper_file"], g["keeper_row"])]) if g["keeper_view"] else []
        members = t.members_of(g, offset, count)
        cards = {(r["_file"], r["_row"]): r for r in self.rows_at("rejected", [(m["file"], m["row"]) for m in members])}
        out = []
        for m in members:
            card = dict(cards.get((m["file"], m["row"])) or {"uid": m["uid"], "view": "rejected", "_file": m["file"],
                                                                   "_row": m["row"]})
            card.update(distance=m["distance"], dup_detail=m["detail"], dup_kind=m["kind"])
            out.append(card)
        return g, keeper, out

    def duplicate_group(self, uid: str) -> tuple[list[dict], list[dict]]:
        """(the kept row, its copies) of the group of ``uid`` (up to 1,000 copies); empty lists: no such group."""
        got = self.duplicate_group_page(uid, 0, 1000)
        return ([], []) if got is None else (got[1], got[2])

    def duplicate_gallery(self, page: int, per: int, shown: int) -> tuple[list[dict], int] | None:
        """One page of groups, each with its kept row's card and its first ``shown`` copies (from the table:
        uid, kind, stage, reason, detail, distance, where stored); None while the table is being written."""
        t = self.duplicate_table(wait=2.0)
        if t is None:
            return None
        groups = t.page(page * per, per)
        keepers: dict[str, list] = {}
        for g in groups:
            if g["keeper_view"]:
                keepers.setdefault(g["keeper_view"], []).append((g["keeper_file"], g["keeper_row"]))
        cards = {}
        for view, pos in keepers.items():
            for r in self.rows_at(view, pos):
                cards[r["uid"]] = r
        for g in groups:
            g["keeper_card"] = cards.get(g["keeper"])
            g["copies"] = t.members_of(g, 0, shown)
        return groups, t.total
