"""The download stage on the demo corpus: every kind of row ends where it should, nothing is lost."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from helpers import manifest, read_dir

EXPECTED = {  # manifest kind -> (reject_reason, error_type); None = kept by download
    "http_404": ("download_failed", "http_404"),
    "corrupt": ("decode_failed", "decode_error"),
    "not_image": ("decode_failed", "decode_error"),
    "noai": ("opted_out", "x_robots_tag"),
    "slow": ("download_failed", "timeout"),
    "missing_url": ("missing_url", None),
    "unsupported_scheme": ("unsupported_scheme", None),
    "malformed_url": ("malformed_url", None),
    "missing_caption": ("missing_caption", None),
    "duplicate_row": ("duplicate_uid", None),
}


def test_every_row_once_with_its_reason(demo_run_local, demo_site):
    out = demo_run_local.output
    kept, rejected = read_dir(out / "data"), read_dir(out / "rejected")
    rows = {r["uid"] + f"#{r['source_row']}": r for r in kept.to_pylist() + rejected.to_pylist()}
    truth = manifest(demo_site)
    assert kept.num_rows + rejected.num_rows == len(truth)
    assert len(rows) == len(truth)  # exactly once
    by_row = {r["source_row"]: r for r in rows.values()}
    for m in truth:
        r = by_row[m["row"]]
        want = EXPECTED.get(m["kind"])
        if want is not None:
            assert (r["reject_reason"], r["error_type"]) == want, (m, r["reject_reason"], r["reject_detail"])
            assert r["reject_stage"] in ("input", "unique_uid", "download")
        elif r["reject_stage"] in ("input", "unique_uid", "download"):
            # a valid image may only fail the download stage's own size rules
            assert r["reject_reason"] in ("image_too_small", "aspect_ratio_too_large"), (m, r["reject_detail"])


def test_kept_images_are_resized_and_hashed(demo_run_local, demo_site):
    out = demo_run_local.output
    kept = read_dir(out / "data")
    truth = {m["row"]: m for m in manifest(demo_site)}
    files = Path(demo_site) / "files"
    assert kept.num_rows > 150
    for r in kept.to_pylist()[:60]:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "JPEG"
        assert (img.width, img.height) == (r["width"], r["height"])
        assert min(r["width"], r["height"]) <= 256  # keep_ratio: shorter side <= image_size
        m = truth[r["source_row"]]
        assert (r["original_width"], r["original_height"]) == (m["width"], m["height"])
        body = (files / m["path"].lstrip("/")).read_bytes()
        assert r["image_sha256"] == hashlib.sha256(body).hexdigest()
        assert r["download_status"] == "success"


def test_stats_json_counts(demo_run_local):
    stats = json.loads((demo_run_local.output / "stats.json").read_text())
    stages = stats["stages"]
    assert [s["id"] for s in stages][:3] == ["input", "unique_uid", "download"]
    for a, b in zip(stages, stages[1:]):
        assert a["rows_out"] == b["rows_in"]
    for s in stages:
        assert s["rows_in"] - s["rows_out"] == sum(s["rejected"].values())
        assert s["seconds"] >= 0
    dl = next(s for s in stages if s["id"] == "download")
    assert dl["errors"].get("http_404", 0) > 0 and dl["errors"].get("timeout", 0) > 0
    assert stats["run"]["rows_in"] == stages[0]["rows_in"]
    assert (demo_run_local.output / "config.resolved.yaml").exists()


def test_download_worker_loads_only_the_img2dataset_parts_it_uses():
    """A download worker imports img2dataset's resizer and X-Robots-Tag check, not its whole CLI
    (whose webdataset writer imports torch: seconds and ~700 MB per worker); a later full
    ``import img2dataset`` in the same process still gets the real package."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from curate.stages.download import Download\n"
        "st = Download(Download.Params(allow_networks=['127.0.0.0/8']))\n"
        "st.setup()\n"
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))\n"
        "from img2dataset import download\n"
        "import img2dataset.resizer\n"
        "print(callable(download), img2dataset.resizer.Resizer.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] == "[]"
    assert lines[1] == "True img2dataset.resizer"
