"""Inputs that already hold their images: img2dataset's own output folders (parquet and webdataset),
plain webdataset tars and a Parquet image column start the pipeline after the download stage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import demo_config
from helpers import read_dir, rows_by_uid

ROWS = 60


def _img2dataset(inp, out, fmt: str) -> None:
    """The img2dataset CLI itself, on the demo rows (all on the loopback demo server)."""
    cmd = [sys.executable, "-m", "img2dataset.main", f"--url_list={inp}", "--input_format=parquet",
           "--url_col=url", "--caption_col=caption", f"--output_format={fmt}", f"--output_folder={out}",
           "--processes_count=1", "--thread_count=8", "--image_size=64", "--resize_mode=keep_ratio",
           "--encode_format=jpg", "--timeout=2", "--number_sample_per_shard=25", "--enable_wandb=False",
           "--distributor=multiprocessing", "--compute_hash=sha256", "--retries=0",
           "--save_additional_columns=['uid']"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)


@pytest.fixture(scope="module")
def i2d_folders(demo_input, demo_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("i2d")
    small = root / "rows.parquet"
    pq.write_table(pq.read_table(demo_input).slice(0, ROWS), small)
    out = {}
    for fmt in ("parquet", "webdataset"):
        _img2dataset(small, root / fmt, fmt)
        out[fmt] = root / fmt
    return out


def _listed(folder) -> pa.Table:
    """Every row img2dataset listed, with its status (its parquet files; for webdataset, the sidecars)."""
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))], promote_options="permissive")


def by_key_ok(ok: pa.Table) -> list[str]:
    return ok["key"].to_pylist()


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_an_img2dataset_folder_is_curated_without_downloading(i2d_folders, demo_server, tmp_path, fmt):
    import curate

    folder = i2d_folders[fmt]
    listed = _listed(folder)
    ok = listed.filter(pa.compute.equal(listed["status"], "success"))
    assert 0 < ok.num_rows < listed.num_rows  # the demo rows include 404s, timeouts, bad bodies
    before = demo_server.hits
    res = curate.run(demo_config(folder, tmp_path / "out", **{"input.format": "img2dataset"}))
    assert demo_server.hits == before, "the images are in the input: nothing is downloaded"
    assert "download" not in [s["id"] for s in res.stats["stages"]]
    data, rej = read_dir(tmp_path / "out" / "data"), read_dir(tmp_path / "out" / "rejected")
    assert data.num_rows + rej.num_rows == listed.num_rows  # every row img2dataset listed, once
    reasons = {r["key"]: r["reject_reason"] for r in rej.to_pylist()}
    not_ok = [r["key"] for r in listed.to_pylist() if r["status"] != "success"]
    assert all(k in reasons for k in not_ok)  # img2dataset's failures are rejected, never kept
    assert list(reasons.values()).count("download_failed") >= len(not_ok) - 5  # a few fail ingest checks first
    assert all(reasons[k] != "download_failed" for k in by_key_ok(ok) if k in reasons)
    # the bytes, sizes and hashes are img2dataset's
    by_key = {r["key"]: r for r in ok.to_pylist()}
    image_col = "jpg" if fmt == "parquet" else None
    tars = {}
    if image_col is None:
        for t in folder.glob("*.tar"):
            with tarfile.open(t) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".jpg"):
                        tars[m.name[:-4]] = tf.extractfile(m).read()
    assert data.num_rows > 10
    for r in data.to_pylist():
        src = by_key[r["key"]]
        assert r["image"] == (src[image_col] if image_col else tars[r["key"]])
        assert (r["width"], r["height"]) == (src["width"], src["height"])
        assert (r["original_width"], r["original_height"]) == (src["original_width"], src["original_height"])
        assert r["image_sha256"] == src["sha256"]
        assert r["clip_score"] is not None  # the model stages ran on them
        assert Image.open(io.BytesIO(r["image"])).size == (r["width"], r["height"])


def test_local_and_ray_agree_on_an_img2dataset_folder(i2d_folders, ray_cluster, tmp_path):
    import curate

    folder = i2d_folders["webdataset"]

    def cfg(out, **over):  # the image stages only: the model stages ran on both formats above
        c = demo_config(folder, out, **{"input.format": "img2dataset"}, **over)
        c["stages"] = [st for st in c["stages"] if st["stage"] in
                       ("download", "dedup_exact", "phash", "dedup_phash", "caption", "image_size")]
        return c

    a = curate.run(cfg(tmp_path / "local")).output
    b = curate.run(cfg(tmp_path / "ray", **{"runner.kind": "ray"})).output
    assert read_dir(a / "data").num_rows > 10
    for sub in ("data", "rejected"):
        assert rows_by_uid(read_dir(a / sub)) == rows_by_uid(read_dir(b / sub)), sub


def _jpeg(color, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_plain_webdataset_tars_and_hostile_samples(tmp_path):
    import curate

    d = tmp_path / "wds"
    d.mkdir()
    with tarfile.open(d / "shard-000.tar", "w") as tf:
        for i in range(8):
            key = f"s{i:03d}"
            _add(tf, f"{key}.jpg", _jpeg((30 * i, 80, 200 - 20 * i)))
            _add(tf, f"{key}.txt", f"a small photo number {i} of colour blocks".encode())
            _add(tf, f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg", "source": "test"}).encode())
        _add(tf, "bad.jpg", b"not an image at all")
        _add(tf, "bad.txt", b"a caption for a broken image file")
        _add(tf, "nocap.jpg", _jpeg((1, 2, 3)))
        _add(tf, "huge.jpg", b"\xff" * 5000)
        _add(tf, "huge.txt", b"a caption for an image over the byte limit")
    cfg = {"input": {"path": str(d), "format": "webdataset", "max_image_bytes": 4096, "shard_size": 5},
           "output": {"path": str(tmp_path / "out")},
           "stages": [{"stage": "download"}, {"stage": "dedup_exact"}, {"stage": "phash"},
                      {"stage": "caption", "min_words": 3}]}
    res = curate.run(cfg)
    data, rej = read_dir(tmp_path / "out" / "data"), read_dir(tmp_path / "out" / "rejected")
    assert data.num_rows + rej.num_rows == 11
    assert sorted(data["key"].to_pylist()) == [f"s{i:03d}" for i in range(8)]
    reasons = {r["key"]: r["reject_reason"] for r in rej.to_pylist()}
    assert reasons == {"bad": "decode_failed", "nocap": "missing_caption", "huge": "image_too_large"}
    assert data["url"].to_pylist()[0].startswith("https://example.com/")  # metadata only: never fetched
    assert all(x is not None for x in data["phash"].to_pylist())
    assert res.stats["run"]["rows_in"] == 11


def test_a_parquet_image_column(tmp_path):
    import curate

    rows = [{"caption": f"three colour blocks number {i}", "img": _jpeg((10 * i, 100, 50))} for i in range(6)]
    rows.append({"caption": "an empty image cell here", "img": None})
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    cfg = {"input": {"path": str(src), "image_col": "img"}, "output": {"path": str(tmp_path / "out")},
           "stages": [{"stage": "download"}, {"stage": "image_size", "min_side": 8}]}
    curate.run(cfg)
    data, rej = read_dir(tmp_path / "out" / "data"), read_dir(tmp_path / "out" / "rejected")
    assert data.num_rows == 6 and rej["reject_reason"].to_pylist() == ["missing_image"]
    assert data["width"].to_pylist() == [48] * 6 and data["height"].to_pylist() == [40] * 6
    import hashlib

    assert sorted(data["image_sha256"].to_pylist()) == sorted(hashlib.sha256(r["img"]).hexdigest() for r in rows[:6])
