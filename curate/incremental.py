"""Incremental re-runs: which segments of an existing output a changed config may reuse.

The work of segment ``k`` -- its column groups, the fit views it writes for segment ``k+1``, its
shards' done markers and the fit state of its head -- is identified by a fingerprint chained over

* the *base*: the curate version, the ``input:`` section and the input manifest (what ingest made);
* for every segment up to ``k``: its stages and their parameters (resources left out), the columns
  it writes into the next segment's fit views and, for the last segment, the output settings that shape
  the files of ``data/`` and ``rejected/`` (``compression``, ``row_group_rows``, ``row_group_bytes``).

A run on an output made with another config keeps every segment whose fingerprint is unchanged and
redoes the first changed one and every one after it: change the recaption prompt and only the last
segment runs again, download included nowhere.  ``_work/run.json`` records the fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow as pa

from curate._version import __version__
from curate.config import Config, work_params
from curate.layout import Layout
from curate.runners.common import Segment

log = logging.getLogger(__name__)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def base_fingerprint(config: Config, manifest: dict[str, Any] | None = None) -> str:
    """What a row's work depends on before any stage: the curate version and the input section.  The input
    files are not part of it: a shard's id and rows depend on its own file only (``--append`` adds shards);
    they enter the chain at the first global stage (:func:`segment_records`)."""
    return _digest({"curate": __version__, "input": config.input.model_dump(mode="json")})


def files_digest(manifest: dict[str, Any]) -> str:
    """The input files (paths and versions): every global stage's fit depends on them."""
    return _digest(sorted(json.dumps(e, sort_keys=True) for e in manifest.get("files") or []))


def row_fingerprints(config: Config, segments: list[Segment]) -> dict[str, str | None]:
    """Stage id -> its *row fingerprint*: what a map stage's result for one row depends on -- the stage, its
    parameters (resources left out) and, per column it ``needs``, the fingerprint of the stage that made the
    column (the input's for an input column).  Equal fingerprints: the result an earlier run computed for the
    row is reused (the row cache, :mod:`curate.runners.flow`).  None: never reused -- a global stage (re-fitted
    on every run), a stage that sees rejected rows too, and a stage that needs a column a global stage made."""
    base = base_fingerprint(config)
    made: dict[str, str | None] = {}
    out: dict[str, str | None] = {}
    for seg in segments:
        for st in seg.stages:
            fp: str | None = None
            if not st.needs_fit and st.applies_to != "all":
                deps = {c: made.get(c, base) for c in st.needs}
                if all(v is not None for v in deps.values()):
                    fp = _digest({"stage": st.name, "params": work_params(st.params), "needs": deps})
            out[st.id] = fp
            for f in st.output_fields():
                made[f.name] = fp
    return out


def schema_before(schema: pa.Schema, segments: list[Segment], k: int) -> pa.Schema:
    """The pipeline ``schema`` less the columns first made after segment ``k`` (what its rows can have)."""
    made = {f.name for seg in segments[:k + 1] for st in seg.stages for f in st.output_fields()}
    later = {f.name for seg in segments[k + 1:] for st in seg.stages for f in st.output_fields()} - made
    return pa.schema([f for f in schema if f.name not in later])


def view_columns(segments: list[Segment], schema: pa.Schema, k: int) -> list[str] | None:
    """Columns segment ``k`` writes into the next segment's fit views (None: it is the last segment)."""
    if k + 1 >= len(segments) or segments[k + 1].head is None:
        return None
    return segments[k + 1].head.fit_columns(schema_before(schema, segments, k))


#: the output settings of the last segment's fingerprint: how data/ and rejected/ are written (their rows do not
#: change, their files do, and only that segment writes them)
OUTPUT_KEYS = ("compression", "row_group_rows", "row_group_bytes")


