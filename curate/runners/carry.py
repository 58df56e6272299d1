"""Carry a shard's column group of a redone segment forward unchanged, instead of reading, running and writing it.

An append, a retry or a changed stage redoes segments: each writes a new *generation* of every shard's
column group (:mod:`curate.runners.flow`) and takes from the old one what its stages computed (the row
cache).  Most shards of a grown corpus come out of that exactly as they were: the same rows enter the
segment, its global stage (fitted again over all rows) decides on each of them as before, and every map
stage's result for them is in the cache.  Their new group is the old one, so it is *carried*: its part
files are linked under the new generation's names and the next fit's view, the done marker and the
certificate are written -- the rows are never assembled, no stage runs and no image byte is copied.
In the last segment the shard's ``data/`` and ``rejected/`` files stay as they are when, in addition,
they were made from the very column groups the shard has now (carried groups keep the content name of
the group they carry, :func:`curate.runners.common.content_id`).

What is checked, per shard and segment, before anything is carried:

* the older generation's group is whole: its certificate (:func:`curate.runners.flow.cert_path`) exists
  and counts the rows now entering the segment;
* the segment has the same stages, each making the same columns, and every map stage the same row
  fingerprint (its cached result is the one it would compute);
* the same positions enter the segment, and none of its rows was rejected with an error type that
  ``--retry-failed`` fetches again;
* the global stage at its head, applied to the rows its fit read (the fit view), rejects the same rows
  for the same reasons and gives the same values of the columns it makes;
* last segment only: no stage of it annotates rejected rows, the output settings are those the files
  were written with, ``data/`` and ``rejected/`` hold the very files the older generation wrote (size,
  time, inode or ETag), and those were made from the groups of the earlier segments the shard has now.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.io import fs
from curate.io.files import write_json_atomic
from curate.io.views import first_per_position, read_view_columns
from curate.runners.common import SegmentJob, built_from
from curate.runners.flow import (CACHE_META, POS, all_group_files, cert_path, group_certs, live,
                                 part_gen, prune_old, read_base, read_group, remove_group, view_path, view_sources,
                                 write_view)
from curate.stage import GlobalStage
from curate.table_ops import prepare_for_stages

log = logging.getLogger(__name__)

_REJECT = [S.REJECT_STAGE, S.REJECT_REASON, S.REJECT_DETAIL, S.ERROR_TYPE]


def can_carry(job: SegmentJob) -> bool:
    """Whether any shard of the segment may be carried: it is redone (an older generation exists), it has a
    row cache, and it is not a last segment with a stage that annotates rejected rows (their annotation
    is never cached)."""
    annotates = any(st.applies_to == "all" for st in job.segment.stages)
    return job.layout.gen(job.segment.index) > 0 and job.cache is not None and not (job.final and annotates)


def carry_task(args: tuple[SegmentJob, GlobalStage | None, list[str]]) -> list[dict[str, Any]]:
    """One item of a runner's ``map``: carry what can be carried of a chunk of shards (each in ``job.inputs``;
    :func:`can_carry` holds); returns the done-marker infos of the shards carried."""
    job, head, shards = args
    return [info for shard in shards if (info := _carry(job, head, shard)) is not None]


def _entering_positions(job: SegmentJob, shard: str) -> np.ndarray:
    k = job.segment.index
    if k == 0:
        base = fs.read_table(job.inputs[shard], columns=[S.REJECT_REASON])
        return np.flatnonzero(pc.is_null(base[S.REJECT_REASON]).to_numpy(zero_copy_only=False)).astype(np.int64)
    g = read_group(job.layout, k - 1, shard, [S.REJECT_REASON])
    return np.array([], np.int64) if g is None else live(g)[POS].to_numpy().astype(np.int64)


def _same_stages(job: SegmentJob, head: GlobalStage | None, schema: pa.Schema) -> bool:
    """Whether a part of the old group (its ``schema``) was made by the segment's stages as they are now."""
    raw = (schema.metadata or {}).get(CACHE_META.encode())
    if not raw:
        return False  # written before the row cache
    meta, cache = json.loads(raw), job.cache
    if meta["order"] != cache.order or meta["produces"] != cache.produces:
        return False
    hid = head.id if head is not None else None
    return all(sid == hid or (cache.fps.get(sid) is not None and meta["fps"].get(sid) == cache.fps[sid])
               for sid in cache.order)


def _retried(job: SegmentJob, old: pa.Table) -> bool:
    """A row of the old group was rejected with an error type ``--retry-failed`` fetches again."""
    return any(job.cache.retried(sid, e)
               for sid, e in zip(old[S.REJECT_STAGE].to_pylist(), old[S.ERROR_TYPE].to_pylist()) if sid is not None)


def _strings(t: pa.Table, c: str) -> pa.Array:
    """Column ``c`` of ``t`` as strings (all null where the table has no such column)."""
    if c not in t.column_names:
        return pa.nulls(t.num_rows, pa.string())
    return t[c].combine_chunks().cast(pa.string())


