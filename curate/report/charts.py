"""Inline SVG charts (no JavaScript, no external resources): histograms, the funnel, bar charts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

#: series colours: kept, rejected by the metric's own filter, rejected by other stages
COLORS = ("#2f6fdf", "#e0483e", "#b8bec7")
THRESHOLD_COLOR = "#9b1c1c"


@dataclass
class Histogram:
    """Counts per bin and series; edges are in display units (log10 already undone)."""

    edges: list[float]
    counts: list[list[int]]  # [series][bin]
    series: list[str]
    log: bool = False
    thresholds: list[tuple[float, str, str]] = field(default_factory=list)  # (value, side, label)
    overflow: bool = False  # the last bin also holds everything above its edge
    integer: bool = False
    colors: list[int] = field(default_factory=lambda: [0, 1, 2])  # index into COLORS per series


def fmt(v: float, integer: bool = False) -> str:
    """Short axis/label numbers: 0.0312, 45, 1,024, 238k, 1.2M."""
    a = abs(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if a >= div:
            d = 1e3 if suffix == "k" else div
            return f"{v / d:.4g}{suffix}"
    if integer and abs(v - round(v)) < 1e-9:
        return f"{int(round(v)):,}"
    if v == 0:
        return "0"
    return f"{v:.0f}" if a >= 100 else f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    lo, hi = max(lo, 1e-12), max(hi, 1e-12)
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi:
                out.append(v)
    return out if len(out) <= 10 else [v for v in out if math.log10(v).is_integer()] or out[::3]


def histogram_svg(h: Histogram, title: str, width: int = 600, height: int = 250) -> str:
    ml, mr, mt, mb = 56, 16, 14 + 13 * len(h.thresholds), 42  # threshold labels sit above the plot
    pw, ph = width - ml - mr, height - mt - mb
    nb = len(h.edges) - 1
    tx = (lambda v: math.log10(max(v, 1e-12))) if h.log else (lambda v: v)  # a threshold may be <= 0
    x0, x1 = tx(h.edges[0]), tx(h.edges[-1])
    span = (x1 - x0) or 1.0

    def px(v: float) -> float:
        return ml + (tx(v) - x0) / span * pw

    totals = [sum(c[i] for c in h.counts) for i in range(nb)]
    ymax = max(totals + [1])
    yt = [t for t in nice_ticks(0, ymax, 4) if t == int(t)]
    ytop = max(yt[-1], ymax) if yt else ymax

    def py(v: float) -> float:
        return mt + ph - v / ytop * ph

    out = [f'<svg class="chart histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">']
    for t in yt:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e6e8eb"/>'
                   f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{int(t):,}</text>')
    for t_val, side, _ in h.thresholds:  # shade the rejected side first, under the bars
        xv = min(max(px(t_val), ml), ml + pw)
        a, b = (ml, xv) if side == "min" else (xv, ml + pw)
        out.append(f'<rect x="{a:.1f}" y="{mt}" width="{max(b - a, 0):.1f}" height="{ph}" fill="#fbe3e1" '
                   f'opacity="0.6"/>')
    for i in range(nb):
        xa, xb = px(h.edges[i]), px(h.edges[i + 1])
        base = 0
        for s, counts in enumerate(h.counts):
            c = counts[i]
            if not c:
                continue
            ya, yb = py(base + c), py(base)
            rng = f"{fmt(h.edges[i], h.integer)} – {fmt(h.edges[i + 1], h.integer)}"
            if h.overflow and i == nb - 1:
                rng = f"≥ {fmt(h.edges[i], h.integer)}"
            out.append(f'<rect class="bar s{s}" x="{xa + 0.5:.1f}" y="{ya:.1f}" width="{max(xb - xa - 1, 1):.1f}" '
                       f'height="{max(yb - ya, 0.5):.1f}" fill="{COLORS[h.colors[s]]}"><title>{escape(rng)}: {c:,} '
                       f'{escape(h.series[s])}</title></rect>')
            base += c
    out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#555"/>')
    ticks = _log_ticks(h.edges[0], h.edges[-1]) if h.log else nice_ticks(h.edges[0], h.edges[-1], 6)
    if h.integer:
        ticks = [t for t in ticks if float(t).is_integer()]
    for t in ticks:
        if h.edges[0] <= t <= h.edges[-1]:
            out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#555"/>'
                       f'<text x="{px(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">'
                       f'{fmt(t, h.integer)}</text>')
    scale = " (log scale)" if h.log else ""
    out.append(f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" class="axis">'
               f'{escape(title)}{scale}</text>')
    for k, (t_val, side, label) in enumerate(h.thresholds):
        xv = px(t_val)
        off = "" if ml <= xv <= ml + pw else " (off chart)"
        xv = min(max(xv, ml), ml + pw)
        anchor = "end" if xv > ml + pw * 0.6 else "start"
        dx = -4 if anchor == "end" else 4
        out.append(f'<line class="threshold" x1="{xv:.1f}" x2="{xv:.1f}" y1="{14 + 13 * k - 10}" y2="{mt + ph}" '
                   f'stroke="{THRESHOLD_COLOR}" stroke-width="2" stroke-dasharray="5 3"/>'
                   f'<text x="{xv + dx:.1f}" y="{11 + 13 * k}" text-anchor="{anchor}" class="thr">'
                   f'{escape(label + off)}</text>')
    out.append("</svg>")
    return "".join(out)


def legend_html(series: list[str], colors: list[int] | None = None) -> str:
    colors = colors or list(range(len(series)))
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{COLORS[c % 3]}"></i>{escape(s)}</span>'
        for s, c in zip(series, colors)) + "</div>"


def funnel_svg(stages: list[dict], width: int = 900) -> str:
    """One bar per stage: rows that went on (blue) and rows it removed (red), to scale with the input."""
    rows = [s for s in stages if s["rows_in"] or s["rows_out"]]
    total = max([s["rows_in"] for s in rows] + [1])
    lw, rw, bh, gap = 170, 210, 20, 8
    pw = width - lw - rw
    height = len(rows) * (bh + gap) + 10
    out = [f'<svg class="chart funnel" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="rows kept and removed per stage">']
    for i, s in enumerate(rows):
        y = 5 + i * (bh + gap)
        kept_w = s["rows_out"] / total * pw
        gone = s["rows_in"] - s["rows_out"]
        gone_w = gone / total * pw
        out.append(f'<text x="{lw - 8}" y="{y + bh - 5}" text-anchor="end" class="label">{escape(s["id"])}</text>')
        out.append(f'<rect class="bar s0" x="{lw}" y="{y}" width="{max(kept_w, 0.5):.1f}" height="{bh}" '
                   f'fill="{COLORS[0]}"><title>{s["rows_out"]:,} rows continue</title></rect>')
        if gone:
            out.append(f'<rect class="bar s1" x="{lw + kept_w:.1f}" y="{y}" width="{max(gone_w, 1.5):.1f}" '
                       f'height="{bh}" fill="{COLORS[1]}"><title>{gone:,} rows removed</title></rect>')
        pct = f" ({gone / s['rows_in']:.1%})" if s["rows_in"] and gone else ""
        note = f"{s['rows_out']:,}" + (f"  −{gone:,}{pct}" if gone else "")
        out.append(f'<text x="{lw + pw + 8}" y="{y + bh - 5}" class="label">{escape(note)}</text>')
    out.append("</svg>")
    return "".join(out)


def bars_svg(items: list[tuple[str, list[int]]], series: list[str], width: int = 600) -> str:
    """Horizontal stacked bars for categories (e.g. languages): [(label, [count per series])]."""
    lw, rw, bh, gap = 90, 70, 16, 6
    pw = width - lw - rw
    top = max([sum(c) for _, c in items] + [1])
    height = len(items) * (bh + gap) + 8
    out = [f'<svg class="chart bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(", ".join(series))}">']
    for i, (label, counts) in enumerate(items):
        y, x = 4 + i * (bh + gap), float(lw)
        out.append(f'<text x="{lw - 6}" y="{y + bh - 4}" text-anchor="end" class="label">{escape(label)}</text>')
        for s, c in enumerate(counts):
            if c:
                w = c / top * pw
                out.append(f'<rect class="bar s{s}" x="{x:.1f}" y="{y}" width="{max(w, 1):.1f}" height="{bh}" '
                           f'fill="{COLORS[s % 3]}"><title>{c:,} {escape(series[s])}</title></rect>')
                x += w
        out.append(f'<text x="{x + 6:.1f}" y="{y + bh - 4}" class="label">{sum(counts):,}</text>')
    out.append("</svg>")
    return "".join(out)
