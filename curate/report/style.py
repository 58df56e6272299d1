"""The report's stylesheet (inlined into report.html; no external resources)."""

CSS = """
:root { --fg: #1d2430; --muted: #5d6673; --line: #e3e6ea; --bg: #f6f7f9; --kept: #2f6fdf; --bad: #e0483e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #1d2430; color: #fff; padding: 18px 28px 14px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header .sub { color: #c3cad4; font-size: 13px; word-break: break-all; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
      padding: 8px 28px; font-size: 13px; }
nav a { margin-right: 16px; color: var(--kept); text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px 18px;
          margin: 16px 0; }
h2 { font-size: 18px; margin: 2px 0 12px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.warning { background: #fff4e5; border: 2px solid #e8590c; color: #7a2e00; border-radius: 8px; padding: 12px 16px;
           margin: 16px 0; font-size: 15px; }
.warning strong { color: #c2410c; }
.warning ul { margin: 6px 0 0 18px; padding: 0; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0 4px; }
.tile { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.tile b { display: block; font-size: 22px; }
.tile span { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
.chartbox { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.chartbox h3 { margin: 0 0 4px; font-size: 14px; }
.chartbox .note { color: var(--muted); font-size: 12px; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #39414d; }
svg.chart text.thr { fill: #9b1c1c; font-weight: 600; }
svg.chart text.axis { font-size: 12px; fill: #1d2430; }
svg.chart text.label { font-size: 12px; }
.legend { font-size: 12px; color: var(--muted); margin: 2px 0 4px; }
.legend span { margin-right: 14px; white-space: nowrap; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 5px; border-radius: 2px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 176px; margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px;
        padding: 8px; font-size: 12px; overflow-wrap: anywhere; }
.card img { display: block; max-width: 160px; max-height: 160px; margin: 0 auto 6px; border-radius: 3px; }
.card .noimg { height: 100px; display: flex; align-items: center; justify-content: center; text-align: center;
               background: repeating-linear-gradient(45deg, #f1f2f4, #f1f2f4 8px, #e7e9ec 8px, #e7e9ec 16px);
               color: var(--muted); border-radius: 3px; margin-bottom: 6px; padding: 4px; word-break: break-all; }
.card .cap { margin: 0 0 3px; }
.card .meta { color: var(--muted); margin: 0; }
.card .recap { color: #2b5a2b; margin: 3px 0 0; }
.card .why { color: #9b1c1c; margin: 3px 0 0; word-break: break-word; }
.card.lead { border: 2px solid var(--kept); }
.card.dup { border: 2px dashed var(--bad); }
.dupgroup { display: flex; gap: 10px; align-items: flex-start; padding: 10px 0; border-bottom: 1px solid var(--line);
            overflow-x: auto; }
.dupgroup .arrow { align-self: center; color: var(--muted); font-size: 20px; }
.badge { display: inline-block; background: #eef2f7; border-radius: 10px; padding: 0 7px; font-size: 11px;
         color: #3a4553; }
details pre { background: #f3f4f6; padding: 10px; border-radius: 6px; overflow-x: auto; font-size: 12px; }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 24px; }
"""
