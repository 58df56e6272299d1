"""Render :class:`ReportData` as one self-contained HTML page."""

from __future__ import annotations

import time
from html import escape
from typing import Any

from curate import schema as S
from curate._version import __version__
from curate.report.charts import bars_svg, fmt, funnel_svg, histogram_svg, legend_html
from curate.report.data import ReportData
from curate.report.style import CSS


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else escape(str(v))


def _cut(text: str | None, n: int = 140) -> str:
    if text is None:
        return '<span class="muted">(no caption)</span>'
    return escape(text if len(text) <= n else text[: n - 1] + "…")


def card(row: dict[str, Any], cls: str = "") -> str:
    """A sample: thumbnail, caption, scores, recaption and (for rejected rows) why."""
    if row.get("thumb"):
        alt = escape((row.get(S.CAPTION) or row.get(S.UID) or "")[:80], quote=True)
        media = f'<img src="{row["thumb"]}" alt="{alt}">'
    else:
        what = row.get(S.ERROR_TYPE) or row.get(S.REJECT_REASON) or "no image"
        media = f'<div class="noimg">no image<br>{escape(str(what))}</div>'
    meta = []
    if row.get(S.CLIP_SCORE) is not None:
        meta.append(f"clip {row[S.CLIP_SCORE]:.3f}")
    if row.get(S.CAPTION_PERPLEXITY) is not None:
        meta.append(f"ppl {fmt(row[S.CAPTION_PERPLEXITY])}")
    w, h = row.get(S.ORIGINAL_WIDTH) or row.get(S.WIDTH), row.get(S.ORIGINAL_HEIGHT) or row.get(S.HEIGHT)
    if w and h:
        meta.append(f"{w}×{h}")
    if row.get(S.LANGUAGE):
        meta.append(escape(row[S.LANGUAGE]))
    parts = [f'<figure class="card {cls}" title="{escape(str(row.get(S.UID)), quote=True)}">', media,
             f'<figcaption><p class="cap">{_cut(row.get(S.CAPTION))}</p>']
    if meta:
        parts.append(f'<p class="meta">{" · ".join(meta)}</p>')
    if row.get(S.DUPLICATE_KIND) and cls == "dup":
        parts.append(f'<p class="meta"><span class="badge">{escape(row[S.DUPLICATE_KIND])} duplicate</span></p>')
    if row.get(S.RECAPTION):
        parts.append(f'<p class="recap">recaption: {_cut(row[S.RECAPTION], 80)}</p>')
    if row.get(S.TRAINING_CAPTION) and row.get(S.TRAINING_CAPTION) not in (row.get(S.CAPTION), row.get(S.RECAPTION)):
        parts.append(f'<p class="recap">training: {_cut(row[S.TRAINING_CAPTION], 80)}</p>')
    if row.get(S.REJECT_REASON) and cls != "dup":
        why = row.get(S.REJECT_DETAIL) or row[S.REJECT_REASON]
        parts.append(f'<p class="why">{escape(str(row.get(S.REJECT_STAGE)))}: {_cut(str(why), 110)}</p>')
    parts.append("</figcaption></figure>")
    return "".join(parts)


def _header(d: ReportData) -> str:
    run = d.stats["run"]
    n, kept = run["rows_in"], run["kept"]
    pct = (lambda x: f"{x / n:.1%}") if n else (lambda x: "–")
    sub = [str(d.root), f"runner {run.get('runner', '?')}"]
    if run.get("finished_at"):
        sub.append(f"finished {run['finished_at']}")
    if run.get("wall_seconds"):
        sub.append(f"{run['wall_seconds']:.1f} s")
    tiles = [(f"{n:,}", "rows in"), (f"{kept:,}", f"kept ({pct(kept)})"),
             (f"{run['rejected']:,}", f"rejected ({pct(run['rejected'])})"),
             (str(len(d.stats['stages'])), "stages")]
    return ("<header><h1>curate report — " + escape(d.root.name) + "</h1><div class=sub>" +
            escape(" · ".join(sub)) + "</div></header>"
            '<nav><a href="#funnel">Funnel</a><a href="#distributions">Distributions</a><a href="#models">Models</a>'
            '<a href="#kept">Kept samples</a><a href="#rejected">Rejected samples</a>'
            '<a href="#duplicates">Duplicates</a><a href="#config">Config</a></nav><main>' +
            _warnings(d) + '<div class="tiles">' +
            "".join(f'<div class="tile"><b>{v}</b><span>{escape(k)}</span></div>' for v, k in tiles) + "</div>")


def _warnings(d: ReportData) -> str:
    if not d.warnings:
        return ""
    items = "".join(f"<li><b>{escape(sid)}</b>: {escape(w)}</li>" for sid, w in d.warnings)
    return ('<div class="warning" id="warnings"><strong>⚠ Warning: models ran with random weights or in a degraded '
            'mode.</strong> Their scores, embeddings or captions are not meaningful; load real weights before '
            f"trusting this run.<ul>{items}</ul></div>")


