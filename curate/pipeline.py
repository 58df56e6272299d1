"""Run a pipeline: validate, ingest, run segments (global stages between them), write stats.

``run(config)`` is what ``curate run`` calls.  A run killed half-way and
started again with the same config and the same input files (the input
manifest) resumes: finished files and shards are skipped (their done markers),
and the output ends up the same as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate import registry
from curate import schema as S
from curate.config import Config, ConfigError, load_config
from curate.dup_groups import write_after_run
from curate.ingest import STAGE_ID as INPUT_ID
from curate.ingest import ShardInfo, check_input
from curate.io.files import (InputError, list_input_files, remove_stale_temps, write_bytes_atomic, write_json_atomic,
                             write_text_atomic)
from curate.io.manifest import added_files, build_manifest, describe_changes, read_manifest
from curate.layout import Layout
from curate.runners import make_runner
from curate.runners.base import Runner, restore_state
from curate.runners.common import Segment, SegmentJob, split_segments
from curate.runners.flow import RowCache
from curate.stage import Stage
from curate.stats import build_stats

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: Any  # Path, or a UPath for an output on object storage
    stats: dict[str, Any]
    #: per segment: index, stage ids, and whether its work was reused from a previous run's
    segments: list[dict[str, Any]] = field(default_factory=list)
    work: Path | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.output, self.work)


def output_layout(config: Config) -> Layout:
    """Where the run writes: ``output.path`` (local, or a URI: the deliverables go to object storage)
    and the work folder (``output.work_path``, local or a URI; default ``OUTPUT/_work``, on object storage
    too).  Sets the process's storage options (:func:`curate.io.fs.set_storage`) for the paths that travel."""
    from curate.io import fs

    fs.set_storage(config.storage)
    spec = config.output.path
    root = fs.as_path(str(spec)) if fs.is_uri(str(spec)) else Path(spec).expanduser().resolve()
    wp = config.output.work_path
    work = None if not wp else fs.as_path(wp) if fs.is_uri(wp) else Path(wp).expanduser().resolve()
    return Layout(root, work)


def build_stages(config: Config) -> list[Stage]:
    from curate.stages.unique_uid import UniqueUid

    params = config.stages
    if config.input.provides_images and any(p.stage == "download" for p in params):
        log.info("the input rows hold their images: the download stage is skipped")
        params = [p for p in params if p.stage != "download"]
    stages = [UniqueUid({"id": "unique_uid"})] + [registry.create(p) for p in params]
    last_fit = max((i for i, st in enumerate(stages) if st.needs_fit), default=-1)
    early = [st.id for st in stages[:last_fit] if st.applies_to == "all"]
    if early:
        raise ConfigError(f"stage(s) {', '.join(early)} apply to rejected rows too (e.g. recaption with only_kept: "
                          f"false) and must come after the last global stage ({stages[last_fit].id}): rows "
                          "rejected in earlier segments reach them when the last segment writes rejected/")
    return stages


