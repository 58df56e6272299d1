"""Everything the report shows, read from an output through DuckDB.

The work stays bounded at any corpus size: histograms aggregate a few numeric columns
in DuckDB, and sample grids first pick rows by ``hash(uid)`` reading only small columns
(uid, reason, the file and row number), then read the images of just those rows.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from curate import schema as S
from curate.layout import Layout
from curate.query import FILE_COLUMN as FILE, connect, output_stats, scan_sql
from curate.report.charts import Histogram
from curate.report.metrics import METRICS, Threshold, find_thresholds, score_metrics

log = logging.getLogger(__name__)

CARD_COLUMNS = (S.UID, S.URL, S.CAPTION, S.IMAGE, S.WIDTH, S.HEIGHT, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT,
                S.CLIP_SCORE, S.CAPTION_PERPLEXITY, S.LANGUAGE, S.RECAPTION, S.TRAINING_CAPTION, S.DUPLICATE_OF,
                S.DUPLICATE_KIND, S.REJECT_REASON, S.REJECT_STAGE, S.REJECT_DETAIL, S.ERROR_TYPE)
SERIES = ("kept", "rejected by this filter", "rejected by other stages")
MODEL_KEYS = ("model", "pretrained", "checkpoint", "backend", "tokenizer", "architecture", "device")


@dataclass
class ReportData:
    root: Path
    stats: dict[str, Any]
    config: dict[str, Any]
    config_text: str
    columns: list[str]
    thresholds: list[Threshold]
    charts: list[tuple[str, Histogram, dict[str, Any]]] = field(default_factory=list)
    languages: list[tuple[str, list[int]]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[str, str, int, list[dict[str, Any]]]] = field(default_factory=list)
    duplicates: list[tuple[dict[str, Any] | None, list[dict[str, Any]]]] = field(default_factory=list)
    models: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    #: (stage, reason) -> {error_type: rows}
    reason_errors: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)


def thumbnail(data: bytes | None, px: int = 160) -> str | None:
    """A small JPEG data URI of encoded image bytes (None if they do not decode)."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px * 2, px * 2))
            rgb = im.convert("RGB")
        rgb.thumbnail((px, px))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=72, optimize=True)
    except Exception:  # noqa: BLE001 - a broken image is shown as missing
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fetch(con, picks: list[tuple[str, int]], thumb_px: int) -> dict[tuple[str, int], dict[str, Any]]:
    """Read the card columns of (file, row number) picks, one query per file."""
    by_file: dict[str, list[int]] = {}
    for f, r in picks:
        by_file.setdefault(f, []).append(int(r))
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for f, rows in by_file.items():
        present = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($1)", [f]).fetchall()}
        cols = [c for c in CARD_COLUMNS if c in present]
        sql = (f"SELECT {', '.join(cols)}, file_row_number FROM read_parquet($2) "
               f"WHERE file_row_number IN (SELECT unnest($1::BIGINT[]))")
        rel = con.execute(sql, [rows, f])
        names = [d[0] for d in rel.description]
        for values in rel.fetchall():
            row = dict(zip(names, values))
            row["thumb"] = thumbnail(row.pop(S.IMAGE, None), thumb_px)
            out[(f, int(row.pop("file_row_number")))] = row
    return out


