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


def _s3_rows(fs, prefix: str) -> pa.Table:
    files = sorted(fs.find(prefix))
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]) if files else None


@pytest.fixture(scope="module")
def light_ref(demo_input, tmp_path_factory):
    """The light demo pipeline with a local input and output: what every S3 run must equal."""
    import curate

    return curate.run(_light(demo_config(demo_input, tmp_path_factory.mktemp("ref") / "out"))).output


def _s3_config(endpoint: str, inp: str, out: str, work=None, **over) -> dict:
    cfg = _light(demo_config(inp, out, **over))  # type: ignore[arg-type]
    cfg["input"]["path"], cfg["output"]["path"] = inp, out
    if work is not None:
        cfg["output"]["work_path"] = str(work)
    cfg["storage"] = {"endpoint_url": endpoint}
    return cfg


def test_demo_from_s3_to_s3_on_both_runners_and_the_tools_read_it(s3, demo_input, light_ref, tmp_path,
                                                                  ray_cluster, monkeypatch, capsys):
    import curate
    from curate.cli import main
    from curate.io.remote import output_root
    from curate.query import query

    endpoint, fs = s3
    _upload(fs, pq.read_table(demo_input), "demo/in/demo.parquet")
    # the work folder: local (explicit), a URI of its own (explicit), and by default OUTPUT/_work on the store
    for kind, work in (("local", tmp_path / "work-local"), ("local", f"s3://{BUCKET}/demo/work-uri"),
                       ("ray", None)):
        name = kind if work is None or not str(work).startswith("s3:") else "uri"
        uri = f"s3://{BUCKET}/demo/out-{name}"
        res = curate.run(_s3_config(endpoint, f"s3://{BUCKET}/demo/in/", uri, work, **{"runner.kind": kind}))
        assert str(res.output) == uri
        keys = {k.split("/out-" + name + "/", 1)[1] for k in fs.find(f"{BUCKET}/demo/out-{name}")}
        assert {"stats.json", "report.html", "config.resolved.yaml"} <= keys
        assert not [k for k in keys if k.endswith(".tmp")]
        if work is None:  # every step's work is in the bucket: bases, groups, views, markers, states
            assert "_work/run.json" in keys and any(k.startswith("_work/state/") for k in keys)
            assert any(k.startswith("_work/view-") for k in keys) and any(k.startswith("_work/ingest/") for k in keys)
        elif name == "uri":
            assert fs.exists(f"{BUCKET}/demo/work-uri/run.json") and not [k for k in keys if k.startswith("_work")]
        else:
            assert (work / "run.json").exists() and not [k for k in keys if k.startswith("_work")]
        for sub in ("data", "rejected"):
            got = _s3_rows(fs, f"{BUCKET}/demo/out-{kind}/{sub}")
            assert rows_by_uid(got) == rows_by_uid(read_dir(light_ref / sub)), f"{kind}: {sub}/ differs"
    # the tools read an output on S3 (endpoint from the usual environment)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    output_root("s3://x").fs.clear_instance_cache()
    uri = f"s3://{BUCKET}/demo/out-ray"
    sql = "SELECT reject_reason, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1 NULLS FIRST"
    assert query(uri, sql).to_pylist() == query(light_ref, sql).to_pylist()
    assert main(["stats", str(light_ref)]) == 0
    local = capsys.readouterr().out
    assert main(["stats", uri]) == 0
    got = capsys.readouterr().out
    def counts(text: str) -> str:
        return text.splitlines()[0].split("time:")[0]

    assert counts(got) == counts(local) and "rows in: 240" in got  # the funnel's counts
    assert main(["query", uri, "SELECT count(*) AS n FROM kept", "--format", "json"]) == 0
    kept = query(light_ref, "SELECT count(*) AS n FROM kept")["n"][0].as_py()
    assert json.loads(capsys.readouterr().out) == [{"n": kept}]
    fs.rm(f"{BUCKET}/demo/out-ray/report.html")
    assert main(["report", uri]) == 0
    assert b"curate report" in fs.cat(f"{BUCKET}/demo/out-ray/report.html")
    assert main(["export", uri, "--format", "webdataset", "--shard-size", "25"]) == 0
    assert main(["export", uri, "--format", "datacomp-uids", "--hash-uids"]) == 0
    assert fs.exists(f"{BUCKET}/demo/out-ray/export/datacomp_uids.npy")
    tars = sorted(fs.glob(f"{BUCKET}/demo/out-ray/export/webdataset/*.tar"))
    import tarfile

    members = [m.name for t in tars for m in tarfile.open(fileobj=io.BytesIO(fs.cat(t))).getmembers()]
    assert len([m for m in members if m.endswith(".json")]) == kept


