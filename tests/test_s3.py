"""Input on object storage: a real S3 API server (moto) on 127.0.0.1; pyarrow and s3fs talk to it."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import demo_config
from helpers import read_dir, rows_by_uid

BUCKET = "corpus"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port with one bucket; yields (endpoint, s3fs filesystem)."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    yield endpoint, fs
    server.stop()


def _upload(fs, table: pa.Table, key: str) -> None:
    with fs.open(f"{BUCKET}/{key}", "wb") as f:
        pq.write_table(table, f)


def _light(cfg: dict) -> dict:
    """The demo pipeline without its model stages (they are not what this file tests)."""
    cfg["stages"] = [st for st in cfg["stages"] if st["stage"] in
                     ("download", "dedup_exact", "phash", "dedup_phash", "caption", "image_size", "aspect_ratio")]
    return cfg


def test_input_on_s3_equals_the_local_input_on_both_runners(s3, demo_input, tmp_path, ray_cluster):
    import curate

    endpoint, fs = s3
    table = pq.read_table(demo_input)
    _upload(fs, table.slice(0, 100), "run1/part-0.parquet")
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in table.slice(100, 60).to_pylist())
    with fs.open(f"{BUCKET}/run1/part-1.jsonl.gz", "wb") as f:
        f.write(gzip.compress(lines))
    local_dir = tmp_path / "local-input"
    local_dir.mkdir()
    pq.write_table(table.slice(0, 100), local_dir / "part-0.parquet")
    (local_dir / "part-1.jsonl.gz").write_bytes(gzip.compress(lines))

    ref = curate.run(_light(demo_config(local_dir, tmp_path / "ref"))).output
    outs = {}
    for kind in ("local", "ray"):
        cfg = _light(demo_config(f"s3://{BUCKET}/run1/", tmp_path / kind, **{"runner.kind": kind}))
        cfg["storage"] = {"endpoint_url": endpoint}
        outs[kind] = curate.run(cfg)
    for kind, res in outs.items():
        for sub in ("data", "rejected"):
            got, want = read_dir(res.output / sub), read_dir(ref / sub)
            assert rows_by_uid(got) == rows_by_uid(want), f"{kind}: {sub}/ differs from the local input's"
        files = read_dir(res.output / "data")["source_file"].unique().to_pylist()
        assert all(f.startswith(f"s3://{BUCKET}/run1/part-") for f in files)
        manifest = json.loads((res.output / "_work" / "input_manifest.json").read_text())
        assert [e["path"] for e in manifest["files"]] == [f"s3://{BUCKET}/run1/part-0.parquet",
                                                         f"s3://{BUCKET}/run1/part-1.jsonl.gz"]
        assert all(e["etag"] and e["size"] > 0 for e in manifest["files"])


def test_a_changed_object_is_refused_on_resume(s3, demo_input, tmp_path):
    import curate
    from curate.io.files import InputError

    endpoint, fs = s3
    table = pq.read_table(demo_input).slice(0, 40)
    _upload(fs, table, "run2/a.parquet")
    cfg = _light(demo_config(f"s3://{BUCKET}/run2/*.parquet", tmp_path / "out"))
    cfg["storage"] = {"endpoint_url": endpoint}
    curate.run(cfg)
    curate.run(cfg)  # same objects: a resume
    _upload(fs, table.slice(0, 39), "run2/a.parquet")  # rewritten: another ETag and size
    with pytest.raises(InputError, match=r"input changed.*a\.parquet"):
        curate.run(cfg)


def test_unreachable_or_empty_locations_are_one_line_errors(s3, tmp_path):
    import curate
    from curate.io.files import InputError

    endpoint, _ = s3
    cfg = {"input": {"path": f"s3://{BUCKET}/nothing-here/"}, "output": {"path": str(tmp_path / "o")},
           "storage": {"endpoint_url": endpoint}, "stages": []}
    with pytest.raises(InputError, match="no parquet/csv/jsonl files at s3://corpus/nothing-here/"):
        curate.run(cfg)


def test_query_and_stats_read_an_output_copied_to_s3(s3, demo_input, tmp_path, monkeypatch, capsys):
    from curate.cli import main
    from curate.io.remote import output_root
    from curate.query import query

    import curate

    endpoint, fs = s3
    small = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(demo_input).slice(0, 60), small)
    out = curate.run(_light(demo_config(small, tmp_path / "out"))).output
    fs.put(str(out / "data"), f"{BUCKET}/outputs/run1/data", recursive=True)
    fs.put(str(out / "rejected"), f"{BUCKET}/outputs/run1/rejected", recursive=True)
    fs.put(str(out / "stats.json"), f"{BUCKET}/outputs/run1/stats.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the usual environment says where S3 is
    output_root("s3://x").fs.clear_instance_cache()
    uri = f"s3://{BUCKET}/outputs/run1"
    sql = "SELECT reject_reason, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1 NULLS FIRST"
    assert query(uri, sql).to_pylist() == query(out, sql).to_pylist()
    assert main(["stats", str(out)]) == 0
    local = capsys.readouterr().out
    assert main(["stats", uri]) == 0
    assert capsys.readouterr().out == local
    assert main(["query", uri, "SELECT count(*) AS n FROM kept", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == [{"n": query(out, "SELECT count(*) AS n FROM kept")["n"][0].as_py()}]