def _other_decisions(job: SegmentJob, head: GlobalStage, shard: str, old: pa.Table) -> str | None:
    """How the head, fitted in this run, decides otherwise on the rows entering the segment than the old
    generation did (None: it decides alike)."""
    k = job.segment.index
    if k == 0:
        rows = live(read_base(job.inputs[shard]))
    else:  # the columns the head reads (not every column its fit was given)
        wanted = [S.UID, S.SHARD, S.SOURCE_FILE, S.SOURCE_ROW, S.REJECT_REASON, *head.needs]
        rows = read_view_columns(view_path(job.layout, k, shard), wanted)
    new = head.run_batch(prepare_for_stages(rows)).sort_by(POS)  # a view holds reject_reason, not the others
    if not np.array_equal(new[POS].to_numpy(), old[POS].to_numpy()):
        return "its fit view holds other rows"
    mine_new = pc.fill_null(pc.equal(_strings(new, S.REJECT_STAGE), head.id), False)
    mine_old = pc.fill_null(pc.equal(_strings(old, S.REJECT_STAGE), head.id), False)
    if not mine_new.equals(mine_old):
        return f"{head.id} rejects other rows"
    if pc.any(mine_new).as_py():
        for c in (S.REJECT_REASON, S.REJECT_DETAIL):
            if not _strings(new, c).filter(mine_new).equals(_strings(old, c).filter(mine_old)):
                return f"{head.id} gives another {c}"
    for f in head.output_fields():
        if f.name not in old.column_names or f.name not in new.column_names or \
                not new[f.name].cast(f.type).combine_chunks().equals(old[f.name].cast(f.type).combine_chunks()):
            return f"{head.id} gives other {f.name} values"
    return None


def _carry(job: SegmentJob, head: GlobalStage | None, shard: str) -> dict | None:
    layout, k = job.layout, job.segment.index
    g = layout.gen(k)
    certs = {o: f for o, f in group_certs(layout, k, shard).items() if o < g}
    why, after, parts, cert, o = None, None, [], {}, -1
    if not certs:
        why = "no older generation has it whole"
    else:
        o = max(certs)
        cert = fs.read_json(certs[o])
        parts = [f for f in all_group_files(layout, k, shard) if part_gen(f.name) == o]
        why, after = _why_not(job, head, shard, cert, parts)
    if why is not None:
        log.debug("segment %d, shard %s: not carried: %s", k, shard, why)
        return None
    # carry: this generation's leftovers of an interrupted attempt go, the old parts are linked under its names
    remove_group(layout, k, shard)
    for f in parts:
        fs.copy(f, layout.segment_out(k) / f.name.replace(f"~g{o}~", f"~g{g}~", 1))
    info: dict[str, Any] = {"shard": shard, "run": job.run_id, "computed": {}, "seconds": {}, "rows": cert["rows"],
                            "live": cert["live"], "content": cert["content"], "carried": True}
    if job.final:
        info.update({key: cert[key] for key in ("output", "stats", "built_from", "files")})
    elif job.view_columns is not None:
        base = job.inputs[shard]
        write_view(layout, k + 1, shard, pa.array(after, pa.int64()), base, job.view_columns, job.schema,
                   job.compression, view_sources(layout, k + 1, shard, base, job.view_columns))
    write_json_atomic(info, job.done_marker(shard))
    write_json_atomic(info, cert_path(layout, k, shard, g))
    prune_old(layout, k, shard)
    return info


def _why_not(job: SegmentJob, head: GlobalStage | None, shard: str, cert: dict,
             parts: list[Any]) -> tuple[str | None, np.ndarray | None]:
    """Why the older generation's group (``cert``, ``parts``) is not what the segment would make of the shard
    now (None: it is), and the positions live after it."""
    layout = job.layout
    if cert.get("rows") != job.expected_rows.get(shard) or not cert.get("content"):
        return "another number of rows enters it", None
    if job.final:
        if cert.get("output") != job.output_settings() or "stats" not in cert:
            return "data/ and rejected/ were written with another schema or other output settings", None
        if None in cert.get("built_from", [None]) or built_from(job, shard) != cert["built_from"]:
            return "an earlier segment's column group changed", None
        if cert.get("files") != [fs.identity(layout.data / f"{shard}.parquet"),
                                 fs.identity(layout.rejected / f"{shard}.parquet")]:
            return "data/ or rejected/ is not the file it wrote", None
    entering = _entering_positions(job, shard)  # compared with the old group's positions below
    if not parts:
        return (None, entering) if not len(entering) else ("its parts are gone", None)
    made = [f.name for f in head.output_fields()] if head is not None else []
    cols = list(dict.fromkeys([POS, *_REJECT, *made]))
    first = fs.read_table(parts[0], columns=cols, only_present=True)
    if not _same_stages(job, head, first.schema):  # before the other parts are read
        return "its stages or their parameters changed", None
    old = first_per_position(pa.concat_tables(
        [first, *(fs.read_table(f, columns=cols, only_present=True) for f in parts[1:])],
        promote_options="permissive").sort_by(POS))
    for c in _REJECT:
        if c not in old.column_names:
            old = old.append_column(c, pa.nulls(old.num_rows, pa.string()))
    if not np.array_equal(old[POS].to_numpy(), entering):
        return "other rows enter it", None
    if _retried(job, old):
        return "rows of it are fetched again (--retry-failed)", None
    if head is not None and len(entering):
        other = _other_decisions(job, head, shard, old)
        if other is not None:
            return other, None
    return None, live(old)[POS].to_numpy()
