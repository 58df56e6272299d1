"""stats.json: per stage, in order, rows_in, rows_out, rejected by reason, errors by type, seconds."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from curate.layout import Layout


def _sum_seconds(layout: Layout) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    if layout.timing.exists():
        for f in layout.timing.glob("*.json"):
            for k, v in json.loads(f.read_text()).items():
                seconds[k] += float(v)
    done = layout.work / "done"
    if done.exists():
        for f in done.glob("seg-*/*.json"):
            for k, v in (json.loads(f.read_text()).get("seconds") or {}).items():
                seconds[k] += float(v)
    return seconds


def build_stats(layout: Layout, stage_ids: list[str], stages: list, config: Any, final_segment: int,
                wall_seconds: float) -> dict[str, Any]:
    per = {sid: {"rows_in": 0, "rows_out": 0, "rejected": Counter(), "errors": Counter()} for sid in stage_ids}
    rows = kept = shards = 0
    for f in sorted(layout.done(f"seg-{final_segment}").glob("*.json")):
        info = json.loads(f.read_text())["stats"]
        shards += 1
        rows += info["rows"]
        kept += info["kept"]
        for st in info["stages"]:
            p = per[st["id"]]
            p["rows_in"] += st["rows_in"]
            p["rows_out"] += st["rows_out"]
            p["rejected"].update(st["rejected"])
            p["errors"].update(st["errors"])
    seconds = _sum_seconds(layout)
    described = {s.id: s for s in stages}
    out_stages = []
    for sid in stage_ids:
        p = per[sid]
        st = described.get(sid)
        entry = {
            "stage": st.name if st is not None else sid,
            "id": sid,
            "rows_in": p["rows_in"],
            "rows_out": p["rows_out"],
            "rejected": dict(sorted(p["rejected"].items())),
            "errors": dict(sorted(p["errors"].items())),
            "seconds": round(seconds.get(sid, 0.0), 3),
        }
        info = st.describe() if st is not None else {}
        if info:
            entry["info"] = info
        out_stages.append(entry)
    reasons: Counter = Counter()
    for p in per.values():
        reasons.update(p["rejected"])
    return {
        "run": {
            "rows_in": rows,
            "kept": kept,
            "rejected": rows - kept,
            "rejected_by_reason": dict(reasons.most_common()),
            "shards": shards,
            "runner": config.runner.kind,
            "wall_seconds": round(wall_seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config_hash": config.work_hash(),
        },
        "stages": out_stages,
    }


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