def test_kill_and_resume_with_the_output_on_s3(s3, demo_input, light_ref, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import yaml

    endpoint, fs = s3
    _upload(fs, pq.read_table(demo_input), "resume/in/demo.parquet")
    uri = f"s3://{BUCKET}/resume/out"  # its work folder: resume/out/_work in the bucket
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_s3_config(endpoint, f"s3://{BUCKET}/resume/in/", uri,
                                                  **{"input.shard_size": 20})))
    cmd = [sys.executable, "-m", "curate.cli", "run", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240

    def done() -> int:
        return len(fs.find(f"{BUCKET}/resume/out/_work/done/", prefix="seg-"))

    while done() < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; use more shards"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not fs.exists(f"{BUCKET}/resume/out/stats.json")
    assert not [k for k in fs.find(f"{BUCKET}/resume/out") if k.endswith(".tmp")]
    assert not list(tmp_path.glob("**/*.parquet"))  # nothing of the run on the local disk: it resumes from the bucket
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming the run" in res.stderr
    todo = [(int(a), int(b)) for a, b in re.findall(r"segment 0 \(.*\): (\d+) of (\d+) shards to do", res.stderr)]
    assert todo and todo[0][0] < todo[0][1], res.stderr[-2000:]  # the finished shards were not redone
    for sub in ("data", "rejected"):
        assert rows_by_uid(_s3_rows(fs, f"{BUCKET}/resume/out/{sub}")) == rows_by_uid(read_dir(light_ref / sub))
    # another machine (another work folder) does not silently build on it
    import curate
    from curate.config import ConfigError

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["output"]["work_path"] = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="holds a curate output whose work folder"):
        curate.run(cfg)


def test_a_failed_upload_leaves_no_object(s3):
    from curate.io.files import _atomic, write_bytes_atomic
    from curate.io.remote import upath

    endpoint, fs = s3
    target = upath(f"s3://{BUCKET}/atomic/shard.parquet", None)
    target = type(target)(str(target), endpoint_url=endpoint)

    def half(f) -> None:
        f.write(b"x" * (6 * 2**20))  # past s3fs's 5 MiB block: a multipart upload is under way
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        _atomic(target, half)
    assert not fs.exists(f"{BUCKET}/atomic/shard.parquet")
    assert not fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads")  # aborted, not left open
    write_bytes_atomic(b"whole", target)
    assert fs.cat(f"{BUCKET}/atomic/shard.parquet") == b"whole"


def test_the_work_folder_may_be_a_uri_and_a_uri_output_keeps_its_work_beside_it(tmp_path):
    from curate.config import Config
    from curate.pipeline import output_layout

    base = {"input": {"path": "in.parquet"}, "stages": []}
    a = output_layout(Config.model_validate({**base, "output": {"path": "s3://b/one"}}))
    b = output_layout(Config.model_validate({**base, "output": {"path": "s3://b/two/"}}))
    assert str(a.root) == "s3://b/one" and str(a.work) == "s3://b/one/_work" and str(b.work) == "s3://b/two/_work"
    assert a.data == a.root / "data"
    w = output_layout(Config.model_validate({**base, "output": {"path": "s3://b/o", "work_path": "s3://b/w/"}}))
    assert str(w.work) == "s3://b/w" and str(w.done("seg-0")) == "s3://b/w/done/seg-0"
    local = output_layout(Config.model_validate({**base, "output": {"path": str(tmp_path / "o")}}))
    assert local.work == tmp_path / "o" / "_work"  # a local output keeps its _work/
    same = Config.model_validate({**base, "output": {"path": "s3://b/one", "work_path": str(tmp_path / "w")}})
    assert same.work_hash() == Config.model_validate({**base, "output": {"path": "s3://b/one"}}).work_hash()
