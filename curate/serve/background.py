"""The background thread of ``curate serve``: the jobs pages ask for, and the counts of filtered views.

A page that needs a table written (a sort index, the duplicate-groups table, the facets of a large view, the
:class:`curate.serve.pages.Selection` of a filter) asks for it as a job (:meth:`BackgroundJobs._job`) and waits
a little; the one background thread runs jobs first, and otherwise counts the matching rows of the filtered
views pages have opened (one window of files at a time, pausing while a request is being answered).
"""

from __future__ import annotations

import logging
import threading
import time

from curate.io.files import InputError
from curate.serve.filters import VIEWS

log = logging.getLogger("curate.serve.data")  # the name its messages have always carried

JOBS = {"sort": "writing the sort index", "dups": "writing the duplicate-groups table", "facets": "counting rows by reason",
        "selection": "ordering the filtered rows"}


class BackgroundJobs:
    """Background work (a part of :class:`curate.serve.data.Explorer`, whose ``__init__`` makes the state it uses: its
    catalogs, matchers, lock, job queue, wake-up event and background connection)."""

    def _background(self) -> None:
        """Read the footers, then do what pages ask for: write the duplicate-groups table or a sort index, count
        the rows of filtered views (one window of files at a time, pausing while a request is being answered)."""
        try:
            for v in VIEWS:
                self.catalogs[v].snapshot()
        except Exception:  # the requests will say what is wrong
            log.exception("serve: background start")
        while not self._closed:
            try:
                did = self._background_step()
            except Exception:  # one failed job must not stop the others
                log.exception("serve: background job failed")
                did = True
            if not did:
                self._wake.wait(1.0)
                self._wake.clear()

    def _background_step(self) -> bool:
        """One job a request asked for (at once), else one window of a count (once no request is running)."""
        with self._lock:
            job = next(iter(self._jobs.items()), None)
        if job is not None:
            key, (fn, done) = job
            try:
                fn()
            except Exception as e:  # the request waiting for it says why, in one line
                log.exception("serve: background job %s failed", key[0])
                with self._lock:
                    self._failed[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            finally:
                with self._lock:
                    self._jobs.pop(key, None)
                done.set()
            return True
        pending = self.matchers.pending()
        if pending:
            while self._busy > 0 and not self._closed and not self._jobs:
                time.sleep(0.02)
            if self._jobs:
                return True
        for m in pending[:1]:
            try:
                m.scan(self._bg_con.cursor, m.window_from(m.frontier, 1), count_only=m.nbytes > (128 << 20))
            except Exception as e:  # noqa: BLE001 - duckdb.Error of the user's condition
                from curate.sql_guard import one_line

                m.error = one_line(e)
            return True
        return False

    def _job(self, key: tuple, fn, wait: float) -> bool:
        """Run ``fn`` in the background thread (or now, without one); wait up to ``wait`` s: True if done.
        A job that failed raises InputError here (once; the next request tries again)."""
        if self._thread is None:
            fn()
            return True
        with self._lock:
            failed = self._failed.pop(key, None)
        if failed:
            raise InputError(f"{JOBS.get(key[0], key[0])} failed: {failed}")
        with self._lock:
            got = self._jobs.get(key)
            if got is None:
                got = (fn, threading.Event())
                self._jobs[key] = got
        self._wake.set()
        done = got[1].wait(wait) if wait > 0 else got[1].is_set()
        with self._lock:
            failed = self._failed.pop(key, None) if done else None
        if failed:
            raise InputError(f"{JOBS.get(key[0], key[0])} failed: {failed}")
        return done
