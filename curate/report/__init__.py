"""``report.html``: one self-contained page about a run (``curate report OUT``; written at the end of every run).

It shows the funnel (rows in, removed per stage and reason), histograms of the scores the
run has (CLIP score, caption perplexity, image size, caption length) with the configured
thresholds drawn on them, image grids of kept rows and of rejected rows per reason,
duplicate groups side by side, the models used and a warning banner for models that ran
with random weights.  Only the columns present in the output are shown, so it works for
any pipeline.  Images are inlined as small JPEG thumbnails and charts as inline SVG:
the file needs no network and no JavaScript.
"""

from __future__ import annotations

import logging
from pathlib import Path

from curate.layout import Layout

log = logging.getLogger(__name__)


def build_report(output_dir: str | Path, samples: int = 24, per_reason: int = 8, dup_groups: int = 8,
                 thumb_px: int = 160) -> str:
    """The report's HTML for an output directory."""
    from curate.report.data import collect
    from curate.report.html import render

    return render(collect(output_dir, samples=samples, per_reason=per_reason, dup_groups=dup_groups,
                          thumb_px=thumb_px))


def write_report(output_dir: str | Path, path: str | Path | None = None, **options) -> Path:
    """Write ``report.html`` (default ``OUTPUT_DIR/report.html``) atomically; returns its path."""
    from curate.io.files import write_text_atomic
    from curate.io.remote import output_root

    target = output_root(path) if path else Layout(output_root(output_dir)).report
    html = build_report(output_dir, **options)
    write_text_atomic(html, target)
    log.info("report: %s (%.0f kB)", target, len(html.encode()) / 1024)
    return target


__all__ = ["build_report", "write_report"]
