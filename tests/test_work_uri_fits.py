"""Global stages' fits with the work folder on object storage (#26): a moto S3 server on 127.0.0.1.

Every global stage is fitted twice on the same rows -- local inputs and a local work folder, then inputs and
work folder in a bucket (``fs.as_path("s3://...")``) -- and ``process`` must give the same rows, reading its
decisions from where the fit wrote them.  The S3 fit writes nothing on the local disk but scratch in the
system temp (DuckDB's spill), gone when it is done, and ``process`` reads at most one decision file per shard.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dedup_corpus as dc
from helpers import storage_restored
from curate import registry
from curate import schema as S
from curate.context import FitContext
from curate.io import fs

BUCKET = "curate-fits"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port with one bucket, set as the run's storage; yields an s3fs
    filesystem on it.  The storage settings are restored afterwards."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        with storage_restored():
            fs.set_storage({"endpoint_url": endpoint})
            yield s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False)
    finally:
        server.stop()


def _tree(root: Path, skip: str) -> dict[str, int]:
    """Every file and folder under ``root`` but ``root/skip``: relative name -> size (-1: a folder)."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[0] != skip:
            out[str(rel)] = -1 if p.is_dir() else p.stat().st_size
    return out


class Runs:
    """Fits a stage on local files, then on the same files in the bucket, and compares."""

    def __init__(self, s3, tmp_path: Path, monkeypatch, name: str) -> None:
        self.s3, self.tmp, self.mp = s3, tmp_path, monkeypatch
        self.prefix = f"{BUCKET}/{name}"
        self.ref = tmp_path / "ref"  # the local fits' work folders (and files of the test's own)

    def inputs(self, table: pa.Table, shard_size: int, extra=None) -> tuple[list[str], list[str]]:
        """The table as work shards: (local paths, their copies in the bucket)."""
        paths = dc.write_shards(table, self.tmp / "inputs", shard_size)
        if extra is not None:
            for p in paths:
                pq.write_table(extra(pq.read_table(p)), p)
        uris = []
        for p in paths:
            self.s3.put(p, f"{self.prefix}/inputs/{Path(p).name}")
            uris.append(f"s3://{self.prefix}/inputs/{Path(p).name}")
        return paths, uris

    def fit(self, params: dict, paths: list[str], work, batches: list[str], runner: str = "local",
            count_rows: bool = True):
        """(state with the work folder's name replaced by WORK, rows of process() per batch file); the state
        travels pickled (as the runners keep it) and process() reads at most one decision file per batch."""
        stage = registry.create(params)
        rows = sum(fs.read_metadata(p).num_rows for p in paths) if count_rows else None
        fs.makedirs(work)
        state = pickle.loads(pickle.dumps(stage.fit(FitContext(paths, work, runner, 2, rows))))
        stage.set_state(state)
        reads = []
        real = fs.read_table
        with self.mp.context() as m:
            m.setattr(fs, "read_table", lambda p, **kw: reads.append(str(p)) or real(p, **kw))
            out = [stage.run_batch(pq.read_table(b)).to_pylist() for b in batches]
        assert len(reads) <= len(batches), reads  # no per-row request: one bucket file per shard at most
        return _named(state, str(work)), out

    def compare(self, params: dict, paths: list[str], uris: list[str], sub: str = "", runner: str = "local",
                local_inputs: bool = False, count_rows: bool = True):
        """Fit locally and in the bucket; asserts the same state and rows, and no local write by the S3 fit."""
        want = self.fit(params, paths, self.ref / "work" / sub, paths, count_rows=count_rows)
        cwd, scratch = self.tmp / "cwd", self.tmp / "scratch"
        cwd.mkdir(exist_ok=True)
        scratch.mkdir(exist_ok=True)
        before = _tree(self.tmp, "ref")
        work = fs.as_path(f"s3://{self.prefix}/work/{sub}" if sub else f"s3://{self.prefix}/work")
        with self.mp.context() as m:
            m.chdir(cwd)
            m.setattr(tempfile, "tempdir", str(scratch))  # the only local place the S3 fit may write: its scratch
            got = self.fit(params, paths if local_inputs else uris, work, paths, runner, count_rows)
        assert _tree(self.tmp, "ref") == before  # inputs as they were, cwd and scratch empty: spill folders removed
        assert got == want
        assert self.s3.find(f"{self.prefix}/work/{sub}")  # the state's files are in the bucket
        return got


