"""report.html: content for full and partial outputs, and rendering in a real browser (headless Chromium)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from explore_helpers import WARNING, make_output

from curate.cli import main
from curate.report import build_report, write_report
from curate.report.metrics import find_thresholds

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]
#: appended to a copy of the report: what the browser rendered, written into the DOM for --dump-dom
CHECK_JS = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const charts = Array.from(document.querySelectorAll('svg.chart'));
  const box = (e) => e.getBoundingClientRect();
  const w = document.getElementById('warnings');
  const r = {images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    shown: imgs.filter(i => box(i).width > 8 && box(i).height > 8).length,
    charts: charts.length, histograms: document.querySelectorAll('svg.histogram').length,
    drawn: charts.filter(s => box(s).width > 100 && box(s).height > 20
                              && Array.from(s.querySelectorAll('rect.bar')).some(b => box(b).height > 0)).length,
    thresholds: Array.from(document.querySelectorAll('svg line.threshold')).filter(l => box(l).height > 20).length,
    warning: w ? box(w).height > 20 && getComputedStyle(w).visibility === 'visible' : null,
    width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight};
  const pre = document.createElement('pre'); pre.id = 'curate-check'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium package is not installed and could not be installed "
                    "(.ci/run runs `apt-get install -y chromium` before the tests)")
    return exe


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def rendered(report: Path, tmp: Path) -> dict:
    page = tmp / "check.html"
    page.write_text(report.read_text().replace("</body>", CHECK_JS + "</body>"))
    r = run_chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp / "profile-dom")
    m = re.search(r'<pre id="curate-check">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no check result in the DOM (exit {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def screenshot(report: Path, png: Path, tmp: Path, height: int = 2400) -> "object":
    from PIL import Image

    r = run_chromium([f"--window-size=1400,{height}", f"--screenshot={png}", report.as_uri()], tmp / "profile-shot")
    assert png.exists(), f"no screenshot (exit {r.returncode}): {r.stderr[-2000:]}"
    return Image.open(png).convert("RGB")


def _near(px: tuple, rgb: tuple, tol: int = 24) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, rgb))


def test_report_of_the_demo_run_renders_in_chromium(demo_run_local, tmp_path):
    report = demo_run_local.output / "report.html"
    assert report.exists(), "the run did not write report.html"
    text = report.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<link" not in text and "<script" not in text
    got = rendered(report, tmp_path)
    stats = demo_run_local.stats
    assert got["images"] >= 20 and got["loaded"] == got["images"] and got["shown"] == got["images"], got
    assert got["histograms"] >= 2 and got["drawn"] == got["charts"], got  # + the funnel
    assert got["warning"] is (True if any((s.get("info") or {}).get("warning") for s in stats["stages"]) else None)
    thresholds = find_thresholds(yaml.safe_load((demo_run_local.output / "config.resolved.yaml").read_text()), stats)
    assert got["thresholds"] >= min(1, len(thresholds)), got
    png = tmp_path / "report.png"
    im = screenshot(report, png, tmp_path)
    print(f"screenshot: {png} ({im.size[0]}x{im.size[1]})")
    small = im.resize((im.size[0] // 4, im.size[1] // 4))
    pixels = list(small.getdata())
    colours = len(set(pixels))
    blue = sum(_near(p, (0x2F, 0x6F, 0xDF)) for p in pixels)  # kept bars of the funnel/histograms
    dark = sum(_near(p, (0x1D, 0x24, 0x30), 10) for p in pixels)  # the header
    assert colours > 2000, colours  # photos were painted, not only flat boxes
    assert blue > 500 and dark > 500, (blue, dark)


def test_stages_declare_their_thresholds_in_stats_and_the_report_draws_them(demo_run_local):
    """No guessing from parameter names: each filter states its cut-off, a global one the value its fit
    computed (clip_score's top_fraction, perplexity's keep_fraction)."""
    by_id = {st["id"]: st for st in demo_run_local.stats["stages"]}
    cuts = {sid: [(t["metric"], t["side"], t["name"]) for t in st.get("thresholds", [])] for sid, st in by_id.items()}
    assert cuts["download"] == [("image_size", "min", "min_image_size")]
    assert cuts["caption"] == [("caption_words", "min", "min_words"), ("caption_length", "min", "min_chars")]
    assert cuts["image_size"] == [("image_size", "min", "min_side")]
    assert cuts["clip_score"] == [("clip_score", "min", "threshold")]
    assert cuts["perplexity"] == [("caption_perplexity", "max", "threshold")]
    assert by_id["clip_score"]["thresholds"][0]["value"] == pytest.approx(by_id["clip_score"]["info"]["threshold"])
    assert not cuts["language"] and not cuts["dedup_phash"]  # a language score / a hash distance: not charted
    page = (demo_run_local.output / "report.html").read_text()
    value = by_id["clip_score"]["thresholds"][0]["value"]
    from curate.report.charts import fmt

    assert f"clip_score: keep ≥ {fmt(value)}" in page and "perplexity: keep ≤ " in page


def test_report_draws_every_part_on_a_full_output(tmp_path):
    out = make_output(tmp_path / "out")
    page = build_report(out)
    for section in ("funnel", "distributions", "models", "kept", "rejected", "duplicates", "config"):
        assert f'id="{section}"' in page
    assert WARNING in page and 'class="warning"' in page
    for title in ("CLIP score", "Caption perplexity", "Image size", "Caption length (characters)"):
        assert title in page
    assert "clip_score: keep ≥ 0.2" in page and "download: keep ≥ 16" in page  # thresholds from the config
    assert page.count('class="threshold"') == 2
    assert page.count('class="dupgroup"') == 3 and page.count("card lead") == 3 and page.count("card dup") == 3
    assert "tiny/random-init" in page and "clip_score_too_low" in page
    assert page.count('src="data:image/jpeg;base64,') == 12 + 5 + 6  # kept, rejected, duplicate groups
    path = write_report(out)
    assert path == out / "report.html" and path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    other = out / "elsewhere" / "r.html"
    assert main(["report", str(out), "--out", str(other), "--samples", "3", "--per-reason", "1"]) == 0
    assert other.read_text().count('src="data:image/jpeg;base64,') == 3 + 2 + 6


def test_report_of_a_partial_output_shows_what_exists(tmp_path):
    from curate import schema as S

    drop = (S.CLIP_SCORE, S.CAPTION_PERPLEXITY, S.DUPLICATE_OF, S.DUPLICATE_KIND, S.IMAGE_EMBEDDING,
            S.TEXT_EMBEDDING, S.CLIP_MODEL)
    out = make_output(tmp_path / "out", rejected=False, drop=drop)
    page = build_report(out)
    assert "CLIP score" not in page and "Caption perplexity" not in page
    assert "Image size" in page and "Caption length (characters)" in page
    assert "No rejected rows." in page and "no deduplication stage" in page
    assert page.count('src="data:image/jpeg;base64,') == 12
    everything_rejected = make_output(tmp_path / "gone", all_rejected=True)
    page = build_report(everything_rejected)
    assert "No kept rows." in page and "clip_score_too_low" in page


def test_report_renders_partial_output_in_chromium(tmp_path):
    out = make_output(tmp_path / "out")
    got = rendered(write_report(out), tmp_path)
    assert got["images"] == 23 and got["loaded"] == 23 and got["shown"] == 23, got
    assert got["histograms"] == 4 and got["drawn"] == 5 and got["thresholds"] == 2 and got["warning"] is True, got