def prepare_output(config: Config, layout: Layout, manifest: dict[str, Any], append: bool = False,
                   retry: bool = False) -> dict[str, Any] | None:
    """Create the output dir; returns the record (``run.json``) of the previous run to build on, or None.

    Same config and input: the previous run is resumed.  Another config on the same input: an
    incremental re-run -- the segments whose fingerprint is unchanged are reused (see
    ``curate.incremental``; decided once the input is ingested).  A resume or re-run must read the
    very input the output was started with (``manifest``, see ``curate.io.manifest``), or with ``append`` that
    input and more files; otherwise it is refused, or with ``output.overwrite`` the output is started over
    from the current input (as it is for another config with ``output.overwrite``).  ``retry``: the run
    fetches failed rows again (a re-run even with the same config and input).
    """
    from curate.incremental import base_fingerprint
    from curate.io import fs
    from curate.io.remote import is_remote, remove

    h = config.work_hash()
    base = base_fingerprint(config)
    if layout.run_file.exists():
        prev = json.loads(layout.run_file.read_text())
        old = read_manifest(layout.input_manifest)
        change = describe_changes(old, manifest) if old is not None else "no input manifest was recorded for it"
        added = added_files(old, manifest) if old is not None and change is not None else None
        grown = bool(append and added)
        if change is not None and not grown and not config.output.overwrite:
            hint = ("--append takes added files only; " if append else
                    "run with --append to add the new files' rows to this output, " if added else "")
            raise InputError(f"output.path {layout.root}: input changed since this output was started: "
                             f"{change}; {hint}use a new output.path or --set output.overwrite=true to start over "
                             "from the current input")
        if change is None and prev.get("work_hash") == h and not retry:
            log.info("resuming the run in %s", layout.root)
            _remove_stale_temps(layout)
            return prev
        if change is not None and not grown:
            log.warning("input changed since %s was started (%s); starting over (output.overwrite)",
                        layout.root, change)
        elif config.output.overwrite and prev.get("work_hash") != h:
            log.warning("%s was made with another config; starting over (output.overwrite)", layout.root)
        elif prev.get("base") == base and fs.exists(layout.ingest):
            if grown:
                log.info("appending %d input file(s) to %s: their rows go through every stage, the global stages "
                         "are fitted again over all rows, every other row's finished work is reused",
                         len(added), layout.root)
            elif prev.get("work_hash") != h:
                log.info("%s was made with another config: re-running the segments that changed", layout.root)
            fs.remove(layout.work / "output_schema.arrow")  # rebuilt for the new stages and input files
            _remove_stale_temps(layout)
            return prev
        else:
            log.warning("%s was made with other input settings, another curate version, or its work folder "
                        "was deleted (output.keep_work: false): every segment is redone", layout.root)
    elif layout.root.exists() and any(not p.name.startswith("_demo") for p in layout.root.iterdir()):
        if not config.output.overwrite:
            if layout.stats.exists() or layout.data.exists():
                raise ConfigError(f"output.path {layout.root} holds a curate output whose work folder "
                                  f"({layout.work}) is not here: set output.work_path to it, or "
                                  "--set output.overwrite=true to start over")
            raise ConfigError(f"output.path {layout.root} exists and is not a curate output; "
                              "choose a new output.path or --set output.overwrite=true")
    for p in (layout.data, layout.rejected, layout.work, layout.stats, layout.report, layout.config):
        remove(p)
    if not is_remote(layout.root):
        layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, layout.input_manifest)  # before run.json: a run.json always has its manifest
    write_json_atomic({"work_hash": h, "base": base, "created": time.time()}, layout.run_file)
    return None


def _remove_stale_temps(layout: Layout) -> None:
    n = remove_stale_temps(layout.work, layout.data, layout.rejected)
    if n:
        log.info("removed %d temp file(s) that an interrupted run was writing", n)


def retry_types(stages: list[Stage], retry_failed: list[str] | None) -> dict[str, list[str]]:
    """Stage id -> the error types ``--retry-failed`` fetches again ([]: each stage's transient ones)."""
    if retry_failed is None:
        return {}
    out = {st.id: list(retry_failed or st.transient_errors) for st in stages if st.transient_errors}
    if not out:
        raise ConfigError("--retry-failed: the pipeline has no stage whose failures can be retried (download)")
    return out


def _plan_segments(config: Config, layout: Layout, prev: dict[str, Any] | None, manifest: dict[str, Any],
                   segments: list[Segment], schema: pa.Schema, retry: dict[str, list[str]]) \
        -> tuple[list[dict[str, Any]], Layout, dict[int, RowCache]]:
    """Fingerprint the segments, drop the previous run's work from the first changed one on, record them.

    Returns one record per segment, with ``reused``: its work comes from a previous run, the layout with each
    segment's column-group generation, and each segment's row cache."""
    from curate import incremental

    run = json.loads(layout.run_file.read_text())
    run["base"] = incremental.base_fingerprint(config)
    retries = dict(run.get("retries") or {})
    for sid in retry:
        retries[sid] = retries.get(sid, 0) + 1
    records = incremental.segment_records(config, run["base"], segments, schema,
                                          incremental.files_digest(manifest), retries)
    old = (prev or {}).get("segments") or []
    grown = read_manifest(layout.input_manifest) != manifest  # appended files (prepare_output refused the rest)
    k = len(records)
    if prev is None:  # a new output
        k = 0
    elif old or prev.get("work_hash") != config.work_hash():  # reuse what did not change
        k = incremental.first_change(old, records)
        if k < len(records) or len(old) != len(records):
            incremental.invalidate(layout, old, k, len(records))
            cause = "the input gained files" if grown else \
                "failed rows are fetched again" if retry else None
            for line in incremental.describe(records, k, old, cause):
                log.info("%s", line)
    for rec in records:
        j = rec["index"]
        rec["reused"] = prev is not None and j < k
        was = old[j].get("gen", 0) if j < len(old) else None
        rec["gen"] = 0 if was is None else was if j < k else was + 1
    if grown:  # appended files: recorded once their work is planned
        write_json_atomic(manifest, layout.input_manifest)
    # the work is consistent with the new records only now: record them last
    write_json_atomic({**run, "work_hash": config.work_hash(), "retries": retries, "segments": [
        {key: r[key] for key in ("index", "fingerprint", "stages", "final", "output", "gen")} for r in records]},
        layout.run_file)
    layout = dataclasses.replace(layout, gens=tuple(r["gen"] for r in records))
    fps = incremental.row_fingerprints(config, segments)
    caches = {seg.index: RowCache([st.id for st in seg.stages], {st.id: fps[st.id] for st in seg.stages},
                                  {st.id: [f.name for f in st.output_fields()] for st in seg.stages},
                                  {sid: types for sid, types in retry.items() if any(st.id == sid for st in seg.stages)})
              for seg in segments}
    return records, layout, caches


