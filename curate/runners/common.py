"""What both runners share: segments, running a stage in batches, writing a finished shard."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema as S
from curate.io.files import write_json_atomic, write_parquet_atomic
from curate.layout import Layout
from curate.stage import GlobalStage, Stage


@dataclass
class Segment:
    """Map stages that run shard by shard; ``head`` is the global stage that opens it (if any)."""

    index: int
    head: GlobalStage | None
    maps: list[Stage] = field(default_factory=list)

    @property
    def stages(self) -> list[Stage]:
        return ([self.head] if self.head else []) + self.maps


def split_segments(stages: list[Stage]) -> list[Segment]:
    segments: list[Segment] = []
    for st in stages:
        if isinstance(st, GlobalStage) or not segments:
            segments.append(Segment(len(segments), st if isinstance(st, GlobalStage) else None))
            if isinstance(st, GlobalStage):
                continue
        segments[-1].maps.append(st)
    return segments


@dataclass
class SegmentJob:
    """One segment over the shards still to do."""

    segment: Segment
    inputs: dict[str, str]  # shard id -> parquet path
    expected_rows: dict[str, int]
    final: bool
    layout: Layout
    schema: pa.Schema  # output schema (final) -- intermediate shards keep their own
    stage_ids: list[str]  # every stage id of the pipeline, in order (for stats)
    compression: str = "zstd"

    def done_marker(self, shard: str) -> Path:
        return self.layout.done(f"seg-{self.segment.index}") / f"{shard}.json"


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


def sort_shard(table: pa.Table) -> pa.Table:
    return table.sort_by([(S.SOURCE_ROW, "ascending"), (S.UID, "ascending")])


def shard_stats(table: pa.Table, stage_ids: list[str]) -> dict[str, Any]:
    """Per-stage counts of one finished shard, derived from its rows."""
    n = table.num_rows
    rej: dict[str, dict[str, int]] = defaultdict(dict)
    err: dict[str, dict[str, int]] = defaultdict(dict)
    if n:
        g = table.group_by([S.REJECT_STAGE, S.REJECT_REASON]).aggregate([([], "count_all")])
        for st, reason, c in zip(g[S.REJECT_STAGE].to_pylist(), g[S.REJECT_REASON].to_pylist(),
                                 g["count_all"].to_pylist()):
            if st is not None:
                rej[st][reason] = c
        g = table.group_by([S.REJECT_STAGE, S.ERROR_TYPE]).aggregate([([], "count_all")])
        for st, et, c in zip(g[S.REJECT_STAGE].to_pylist(), g[S.ERROR_TYPE].to_pylist(), g["count_all"].to_pylist()):
            if st is not None and et is not None:
                err[st][et] = c
    stages = []
    remaining = n
    for sid in stage_ids:
        r = sum(rej.get(sid, {}).values())
        stages.append({"id": sid, "rows_in": remaining, "rows_out": remaining - r,
                       "rejected": dict(sorted(rej.get(sid, {}).items())),
                       "errors": dict(sorted(err.get(sid, {}).items()))})
        remaining -= r
    unknown = set(rej) - set(stage_ids)
    if unknown:
        raise RuntimeError(f"rows rejected by unknown stage ids {sorted(unknown)}")
    return {"rows": n, "kept": remaining, "stages": stages}


def finish_shard(job: SegmentJob, shard: str, table: pa.Table, timing: dict[str, float] | None = None) -> dict:
    """Write a shard that went through the whole segment, then its done marker (the resume point)."""
    expected = job.expected_rows.get(shard)
    if expected is not None and table.num_rows != expected:
        raise RuntimeError(f"shard {shard}: {table.num_rows} rows after segment {job.segment.index}, "
                           f"expected {expected} -- rows were lost or duplicated")
    table = sort_shard(table)
    info: dict[str, Any] = {"shard": shard, "rows": table.num_rows, "seconds": timing or {}}
    if job.final:
        out = S.conform(table, job.schema)
        kept_mask = pc.is_null(out[S.REJECT_REASON])
        write_parquet_atomic(out.filter(kept_mask), job.layout.data / f"{shard}.parquet", job.compression)
        write_parquet_atomic(out.filter(pc.invert(kept_mask)), job.layout.rejected / f"{shard}.parquet",
                             job.compression)
        info["stats"] = shard_stats(table, job.stage_ids)
    else:
        write_parquet_atomic(table, job.layout.segment_out(job.segment.index) / f"{shard}.parquet", job.compression)
    write_json_atomic(info, job.done_marker(shard))
    return info


def read_shard(path: str) -> pa.Table:
    return pq.read_table(path)