def segment_records(config: Config, base: str, segments: list[Segment], schema: pa.Schema,
                    files: str = "", retry: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One record per segment: its stages (id -> parameter digest) and its chained fingerprint.

    ``files`` (:func:`files_digest`) enters the chain at the first global stage: the segments before it work
    shard by shard (an appended file adds shards, the others' work stays), those from it on depend on every
    row.  ``retry``: stage id -> how many times its failed rows were retried (``--retry-failed``): it enters
    the chain at the stage's segment, which is then redone from the row cache, fetching only those rows."""
    out: list[dict[str, Any]] = []
    h = base
    mixed = False
    for seg in segments:
        if seg.head is not None and not mixed:
            h, mixed = _digest({"previous": h, "files": files}), True
        tries = {st.id: retry[st.id] for st in seg.stages if retry and retry.get(st.id)}
        if tries:
            h = _digest({"previous": h, "retries": tries})
        final = seg.index == len(segments) - 1
        stages = [[st.id, st.name, _digest(work_params(st.params))] for st in seg.stages]
        output = {key: getattr(config.output, key) for key in OUTPUT_KEYS} if final else None
        part = {"stages": stages, "views": view_columns(segments, schema, seg.index), "output": output}
        h = _digest({"previous": h, "segment": part})
        out.append({"index": seg.index, "fingerprint": h, "stages": stages, "final": final, "output": output})
    return out


def first_change(prev: list[dict[str, Any]], new: list[dict[str, Any]]) -> int:
    """Index of the first segment whose work must be redone (``len(new)``: none)."""
    for k, rec in enumerate(new):
        if k >= len(prev) or prev[k].get("fingerprint") != rec["fingerprint"]:
            return k
    return len(new)


def why_changed(prev: list[dict[str, Any]], new: list[dict[str, Any]], k: int) -> str:
    """A short reason why segment ``k`` is redone (for the log)."""
    if k >= len(prev):
        return "new segment"
    old = {sid: d for sid, _, d in prev[k]["stages"]}
    now = {sid: d for sid, _, d in new[k]["stages"]}
    if list(old) != list(now):
        added, removed = [s for s in now if s not in old], [s for s in old if s not in now]
        bits = ([f"added {', '.join(added)}"] if added else []) + ([f"removed {', '.join(removed)}"] if removed else [])
        return "; ".join(bits) or "stages reordered"
    changed = [s for s in now if old[s] != now[s]]
    if changed:
        return f"parameters of {', '.join(changed)} changed"
    if "output" in prev[k] and prev[k]["output"] != new[k].get("output"):  # run.json of older runs has none
        was, now_ = prev[k]["output"] or {}, new[k].get("output") or {}
        return f"output settings changed ({', '.join(key for key in OUTPUT_KEYS if was.get(key) != now_.get(key))})"
    return "what it hands to the next segment changed"


def invalidate(layout: Layout, prev: list[dict[str, Any]], k: int, n_new: int | None = None) -> None:
    """Remove the work of the previous run's segments ``k`` and later, and the stats and report built from it.

    Segment ``k``'s fit view (``view-k``) stays: the unchanged segment ``k-1`` wrote it.  The column groups of
    the segments the new pipeline still has (``n_new``) stay too: the redone segments write a new generation
    and take from the old one what their stages computed before (the row cache); a shard drops its old
    generation once it is done in the new one."""
    from curate.io import fs

    n_new = len(prev) if n_new is None else n_new
    found = {int(d.name.split("-")[1]) for folder, prefix in ((layout.work, "seg-"), (layout.work, "view-"),
                                                             (layout.work, "parts-"), (layout.work / "done", "seg-"))
             for d in fs.subdirs(folder, prefix) if d.name.split("-")[1].isdigit()}
    for j in sorted(j for j in found | set(range(k, len(prev))) if j >= k):
        fs.remove(layout.done(f"seg-{j}"))
        if j >= n_new:
            fs.remove(layout.segment_out(j))
        fs.remove(layout.parts(j))
        if j > k:
            fs.remove(layout.work / f"view-{j}")
        for f in fs.listdir(layout.timing, prefix=f"seg{j}-", suffix=".json"):
            fs.remove(f)
    for rec in prev[k:]:  # states of the redone global stages (a stage moved after k is in prev[k:] too)
        for sid, _, _ in rec["stages"]:
            fs.remove(layout.state(sid))
            fs.remove(layout.timing / f"fit-{sid}.json")
    # data/ and rejected/ stay until the last segment rewrites each shard's files, or keeps them where it
    # carries the shard (curate.runners.carry); stats.json and the report say the output is whole: they go now
    for p in (layout.stats, layout.report):
        fs.remove(p)


def describe(records: list[dict[str, Any]], k: int, prev: list[dict[str, Any]], cause: str | None = None) -> list[str]:
    """Log lines: which segments are reused and which are redone (and why the first one is)."""
    lines = []
    for rec in records:
        names = " → ".join(s[0] for s in rec["stages"]) or "write"
        if rec["index"] < k:
            lines.append(f"segment {rec['index']} ({names}): reused from the previous run")
        elif rec["index"] == k:
            why = why_changed(prev, records, k)
            if cause and why == "what it hands to the next segment changed":
                why = cause
            lines.append(f"segment {rec['index']} ({names}): redone -- {why}")
        else:
            lines.append(f"segment {rec['index']} ({names}): redone (after a changed segment)")
    return lines