def _named(state, work: str):
    """The state with the work folder's name replaced (local and S3 states hold their own folder's names)."""
    if isinstance(state, dict):
        return {k: _named(v, work) for k, v in state.items()}
    if isinstance(state, list):
        return [_named(v, work) for v in state]
    if isinstance(state, str):
        return state.replace(work, "WORK")
    return state


def _removed(rows: list[list[dict]], stage: str) -> dict[str, tuple]:
    return {r[S.UID]: (r.get(S.DUPLICATE_OF), r[S.REJECT_DETAIL])
            for batch in rows for r in batch if r[S.REJECT_STAGE] == stage}


@pytest.fixture
def runs(s3, tmp_path, monkeypatch, request):
    return Runs(s3, tmp_path, monkeypatch, request.node.name.replace("[", "-").rstrip("]"))


def test_duckdb_spills_to_local_scratch_for_a_work_folder_in_a_bucket(s3, tmp_path, monkeypatch):
    from curate.dedup import store

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    con = store.duckdb_connect(f"s3://{BUCKET}/spill/work")
    spill = con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0]
    assert Path(spill).parent == tmp_path and Path(spill).name.startswith("curate-duckdb-")
    con.sql(f"COPY (SELECT 1 AS x) TO 's3://{BUCKET}/spill/work/x.parquet' (FORMAT parquet)")
    assert con.sql(f"SELECT x FROM read_parquet('s3://{BUCKET}/spill/work/x.parquet')").fetchall() == [(1,)]
    con.close()
    del con
    assert not list(tmp_path.iterdir())  # the scratch folder goes with its connection
    local = store.duckdb_connect(tmp_path / "w")  # a local work folder: spill in it, as before
    assert local.sql("SELECT current_setting('temp_directory')").fetchall()[0][0] == str(tmp_path / "w" / "duckdb_tmp")
    local.close()


def _exact_table(rng, n: int = 360) -> pa.Table:
    sha = [f"sha-{int(v)}" if v < 120 else None for v in rng.integers(0, 140, n)]
    urls = [f"http://{'www.' if v % 3 else ''}x.org/{v % 90}" for v in rng.integers(0, 10**6, n)]
    caps = [f"a {'CAT' if v % 2 else 'cat'}  {v % 70}" for v in rng.integers(0, 10**6, n)]
    return dc.table_of(uid=[f"u{i:04d}-{rng.integers(0, 10**6)}" for i in range(n)], image_sha256=sha, url=urls,
                       caption=caps, width=pa.array(rng.integers(5, 9, n).astype(np.int32)),
                       height=pa.array(np.full(n, 5, np.int32)),
                       reject_reason=pa.array(["x" if i % 29 == 0 else None for i in range(n)], pa.string()))


def test_dedup_exact(runs):
    paths, uris = runs.inputs(_exact_table(np.random.default_rng(1)), 60)
    state, rows = runs.compare({"stage": "dedup_exact", "rows_per_partition": 100}, paths, uris, "image")
    assert state["partitions"] == 4 and len(_removed(rows, "dedup_exact")) > 100
    # one partition (the reduce reads the inputs itself), a work folder in the bucket over local inputs
    runs.compare({"stage": "dedup_exact", "key": ["url", "caption"]}, paths, uris, "url", local_inputs=True)