def output_schema(ingest_paths: list[str], stages: list[Stage]) -> pa.Schema:
    carried: list[pa.Field] = []
    seen = set(S.BASE_COLUMNS) | set(S.REJECT_COLUMNS)
    from curate.io import fs

    schemas = [fs.read_schema(p) for p in ingest_paths]
    merged = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    for f in merged:
        if f.name not in seen and not S.is_internal(f.name):
            carried.append(f.with_type(pa.string()) if pa.types.is_null(f.type) else f)
            seen.add(f.name)
    produced: list[pa.Field] = []
    for st in stages:
        for f in st.output_fields():
            if f.name not in seen:
                produced.append(f)
                seen.add(f.name)
    return pa.schema([S.field(c) for c in S.BASE_COLUMNS] + carried + produced +
                     [S.field(c) for c in S.REJECT_COLUMNS])


def _load_or_build_schema(layout: Layout, shards: list[ShardInfo], stages: list[Stage]) -> pa.Schema:
    from curate.io import fs

    path = layout.work / "output_schema.arrow"
    if fs.exists(path):
        return pa.ipc.read_schema(pa.py_buffer(fs.read_bytes(path)))
    schema = output_schema([s.path for s in shards], stages)
    write_bytes_atomic(schema.serialize().to_pybytes(), path)
    return schema


def execute(config: Config, append: bool = False, retry_failed: list[str] | None = None) -> RunResult:
    """Run ``config``.  ``append``: the input gained files since the output was started (refused otherwise);
    ``retry_failed``: fetch again the rows the download rejected with these error types ([]: its transient
    ones) -- see README "Iterating on a corpus"."""
    t_start = time.time()
    layout = output_layout(config)
    own = tuple(str(d).rstrip("/") + "/" for d in (layout.data, layout.rejected, layout.work))
    files = [f for f in list_input_files(config.input.path, config.input.format, config.storage)
             if not str(f).startswith(own)]  # never read our own output as input
    if not files:
        raise InputError(f"input.path {config.input.path}: no input files outside output.path")
    check_input(files, config.input)
    stages = build_stages(config)
    manifest = build_manifest(config.input.path, files)
    retry = retry_types(stages, retry_failed)
    prev = prepare_output(config, layout, manifest, append=append, retry=bool(retry))
    write_text_atomic(config.to_yaml(), layout.config)
    run_id = f"{int(t_start)}-{uuid.uuid4().hex[:6]}"
    stage_ids = [INPUT_ID] + [s.id for s in stages]
    with make_runner(config) as runner:
        t0 = time.perf_counter()
        shards = runner.ingest(manifest["files"], config.input, layout, config.output.compression, config.storage)
        write_json_atomic({INPUT_ID: time.perf_counter() - t0}, layout.timing / f"ingest-{run_id}.json")
        total = sum(s.rows for s in shards)
        if total == 0:
            raise InputError(f"input.path {config.input.path}: the input files hold no rows")
        log.info("%d rows in %d shards from %d file(s)%s", total, len(shards), len(files),
                 " (resumed)" if prev is not None and prev.get("work_hash") == config.work_hash() else "")
        schema = _load_or_build_schema(layout, shards, stages)
        segments = split_segments(stages)
        plan, layout, caches = _plan_segments(config, layout, prev, manifest, segments, schema, retry)
        _run_segments(config, runner, layout, segments, shards, schema, stage_ids, run_id, caches)
    n_seg = len(segments)
    for st in stages:
        if st.needs_fit and st.state is None:
            restore_state(st, layout)  # its segment was done before this run: stats.json describes its state
    stats = build_stats(layout, stage_ids, stages, config, final_segment=n_seg - 1,
                        wall_seconds=time.time() - t_start, run_id=run_id)
    write_json_atomic(stats, layout.stats)
    if not config.output.keep_work:
        _cleanup(layout, n_seg)
    _write_report(layout)
    write_after_run(layout.root)  # the duplicate-groups table curate serve pages through
    return RunResult(layout.root, stats, [{"index": r["index"], "stages": [st[0] for st in r["stages"]],
                                           "reused": r["reused"]} for r in plan], layout.work_dir)


