"""Row groups of data/ and rejected/: at most output.row_group_rows rows and about output.row_group_bytes
bytes each, whichever is hit first, on both runners; the rows themselves never change."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import rows_by_uid

ROWS = 45  # two shards of 30 and 15 rows


def _noise_jpeg(i: int, side: int) -> bytes:
    """A JPEG of noise (compresses badly: a 64-px one is several KB)."""
    px = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images_input(tmp_path_factory):
    """Rows with their images: every 3rd too small (rejected by image_size), two without a caption (rejected
    at ingest), two copies of earlier images (rejected by dedup_exact, a global stage: two segments)."""
    rows = []
    for i in range(ROWS):
        rows.append({"url": f"http://127.0.0.1:9/{i}.jpg",
                     "caption": None if i in (5, 17) else f"noise picture number {i}",
                     "jpg": _noise_jpeg(i - 39 if i in (40, 41) else i, 8 if i % 3 == 0 else 64)})
    path = tmp_path_factory.mktemp("rg-input") / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _config(inp, out, runner: str = "local", **output) -> dict:
    return {"input": {"path": str(inp), "image_col": "jpg", "shard_size": 30},
            "output": {"path": str(out), **output},
            "runner": {"kind": runner, **({"num_cpus": 2} if runner == "ray" else {})},
            "stages": [{"stage": "download"}, {"stage": "image_size", "min_side": 16}, {"stage": "dedup_exact"}]}


def _groups(path) -> list[tuple[int, int]]:
    """(rows, total_byte_size) of each row group of a Parquet file."""
    md = pq.ParquetFile(path).metadata
    return [(md.row_group(i).num_rows, md.row_group(i).total_byte_size) for i in range(md.num_row_groups)]


def _files(out) -> dict[str, list]:
    return {sub: sorted((out / sub).glob("*.parquet")) for sub in ("data", "rejected")}


def _same_rows(a, b) -> None:
    """The same files with the same rows in the same order (row groups aside)."""
    fa, fb = _files(a), _files(b)
    assert {k: [f.name for f in v] for k, v in fa.items()} == {k: [f.name for f in v] for k, v in fb.items()}
    for sub in fa:
        for x, y in zip(fa[sub], fb[sub]):
            assert pq.read_table(x).equals(pq.read_table(y)), f"{sub}/{x.name} differs"


@pytest.fixture(scope="module")
def one_group(images_input, tmp_path_factory):
    """The run with bounds too large to matter: one row group per file."""
    import curate

    out = tmp_path_factory.mktemp("rg-one") / "out"
    curate.run(_config(images_input, out, row_group_rows=10**6, row_group_bytes=10**12))
    for files in _files(out).values():
        assert files and all(len(_groups(f)) == 1 for f in files)
    return out


def test_defaults_and_validation():
    from curate.config import ConfigError, load_config

    cfg = {"input": {"path": "x.parquet"}, "output": {"path": "out"}}
    out = load_config(cfg).output
    assert (out.row_group_rows, out.row_group_bytes) == (1000, 64 << 20)
    for key in ("row_group_rows", "row_group_bytes"):
        with pytest.raises(ConfigError, match=key):
            load_config({**cfg, "output": {"path": "out", key: 0}})


def test_the_row_bound(images_input, one_group, tmp_path):
    import curate

    out = tmp_path / "out"
    res = curate.run(_config(images_input, out, row_group_rows=4))
    files = _files(out)
    assert res.stats["run"]["kept"] > 8 and res.stats["run"]["rejected"] > 8
    for sub in ("data", "rejected"):
        sizes = [[n for n, _ in _groups(f)] for f in files[sub]]
        assert all(n <= 4 for s in sizes for n in s), f"{sub}: {sizes}"
        assert any(len(s) > 1 for s in sizes), f"{sub}: {sizes}"
        # full groups but the last: the byte bound (64 MiB) never decides here
        assert all(all(n == 4 for n in s[:-1]) for s in sizes), f"{sub}: {sizes}"
    _same_rows(out, one_group)


def test_the_byte_bound_decides_for_large_rows(images_input, one_group, tmp_path):
    import curate

    bound = 20_000  # a 64-px noise JPEG is several KB: a few rows a group
    out = tmp_path / "out"
    curate.run(_config(images_input, out, row_group_rows=1000, row_group_bytes=bound))
    for sub, files in _files(out).items():
        for f in files:
            images = pq.read_table(f, columns=["image"])["image"].to_pylist()
            groups = _groups(f)
            assert max(n for n, _ in groups) < 1000
            assert len(groups) > 1 or sum(len(b or b"") for b in images) <= bound, (sub, f.name, groups)
            start = 0
            for n, size in groups:
                got = sum(len(b or b"") for b in images[start:start + n])
                if n > 1:  # a group's rows (images and all the other columns) fit the bound
                    assert got <= bound and size <= 1.5 * bound, (sub, f.name, groups)
                if start + n < len(images):  # and it ends because the next row would not fit
                    assert got + len(images[start + n] or b"") > bound * 0.8, (sub, f.name, groups)
                start += n
    big = [f for f in _files(out)["data"] if pq.read_metadata(f).num_rows > 10]
    assert big and all(len(_groups(f)) >= 4 for f in big)
    _same_rows(out, one_group)


def test_changing_the_bounds_redoes_only_the_last_segment(images_input, one_group, tmp_path, caplog):
    import logging

    import curate

    out = tmp_path / "out"
    curate.run(_config(images_input, out, row_group_rows=4))
    with caplog.at_level(logging.INFO, logger="curate.pipeline"):
        res = curate.run(_config(images_input, out, row_group_rows=7))
    assert [s["reused"] for s in res.segments] == [True, False]
    assert "segment 1 (dedup_exact): redone -- output settings changed (row_group_rows)" in caplog.text
    rows = [n for files in _files(out).values() for f in files for n, _ in _groups(f)]
    assert max(rows) == 7
    run = json.loads((out / "_work" / "run.json").read_text())
    assert run["segments"][-1]["output"] == {"compression": "zstd", "row_group_rows": 7,
                                             "row_group_bytes": 64 << 20}
    _same_rows(out, one_group)


def test_refilter_writes_bounded_row_groups(one_group, tmp_path):
    from curate.subset import refilter

    refilter(one_group, tmp_path / "sub", "source_row % 2 = 0", row_group_rows=3)
    for sub in ("data", "rejected"):
        files = sorted((tmp_path / "sub" / sub).glob("*.parquet"))
        assert files and all(n <= 3 for f in files for n, _ in _groups(f))


@pytest.mark.ray
def test_the_ray_runner_bounds_its_row_groups(images_input, one_group, ray_cluster, tmp_path):
    import curate

    out = tmp_path / "ray"
    curate.run(_config(images_input, out, runner="ray", row_group_rows=4))
    files = _files(out)
    for sub in ("data", "rejected"):
        sizes = [[n for n, _ in _groups(f)] for f in files[sub]]
        assert all(n <= 4 for s in sizes for n in s) and any(len(s) > 1 for s in sizes), f"{sub}: {sizes}"
    _same_rows(out, one_group)
    for sub in ("data", "rejected"):
        a = pa.concat_tables([pq.read_table(f) for f in files[sub]])
        b = pa.concat_tables([pq.read_table(f) for f in _files(one_group)[sub]])
        assert rows_by_uid(a) == rows_by_uid(b)


def test_the_writer_alone(tmp_path):
    """A row larger than the byte bound is a group alone; an empty table keeps its schema; the bytes counted
    are the rows' actual sizes (images of different sizes make groups of different row counts)."""
    from curate.io.files import row_group_cuts, row_sizes, write_parquet_atomic

    images = [b"x" * 100] * 10 + [b"y" * 5000] + [b"z" * 1000] * 4 + [None]
    t = pa.table({"n": pa.array(range(len(images)), pa.int32()), "image": pa.array(images, pa.binary()),
                  "emb": pa.array([[0.0] * 4] * len(images), pa.list_(pa.float16()))})
    sizes = row_sizes(t)
    assert sizes[0] == 100 + 4 + 4 + 4 * 2 + 4 and sizes[-1] == 4 + 4 + 4 * 2 + 4
    assert abs(sizes.sum() - t.nbytes) < 0.05 * t.nbytes
    assert row_group_cuts(t, 1000, 1200) == [0, 10, 11, 12, 13, 14, 16]
    assert row_group_cuts(t, 3, 10**9) == [0, 3, 6, 9, 12, 15, 16]
    write_parquet_atomic(t, tmp_path / "t.parquet", row_group_rows=1000, row_group_bytes=1200)
    assert [n for n, _ in _groups(tmp_path / "t.parquet")] == [10, 1, 1, 1, 1, 2]
    assert pq.read_table(tmp_path / "t.parquet").equals(t)
    write_parquet_atomic(t.slice(0, 0), tmp_path / "e.parquet", row_group_rows=3, row_group_bytes=10)
    e = pq.read_table(tmp_path / "e.parquet")
    assert e.num_rows == 0 and e.schema.equals(t.schema)
