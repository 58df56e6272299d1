"""What both runners share: segments, running a stage in batches, finishing a shard.

Only live rows flow between segments (see :mod:`curate.runners.flow`): a segment reads the
rows still live at its start and writes, per shard, the columns it produced; a rejected row
is written once and left behind.  The last segment writes ``data/`` and ``rejected/``.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.io import fs
from curate.io.files import ROW_GROUP_BYTES, ROW_GROUP_ROWS, write_json_atomic, write_parquet_atomic
from curate.layout import Layout
from curate.runners.flow import (POS, RowCache, ShardRows, attach_cache, cert_path, group_columns, live, prune_old,
                                 read_group, view_sources, write_group, write_view)
from curate.stage import COMPUTED, GlobalStage, Stage, annotate_rejected
from curate.stats import funnel


@dataclass
class Segment:
    """Map stages that run shard by shard; ``head`` is the global stage that opens it (if any)."""

    index: int
    head: GlobalStage | None
    maps: list[Stage] = field(default_factory=list)

    @property
    def stages(self) -> list[Stage]:
        return ([self.head] if self.head else []) + self.maps

    @property
    def produces(self) -> list[str]:
        """Columns the segment's stages write (stored in its column group)."""
        return list(dict.fromkeys(f.name for st in self.stages for f in st.output_fields()))


def split_segments(stages: list[Stage]) -> list[Segment]:
    segments: list[Segment] = []
    for st in stages:
        if st.needs_fit or not segments:
            segments.append(Segment(len(segments), st if st.needs_fit else None))
            if st.needs_fit:
                continue
        segments[-1].maps.append(st)
    return segments


@dataclass
class SegmentJob:
    """One segment over the shards still to do."""

    segment: Segment
    inputs: dict[str, str]  # shard id -> its ingest file (the base every segment reads from)
    expected_rows: dict[str, int]  # shard id -> rows entering the segment (live at its start)
    final: bool
    layout: Layout
    schema: pa.Schema  # output schema (final)
    stage_ids: list[str]  # every stage id of the pipeline, in order (for stats)
    compression: str = "zstd"
    view_columns: list[str] | None = None  # columns of the next segment's fit view (None: no view)
    row_group_rows: int = ROW_GROUP_ROWS  # bounds of the row groups of data/ and rejected/ (output.row_group_*)
    row_group_bytes: int = ROW_GROUP_BYTES
    cache: RowCache | None = None  # the segment's row cache (its stages' row fingerprints, what to retry)
    run_id: str = ""  # the run that does the segment (its done markers say which run computed how many rows)

    @property
    def produces(self) -> list[str]:
        """The columns of the segment's column group (also for the light job, which has no stage objects)."""
        if self.cache is not None:
            return list(dict.fromkeys(c for sid in self.cache.order for c in self.cache.produces.get(sid, [])))
        return self.segment.produces

    def output_settings(self) -> list:
        """How the last segment writes data/ and rejected/ (a carried shard's files must have been written so):
        the output schema (an appended file may bring a column every shard then has) and the file settings."""
        import hashlib

        schema = hashlib.sha256(self.schema.remove_metadata().serialize().to_pybytes()).hexdigest()[:16]
        return [schema, self.compression, self.row_group_rows, self.row_group_bytes]

    def done_marker(self, shard: str) -> Path:
        return self.layout.done(f"seg-{self.segment.index}") / f"{shard}.json"

    def rows(self, shard: str) -> ShardRows:
        return ShardRows(self.layout, shard, self.inputs[shard])

    def light(self) -> "SegmentJob":
        """This job without stage objects (cheap to send to a Ray task), but for the last segment's stages
        that apply to rejected rows too: :func:`finish_shard` runs them on the rows rejected earlier."""
        seg = Segment(self.segment.index, None, [st for st in self.segment.stages if self.final and
                                                 st.applies_to == "all"])
        return SegmentJob(seg, {}, {}, self.final, self.layout, self.schema, self.stage_ids, self.compression,
                          self.view_columns, self.row_group_rows, self.row_group_bytes, self.cache, self.run_id)

    def entering(self, rows: ShardRows) -> pa.Table:
        """The rows entering the segment of one shard, with what the row cache holds for them."""
        k = self.segment.index
        return attach_cache(self.layout, k, rows.shard, rows.entering(k), self.cache)