def _run_segments(config: Config, runner: Runner, layout: Layout, segments: list[Segment],
                  shards: list[ShardInfo], schema: pa.Schema, stage_ids: list[str], run_id: str,
                  caches: dict[int, RowCache] | None = None) -> None:
    """Run the segments in order; only the shards without a done marker are run again.

    In a segment redone for an append, a retry or a changed stage (a new generation), a shard whose column
    group would come out as the previous generation's is carried forward instead (see
    :mod:`curate.runners.carry`); the others run.

    Each segment reads only the rows still live at its start (see ``curate.runners.flow``); a global
    stage's ``fit`` reads the per-shard views the previous segment wrote (segment 0: the ingest shards).
    """
    from curate.incremental import view_columns
    from curate.io import fs
    from curate.runners.flow import done_shards, live_count, view_path

    base = {s.shard: s.path for s in shards}
    for seg in segments:
        final = seg.index == len(segments) - 1
        job = SegmentJob(seg, {}, {}, final, layout, schema, stage_ids, config.output.compression,
                         view_columns(segments, schema, seg.index), config.output.row_group_rows,
                         config.output.row_group_bytes, (caches or {}).get(seg.index), run_id)
        finished = done_shards(layout, seg.index)  # one listing, not a request per shard
        pending = [sh for sh in base if sh not in finished]
        if not pending:
            continue
        if seg.index == 0:
            entering = {sh: live_count(p) for sh, p in base.items()}
            fit_inputs = dict(base)
        else:
            prev = layout.done(f"seg-{seg.index - 1}")
            entering = {sh: json.loads(fs.read_bytes(prev / f"{sh}.json"))["live"] for sh in base}
            fit_inputs = {sh: str(view_path(layout, seg.index, sh)) for sh in base}
        if seg.head is not None:
            runner.fit(seg.head, fit_inputs, sum(entering.values()), layout)
        job.inputs = {sh: base[sh] for sh in pending}
        job.expected_rows = {sh: entering[sh] for sh in pending}
        carried = [info["shard"] for info in runner.carry(job)]
        if carried:
            log.info("segment %d: %d of %d shards carried forward unchanged from the previous generation",
                     seg.index, len(carried), len(pending))
            for sh in carried:
                del job.inputs[sh], job.expected_rows[sh]
            if not job.inputs:
                continue
        log.info("segment %d (%s): %d of %d shards to do, %d rows live", seg.index,
                 ", ".join(s.id for s in seg.stages), len(job.inputs), len(base), sum(job.expected_rows.values()))
        timing = runner.run_segment(job)
        if timing:
            write_json_atomic(timing, layout.timing / f"seg{seg.index}-{run_id}.json")


def _cleanup(layout: Layout, n_segments: int) -> None:
    """``output.keep_work: false``: drop the intermediate shards (done markers and states stay); a
    re-run with another config then redoes every segment."""
    from curate.io import fs

    fs.remove(layout.ingest)
    for k in range(n_segments + 1):
        fs.remove(layout.segment_out(k))
        fs.remove(layout.parts(k))
        fs.remove(layout.work / f"view-{k}")


def _write_report(layout: Layout) -> None:
    try:
        from curate.report import write_report
    except ImportError:
        return
    try:
        write_report(layout.root)
    except Exception:  # noqa: BLE001 - a report problem must not fail a finished run
        log.exception("could not write the report")


def run(config: str | Path | dict | Config, *, append: bool = False, retry_failed: list[str] | None = None,
        **overrides: Any) -> RunResult:
    """Python API: ``curate.run("configs/demo.yaml", **{"output.path": "/tmp/out"})``.

    ``append=True`` / ``retry_failed=[...]`` are ``curate run --append`` / ``--retry-failed`` (see
    :func:`execute`).

    Keyword names may use ``__`` for dots (``output__path=...``); dict values
    are flattened (``runner={"kind": "ray"}``).
    """
    flat: dict[str, Any] = {}

    def _flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and not prefix.startswith("stages"):
            for k, v in value.items():
                _flatten(f"{prefix}.{k}", v)
        else:
            flat[prefix] = value

    for k, v in overrides.items():
        _flatten(k.replace("__", "."), v)
    return execute(load_config(config, flat), append=append, retry_failed=retry_failed)