def test_dedup_phash(runs, monkeypatch):
    from curate.stages import dedup_phash

    monkeypatch.setattr(dedup_phash, "KEYS_PER_PARTITION", 5_000)  # a key shuffle, and several graph partitions
    rng = np.random.default_rng(6)
    hashes, uids = dc.planted_hashes(rng, 100, 6)
    t, _, _ = dc.phash_rows(rng, hashes, uids, 17)
    paths, uris = runs.inputs(t, 70)
    state, rows = runs.compare({"stage": "dedup_phash", "rows_per_partition": 60}, paths, uris)
    assert state["key_partitions"] > 1 and state["graph_partitions"] > 1 and len(_removed(rows, "dedup_phash")) > 30


def test_dedup_semantic_and_density_prune_sharing_its_clusters(runs, s3):
    rng = np.random.default_rng(3)
    e, t = dc.emb_table(rng, 100)
    paths, uris = runs.inputs(t, 50)
    km = {"stage": "dedup_semantic", "method": "kmeans", "n_clusters": 4, "rows_per_bucket": 60}
    state, rows = runs.compare(km, paths, uris, "dedup_semantic")
    assert state["cluster_buckets"] > 1 and len(_removed(rows, "dedup_semantic")) > 20
    # density_prune takes the centroids beside its own work folder (work/dedup_semantic/centroids.npy)
    state, rows = runs.compare({"stage": "density_prune", "keep_fraction": 0.5, "rows_per_bucket": 60}, paths, uris,
                               "density_prune")
    assert state["centroids"] == "stage dedup_semantic" and state["removed"] > 50
    # exact search, the rows counted by the scan (a compact copy in the work folder); given centroids in the bucket
    runs.compare({"stage": "dedup_semantic", "method": "exact"}, paths, uris, "exact", count_rows=False)
    c = rng.standard_normal((5, e.shape[1]))
    np.save(runs.ref / "centroids.npy", c)
    s3.put(str(runs.ref / "centroids.npy"), f"{runs.prefix}/centroids.npy")
    sem = {"stage": "dedup_semantic", "mode": "semdedup", "eps": 0.05}
    want = runs.fit({**sem, "centroids_path": str(runs.ref / "centroids.npy")}, paths, runs.ref / "w1", paths)
    got = runs.fit({**sem, "centroids_path": f"s3://{runs.prefix}/centroids.npy"}, uris,
                   fs.as_path(f"s3://{runs.prefix}/w1"), paths)
    assert got[1] == want[1] and len(_removed(got[1], "dedup_semantic")) > 20


def test_density_prune_training_its_own_clusters(runs):
    _, t = dc.emb_table(np.random.default_rng(4), 80)
    paths, uris = runs.inputs(t, 40)
    state, _ = runs.compare({"stage": "density_prune", "keep_fraction": 0.6, "clusters_from": None,
                             "n_clusters": 3}, paths, uris)
    assert state["centroids"] == "trained here" and state["removed"] > 20


def test_unique_uid(runs):
    rng = np.random.default_rng(2)
    n = 300
    t = dc.table_of(uid=[f"id{v}" for v in rng.integers(0, 220, n)],
                    reject_reason=pa.array(["x" if i % 31 == 0 else None for i in range(n)], pa.string()))
    paths, uris = runs.inputs(t, 50, extra=lambda b: b.append_column(
        S.SOURCE_FILE, pa.array([f"/data/in-{r // 100}.parquet" for r in b[S.SOURCE_ROW].to_pylist()])))
    state, rows = runs.compare({"stage": "unique_uid"}, paths, uris)
    dups = [r for batch in rows for r in batch if r[S.REJECT_REASON] == "duplicate_uid"]
    assert state["count"] == len(dups) > 30 and state["files"] == ["WORK/dup-0000.parquet"]


@pytest.mark.ray
def test_dedup_exact_on_ray_tasks(runs, ray_cluster):
    """Ray tasks get the storage settings (``fs.ray_env``) and write and read the bucket."""
    paths, uris = runs.inputs(_exact_table(np.random.default_rng(5), 200), 50)
    runs.compare({"stage": "dedup_exact", "rows_per_partition": 80}, paths, uris, runner="ray")