def run_stage_local(stage: Stage, table: pa.Table, timing: dict[str, float]) -> pa.Table:
    """Run one stage over a table in batches of its batch size (the local runner's scheduling)."""
    bs = stage.resources.batch_size
    t0 = time.perf_counter()
    if table.num_rows <= bs:
        out = stage.run_batch(table)
    else:
        out = pa.concat_tables(
            [stage.run_batch(table.slice(i, bs)) for i in range(0, table.num_rows, bs)],
            promote_options="permissive",
        )
    timing[stage.id] = timing.get(stage.id, 0.0) + time.perf_counter() - t0
    return out


def run_shard(job: SegmentJob, shard: str, stages: list[Stage]) -> int:
    """Segment ``job`` on one shard: read the rows entering it, run ``stages`` (set up), write and finish the
    shard (done marker last).  Returns its row count.  The local runner's loop body, and the Ray runner's task
    for a segment without actor-pool stages."""
    rows = job.rows(shard)
    table = job.entering(rows)
    timing: dict[str, float] = {}
    for st in stages:
        table = run_stage_local(st, table, timing)
    finish_shard(job, shard, table, timing, rows)
    return table.num_rows


def sort_shard(table: pa.Table) -> pa.Table:
    return table.sort_by([(S.SOURCE_ROW, "ascending"), (S.UID, "ascending")])


def shard_stats(table: pa.Table, stage_ids: list[str]) -> dict[str, Any]:
    """Per-stage counts of one finished shard, derived from its rows (see :mod:`curate.stats`)."""
    rej: dict[str, Counter] = defaultdict(Counter)
    err: dict[str, Counter] = defaultdict(Counter)
    if table.num_rows:
        for keys, into in (([S.REJECT_STAGE, S.REJECT_REASON], rej), ([S.REJECT_STAGE, S.ERROR_TYPE], err)):
            g = table.group_by(keys).aggregate([([], "count_all")])
            for st, what, c in zip(g[keys[0]].to_pylist(), g[keys[1]].to_pylist(), g["count_all"].to_pylist()):
                if st is not None and what is not None:
                    into[st][what] += c
    stages = [{k: v for k, v in line.items() if k not in ("stage", "seconds")}  # the marker stays small
              for line in funnel(stage_ids, table.num_rows, rej, err)]
    return {"rows": table.num_rows, "kept": stages[-1]["rows_out"] if stages else table.num_rows, "stages": stages}


def _check(job: SegmentJob, shard: str, n: int) -> None:
    expected = job.expected_rows.get(shard)
    if expected is not None and n != expected:
        raise RuntimeError(f"shard {shard}: {n} rows after segment {job.segment.index}, expected {expected} "
                           f"-- rows were lost or duplicated")


def _annotate(job: SegmentJob, table: pa.Table) -> pa.Table:
    """Rows rejected before the last segment, through its stages that apply to rejected rows too."""
    for st in job.segment.stages:
        if st.applies_to == "all":
            st.ensure_setup()
            table = annotate_rejected(st, table)
    return table


