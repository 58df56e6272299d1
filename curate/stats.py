"""stats.json: per stage, in order, rows_in, rows_out, rejected by reason, errors by type, seconds.

One model of that shape, used by everything that writes it: :func:`funnel` turns rejection counts
per stage into the per-stage lines (a shard's done marker, the run's stats.json, the counts
recomputed from the files by ``curate.query.output_stats``), :func:`stage_line` is one line (also
``refilter``'s), :func:`run_summary` the ``run`` totals.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from curate.layout import Layout


def stage_line(stage: str, sid: str, rows_in: int, rejected: dict[str, int], errors: dict[str, int] | None = None,
               seconds: float = 0.0, info: dict[str, Any] | None = None,
               thresholds: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One stage's line of stats.json."""
    line: dict[str, Any] = {"stage": stage, "id": sid, "rows_in": rows_in, "rows_out": rows_in - sum(rejected.values()),
                            "rejected": dict(sorted(rejected.items())), "errors": dict(sorted((errors or {}).items())),
                            "seconds": round(seconds, 3)}
    if info:
        line["info"] = info
    if thresholds:
        line["thresholds"] = thresholds
    return line


def funnel(order: list[str], rows: int, rejected: dict[str, Counter], errors: dict[str, Counter],
           extra: Callable[[str], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The lines of stages ``order`` over ``rows`` input rows: each stage's rows_in is what the stages
    before it left.  ``extra(sid)``: more :func:`stage_line` arguments (stage name, seconds, info...)."""
    unknown = set(rejected) - set(order)
    if unknown:
        raise RuntimeError(f"rows rejected by unknown stage ids {sorted(unknown)}")
    out, remaining = [], rows
    for sid in order:
        kw = {"stage": sid, **(extra(sid) if extra else {})}
        line = stage_line(sid=sid, rows_in=remaining, rejected=dict(rejected.get(sid, {})),
                          errors=dict(errors.get(sid, {})), **kw)
        out.append(line)
        remaining = line["rows_out"]
    return out


def run_summary(rows: int, stages: list[dict[str, Any]], **facts: Any) -> dict[str, Any]:
    """stats.json's ``run``: totals over the stage lines, and ``facts`` (runner, seconds...)."""
    reasons: Counter = Counter()
    for st in stages:
        reasons.update(st["rejected"])
    rejected = sum(reasons.values())
    return {"rows_in": rows, "kept": rows - rejected, "rejected": rejected,
            "rejected_by_reason": dict(reasons.most_common()), **facts}


def _markers(layout: Layout) -> dict[str, list[dict[str, Any]]]:
    """Every done marker of the segments (``seg-K`` -> the markers of its shards), each read once."""
    from curate.io import fs

    return {d.name: [fs.read_json(f) for f in fs.listdir(d, suffix=".json")]
            for d in fs.subdirs(layout.work / "done", "seg-")}


def _sum_seconds(layout: Layout, markers: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    from curate.io import fs

    seconds: dict[str, float] = defaultdict(float)
    for f in fs.listdir(layout.timing, suffix=".json"):
        for k, v in fs.read_json(f).items():
            seconds[k] += float(v)
    for infos in markers.values():
        for info in infos:
            for k, v in (info.get("seconds") or {}).items():
                seconds[k] += float(v)
    return seconds


def build_stats(layout: Layout, stage_ids: list[str], stages: list, config: Any, final_segment: int,
                wall_seconds: float, run_id: str | None = None) -> dict[str, Any]:
    """stats.json of a finished run: the shards' counts (their final done markers) added up.

    ``stages``: the run's stages, each global one with its fitted state set (its ``describe`` and
    ``thresholds`` read it; the caller restores the state of a segment an earlier run did)."""
    rejected: dict[str, Counter] = defaultdict(Counter)
    errors: dict[str, Counter] = defaultdict(Counter)
    rows = shards = 0
    markers = _markers(layout)
    for marker in markers.get(f"seg-{final_segment}", []):
        info = marker["stats"]
        shards += 1
        rows += info["rows"]
        for st in info["stages"]:
            rejected[st["id"]].update(st["rejected"])
            errors[st["id"]].update(st["errors"])
    seconds = _sum_seconds(layout, markers)
    described = {s.id: s for s in stages}

    def extra(sid: str) -> dict[str, Any]:
        st = described.get(sid)
        if st is None:
            return {"seconds": seconds.get(sid, 0.0)}
        return {"stage": st.name, "seconds": seconds.get(sid, 0.0), "info": st.describe(),
                "thresholds": st.thresholds()}

    lines = funnel(stage_ids, rows, rejected, errors, extra)
    if run_id is not None:  # rows each stage ran on in this run; the others took their result from the row cache
        computed: Counter = Counter()
        for infos in markers.values():
            for info in infos:
                if info.get("run") == run_id:
                    computed.update(info.get("computed") or {})
        for line in lines:
            if line["id"] in described and not described[line["id"]].needs_fit:
                line["rows_computed"] = int(computed.get(line["id"], 0))
    run = run_summary(rows, lines, shards=shards, runner=config.runner.kind, wall_seconds=round(wall_seconds, 3),
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config_hash=config.work_hash())
    return {"run": run, "stages": lines}


def load_stats(output: str | Path) -> dict[str, Any]:
    from curate.io.remote import output_root

    path = Layout(output_root(output)).stats
    if not path.exists():
        raise FileNotFoundError(f"{path}: no stats.json (is {output} a finished curate output?)")
    return json.loads(path.read_text())


def format_stats(stats: dict[str, Any]) -> str:
    run = stats["run"]
    lines = [f"rows in: {run['rows_in']}   kept: {run['kept']}   rejected: {run['rejected']}   "
             f"time: {run['wall_seconds']:.1f}s ({run['runner']} runner)"]
    lines.append(f"{'stage':<22}{'in':>9}{'out':>9}{'seconds':>10}  rejected by reason")
    for st in stats["stages"]:
        rej = ", ".join(f"{k}={v}" for k, v in st["rejected"].items()) or "-"
        lines.append(f"{st['id']:<22}{st['rows_in']:>9}{st['rows_out']:>9}{st['seconds']:>10.2f}  {rej}")
        if st["errors"]:
            lines.append(f"{'':<22}{'':>28}  errors: " + ", ".join(f"{k}={v}" for k, v in st["errors"].items()))
        for k, v in (st.get("info") or {}).items():
            if k == "warning":
                lines.append(f"{'':<50}  WARNING: {v}")
    return "\n".join(lines)