def _funnel(d: ReportData) -> str:
    n = d.stats["run"]["rows_in"] or 1
    rows = []
    for st in d.stats["stages"]:
        for reason, c in st["rejected"].items():
            errs = d.reason_errors.get((st["id"], reason), {})
            rows.append(f'<tr><td>{escape(st["id"])}</td><td><a href="#reason-{escape(reason, quote=True)}">'
                        f'{escape(reason)}</a></td><td class=num>{c:,}</td><td class=num>{c / n:.1%}</td>'
                        f"<td>{escape(', '.join(f'{k}={v}' for k, v in errs.items()))}</td></tr>")
    table = ("<table><tr><th>stage</th><th>reason</th><th>rows</th><th>of input</th><th>error types</th></tr>"
             + "".join(rows) + "</table>") if rows else "<p class=muted>Nothing was rejected.</p>"
    return ('<section id="funnel"><h2>Funnel</h2>' + legend_html(["rows that continue", "rows removed by the stage"])
            + funnel_svg(d.stats["stages"]) + table + "</section>")


def _distributions(d: ReportData) -> str:
    boxes = []
    for title, h, info in d.charts:
        thr = "; ".join(escape(label) for _, _, label in h.thresholds) or "no threshold configured"
        note = f"{info['n']:,} rows · median {fmt(info['median'])} · thresholds: {thr}"
        if h.overflow:
            note += " · the last bin holds the long tail"
        boxes.append(f'<div class="chartbox"><h3>{escape(title)}</h3>{legend_html(h.series, h.colors)}'
                     f'{histogram_svg(h, title)}<div class="note">{note}</div></div>')
    if d.languages:
        boxes.append('<div class="chartbox"><h3>Caption languages</h3>' + legend_html(["kept", "rejected"]) +
                     bars_svg(d.languages, ["kept", "rejected"]) + "</div>")
    body = "".join(boxes) or "<p class=muted>No numeric columns to chart in this output.</p>"
    cols = ", ".join(c for c in d.columns if c not in (S.IMAGE,))
    return (f'<section id="distributions"><h2>Distributions</h2><div class="charts">{body}</div>'
            f'<p class="muted">Columns in this output: {escape(cols)}</p></section>')


def _models(d: ReportData) -> str:
    if not d.models and not d.warnings:
        return '<section id="models"><h2>Models</h2><p class="muted">No stage of this run used a model.</p></section>'
    rows = "".join(f"<tr><td>{escape(s)}</td><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>"
                   for s, k, v in d.models)
    rows += "".join(f'<tr><td>{escape(s)}</td><td>warning</td><td class="why"><b>{escape(w)}</b></td></tr>'
                    for s, w in d.warnings)
    return ('<section id="models"><h2>Models</h2><table><tr><th>stage</th><th>fact</th><th>value</th></tr>'
            f"{rows}</table></section>")


def _grids(d: ReportData) -> str:
    kept = "".join(card(r) for r in d.kept) or "<p class=muted>No kept rows.</p>"
    out = [f'<section id="kept"><h2>Kept samples <span class="muted">({len(d.kept)} of '
           f'{d.stats["run"]["kept"]:,}, picked by hash of uid)</span></h2><div class="grid">{kept}</div></section>',
           '<section id="rejected"><h2>Rejected samples, by reason</h2>']
    for reason, stage, n, cards in d.rejected:
        out.append(f'<h3 id="reason-{escape(reason, quote=True)}">{escape(reason)} <span class="muted">— {n:,} rows, '
                   f'{"stages" if "," in str(stage) else "stage"} {escape(str(stage))}</span></h3>'
                   f'<div class="grid">{"".join(card(c) for c in cards)}</div>')
    if not d.rejected:
        out.append("<p class=muted>No rejected rows.</p>")
    out.append("</section>")
    return "".join(out)


def _duplicates(d: ReportData) -> str:
    if S.DUPLICATE_OF not in d.columns:
        return ('<section id="duplicates"><h2>Duplicate groups</h2><p class="muted">This run has no deduplication '
                "stage (no duplicate_of column).</p></section>")
    groups = []
    for lead, dups in d.duplicates:
        head = card(lead, "lead") if lead else \
            '<figure class="card lead"><div class="noimg">kept row not found</div></figure>'
        groups.append(f'<div class="dupgroup">{head}<span class="arrow">⇐</span>'
                      f'{"".join(card(x, "dup") for x in dups)}'
                      "</div>")
    body = "".join(groups) or "<p class=muted>No duplicates were found.</p>"
    return ('<section id="duplicates"><h2>Duplicate groups</h2><p class="muted">Solid border: the row kept for the '
            "group; dashed: rows removed as its duplicates (duplicate_of = the kept row's uid).</p>"
            f"{body}</section>")


def render(d: ReportData) -> str:
    config = (f'<section id="config"><h2>Config</h2><details><summary>config.resolved.yaml</summary>'
              f"<pre>{escape(d.config_text)}</pre></details></section>") if d.config_text else ""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>curate report — {escape(d.root.name)}</title><style>{CSS}</style></head><body>"
            + _header(d) + _funnel(d) + _distributions(d) + _models(d) + _grids(d) + _duplicates(d) + config +
            f"</main><footer>Generated by curate {__version__} on {time.strftime('%Y-%m-%d %H:%M:%S')}. "
            "Self-contained: images are inlined thumbnails, charts are inline SVG.</footer></body></html>\n")