def _cards(con, sql: str, thumb_px: int, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run a picking query returning (filename, file_row_number, ...) and load those rows, in order."""
    picks = con.execute(sql, params).fetchall() if params else con.execute(sql).fetchall()
    rows = _fetch(con, [(p[0], p[1]) for p in picks], thumb_px)
    return [rows[(p[0], int(p[1]))] for p in picks if (p[0], int(p[1])) in rows]


def _histogram(con, src: str, expr: str, metric, thresholds: list[Threshold], bins: int = 40) -> tuple:
    base = f"SELECT ({expr})::DOUBLE AS v, reject_reason, reject_stage FROM {src}"
    stats = con.execute(f"SELECT count(v), min(v), max(v), quantile_cont(v, 0.01), quantile_cont(v, 0.99), "
                        f"median(v) FROM ({base}) WHERE v IS NOT NULL AND isfinite(v)").fetchall()[0]
    n, lo, hi, q01, q99, med = stats
    if not n:
        return None
    vals = [t.value for t in thresholds]
    log_scale = lo > 0 and hi / lo > 50
    overflow = False
    if not log_scale and hi - q99 > 3 * max(q99 - q01, 1e-12):  # a long tail would squash the bulk
        hi, overflow = q99, True
    near = [v for v in vals if (lo / 4 <= v <= hi * 4 if log_scale else abs(v - (lo + hi) / 2) <= (hi - lo) * 1.5)]
    lo, hi = min([lo] + near), max([hi] + near)
    if hi <= lo:
        hi = lo + 1
    if log_scale:  # bins of equal width in log10(v)
        a, w, tv = math.log10(lo), (math.log10(hi) - math.log10(lo)) / bins, "log10(greatest(v, 1e-300))"
    elif metric.integer:  # whole-number bins [a, a + w) with an integer w
        a, tv = math.floor(lo), "v"
        w = max(1, math.ceil((math.floor(hi) + 1 - a) / bins))
        bins = math.ceil((math.floor(hi) + 1 - a) / w)
    else:
        a, w, tv = lo, (hi - lo) / bins, "v"
    stage_ids = sorted({t.stage_id for t in thresholds}) or [""]
    rows = con.execute(
        f"SELECT least(greatest(floor(({tv} - {a!r}) / {w!r}), 0), {bins - 1})::INTEGER AS b, "
        f"CASE WHEN reject_reason IS NULL THEN 0 WHEN list_contains($stages, reject_stage) THEN 1 ELSE 2 END AS s, "
        f"count(*) FROM ({base}) WHERE v IS NOT NULL AND isfinite(v) GROUP BY ALL", {"stages": stage_ids}).fetchall()
    counts = [[0] * bins for _ in SERIES]
    for b_, s_, c in rows:
        counts[s_][b_] += c
    edges = [a + i * w for i in range(bins + 1)]
    if log_scale:
        edges = [10 ** e for e in edges]
    used = [i for i in range(3) if any(counts[i])] or [0]
    h = Histogram(edges, [counts[i] for i in used], [SERIES[i] for i in used], log_scale,
                  [(t.value, t.side, t.label) for t in thresholds], overflow, metric.integer, used)
    return h, {"n": n, "min": stats[1], "max": stats[2], "median": med}


def _charts(con, data: ReportData) -> None:
    src = scan_sql(Layout(data.root), "samples")
    cols = set(data.columns)
    if src is None:
        return
    for m in (*METRICS, *score_metrics(data.stats, data.thresholds, cols)):
        expr = m.expr(cols)
        ts = [t for t in data.thresholds if t.metric == m.key]
        if expr is None or (m.only_with_threshold and not ts):
            continue
        res = _histogram(con, src, expr, m, ts)
        if res is not None:
            data.charts.append((m.title, res[0], res[1]))
    if S.LANGUAGE in cols:
        rows = con.execute(f"SELECT coalesce({S.LANGUAGE}, '?') AS l, count(*) FILTER (WHERE reject_reason IS NULL),"
                           f" count(*) FILTER (WHERE reject_reason IS NOT NULL) FROM {src} "
                           f"WHERE {S.LANGUAGE} IS NOT NULL GROUP BY 1 ORDER BY 2 + 3 DESC, 1 LIMIT 12").fetchall()
        data.languages = [(lang, [k, r]) for lang, k, r in rows]


def _samples(con, data: ReportData, n_kept: int, per_reason: int, n_groups: int, thumb_px: int) -> None:
    layout = Layout(data.root)
    kept, rej, both = (scan_sql(layout, w, with_file=True) for w in ("kept", "rejected", "samples"))
    if kept:
        data.kept = _cards(con, f"SELECT {FILE}, file_row_number FROM {kept} "
                                f"ORDER BY hash(uid), uid LIMIT {int(n_kept)}", thumb_px)
    if rej:
        counts = con.execute(f"SELECT reject_reason, string_agg(DISTINCT reject_stage, ', ' ORDER BY reject_stage), "
                             f"count(*) FROM {rej} GROUP BY 1 ORDER BY 3 DESC, 1").fetchall()
        errors = con.execute(f"SELECT reject_stage, reject_reason, error_type, count(*) FROM {rej} WHERE error_type "
                             "IS NOT NULL GROUP BY ALL ORDER BY ALL").fetchall() if S.ERROR_TYPE in data.columns else []
        for st, reason, et, n in errors:
            data.reason_errors.setdefault((st, reason), {})[et] = n
        cards = _cards(con, f"SELECT {FILE}, file_row_number FROM (SELECT {FILE}, file_row_number, reject_reason, "
                            f"row_number() OVER (PARTITION BY reject_reason ORDER BY hash(uid), uid) AS rn FROM {rej})"
                            f" WHERE rn <= {int(per_reason)} ORDER BY reject_reason, rn", thumb_px)
        for reason, stage, n in counts:
            data.rejected.append((reason, stage, n, [c for c in cards if c.get(S.REJECT_REASON) == reason]))
    if both and S.DUPLICATE_OF in data.columns:
        kind = S.DUPLICATE_KIND if S.DUPLICATE_KIND in data.columns else "NULL"
        dup = f"(SELECT *, {FILE} AS f, file_row_number AS r FROM {both} WHERE {S.DUPLICATE_OF} IS NOT NULL)"
        groups = [g for (g,) in con.execute(
            f"SELECT g FROM (SELECT {S.DUPLICATE_OF} AS g, row_number() OVER (PARTITION BY any_value({kind}) "
            f"ORDER BY hash({S.DUPLICATE_OF})) AS rn, any_value({kind}) AS k FROM {dup} GROUP BY 1) "
            f"ORDER BY rn, k LIMIT {int(n_groups)}").fetchall()]
        if not groups:
            return
        members = _cards(con, f"SELECT f, r FROM (SELECT f, r, {S.DUPLICATE_OF}, row_number() OVER (PARTITION BY "
                              f"{S.DUPLICATE_OF} ORDER BY hash(uid), uid) AS rn FROM {dup} "
                              f"WHERE list_contains($groups, {S.DUPLICATE_OF})) WHERE rn <= 5", thumb_px,
                         {"groups": groups})
        leaders = _cards(con, f"SELECT {FILE}, file_row_number FROM {both} WHERE list_contains($groups, uid) "
                              f"ORDER BY reject_reason IS NOT NULL", thumb_px, {"groups": groups})
        for g in groups:
            lead = next((c for c in leaders if c[S.UID] == g), None)
            data.duplicates.append((lead, [c for c in members if c.get(S.DUPLICATE_OF) == g]))


def _models(con, data: ReportData) -> None:
    for st in data.stats.get("stages", []):
        info = st.get("info") or {}
        for k, v in info.items():
            if k == "warning" and v:
                data.warnings.append((st["id"], str(v)))
            elif any(word in k.lower() for word in MODEL_KEYS) and v not in (None, "", [], {}):
                data.models.append((st["id"], k, v if isinstance(v, str) else json.dumps(v)))
    src = scan_sql(Layout(data.root), "samples")
    for col in (S.CLIP_MODEL, S.RECAPTION_MODEL):
        if src and col in data.columns:
            for (v,) in con.execute(f"SELECT DISTINCT {col} FROM {src} WHERE {col} IS NOT NULL LIMIT 5").fetchall():
                data.models.append((f"column {col}", "value", str(v)))


def collect(output_dir: str | Path, samples: int = 24, per_reason: int = 8, dup_groups: int = 8,
            thumb_px: int = 160) -> ReportData:
    import yaml

    from curate.io.remote import output_root

    layout = Layout(output_root(output_dir))
    stats = output_stats(layout.root)
    text = layout.config.read_text() if layout.config.exists() else ""
    config = (yaml.safe_load(text) or {}) if text else {}
    con = connect(layout.root)
    try:
        columns = list(con.sql("SELECT * FROM samples LIMIT 0").columns)
        data = ReportData(layout.root, stats, config, text, columns, find_thresholds(config, stats))
        _charts(con, data)
        _samples(con, data, samples, per_reason, dup_groups, thumb_px)
        _models(con, data)
    finally:
        con.close()
    return data