def finish_shard(job: SegmentJob, shard: str, table: pa.Table | None = None,
                 timing: dict[str, float] | None = None, rows: ShardRows | None = None) -> dict:
    """Write what segment ``job`` made of a shard, then its done marker (the resume point).

    ``table``: the segment's output rows with every column (local runner; ``rows`` is the
    ``ShardRows`` it was read through, reused so nothing is read twice).  Without it the
    segment's column group was written in parts (Ray runner) and is read back here.
    """
    k = job.segment.index
    timing = dict(timing or {})
    info: dict[str, Any] = {"shard": shard, "run": job.run_id,
                            "computed": computed_counts(table, timing), "seconds": timing,
                            "content": content_id(job, k)}
    if not job.final:
        if table is not None:
            path = write_group(job.layout, k, shard, table, job.produces, job.compression, job.cache)
            if rows is not None:
                rows.wrote(k, path, group_columns(table, job.produces))
            n, after = table.num_rows, live(table)[POS]
        else:  # the parts are on disk: their positions and reject reasons tell which rows go on
            g = read_group(job.layout, k, shard, [S.REJECT_REASON])
            n, after = (g.num_rows, live(g)[POS]) if g is not None else (0, pa.array([], pa.int64()))
        _check(job, shard, n)
        if job.view_columns is not None:  # the next fit's view: live positions and where their columns are
            base = job.inputs[shard]
            write_view(job.layout, k + 1, shard, after, base, job.view_columns, job.schema, job.compression,
                       view_sources(job.layout, k + 1, shard, base, job.view_columns, rows))
        info.update(rows=n, live=len(after))
    else:
        rows = rows or job.rows(shard)
        out = table if table is not None else rows.rows(rows.live_positions(k), k + 1)
        _check(job, shard, out.num_rows)
        if table is not None and table.num_rows:  # the segment's own columns (small: no image) as a column group
            write_group(job.layout, k, shard, table, job.produces, job.compression, job.cache)  # row cache
        kept = S.conform(sort_shard(live(out)), job.schema)
        gone = [S.conform(_annotate(job, t), job.schema) for t in rows.rejected_before(k)]
        gone.append(S.conform(out.filter(pc.is_valid(out[S.REJECT_REASON])), job.schema))
        rejected = sort_shard(pa.concat_tables(gone))
        bounds = {"row_group_rows": job.row_group_rows, "row_group_bytes": job.row_group_bytes}
        files = [job.layout.data / f"{shard}.parquet", job.layout.rejected / f"{shard}.parquet"]
        write_parquet_atomic(kept, files[0], job.compression, **bounds)
        write_parquet_atomic(rejected, files[1], job.compression, **bounds)
        info.update(rows=out.num_rows, live=kept.num_rows, output=job.output_settings(),
                    stats=shard_stats(pa.concat_tables([kept, rejected]), job.stage_ids),
                    built_from=built_from(job, shard), files=[fs.identity(f) for f in files])
    write_json_atomic(info, job.done_marker(shard))
    write_json_atomic(info, cert_path(job.layout, k, shard, job.layout.gen(k)))  # after the marker: see cert_path
    prune_old(job.layout, k, shard)  # the older generation served as the row cache; the marker vouches for this one
    return info


def content_id(job: SegmentJob, k: int) -> str:
    """A name for what a segment computed of a shard in this run (a carried group keeps the name it had)."""
    return f"{job.run_id}:{k}:{job.layout.gen(k)}"


def built_from(job: SegmentJob, shard: str) -> list[str | None]:
    """The content names of the shard's column groups of the segments before the last one (their done markers):
    the rows its data/ and rejected/ files were made from."""
    out = []
    for j in range(job.segment.index):
        try:
            out.append(fs.read_json(job.layout.done(f"seg-{j}") / f"{shard}.json").get("content"))
        except FileNotFoundError:
            out.append(None)
    return out


def computed_counts(table: pa.Table | None, timing: dict[str, float]) -> dict[str, int]:
    """Stage id -> rows of the shard the stage ran on in this run (not taken from the row cache); the counts
    a Ray writer summed per batch travel in ``timing`` (``__rn:SID`` keys, removed from it here)."""
    out = {key[len(COMPUTED):]: int(timing.pop(key)) for key in list(timing) if key.startswith(COMPUTED)}
    for name in table.column_names if table is not None else ():
        if name.startswith(COMPUTED):
            out[name[len(COMPUTED):]] = out.get(name[len(COMPUTED):], 0) + int(pc.sum(table[name]).as_py() or 0)
    return out
