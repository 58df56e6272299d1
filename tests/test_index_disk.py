"""curate index with the inverted lists on disk (``--on-disk-from``, curate/index_disk.py): the on-disk path is
taken above the threshold, streamed through several shards, returns exactly what the same IVF index in RAM
returns, opens memory-mapped and read-only from wherever the output is, and serves `curate search` and
`curate serve`'s search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema as S
from curate.cli import main
from curate.index_plan import ON_DISK_BYTES, ON_DISK_FROM, plan_index


def _output(root: Path, files: int = 3, rows: int = 7000, d: int = 32) -> tuple[Path, np.ndarray, list[str]]:
    """Clustered unit vectors in several files (row groups of 1000, as the pipeline writes), a few rows
    without an embedding."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, d))
    (root / "data").mkdir(parents=True)
    allx, alluid = [], []
    for f in range(files):
        x = (centres[rng.integers(0, 30, rows)] + 0.6 * rng.normal(size=(rows, d))).astype(np.float32)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        uids = [f"{f:02d}{i:030x}" for i in range(rows)]
        keep = [i % 499 != 7 for i in range(rows)]
        emb = pa.array([v if k else None for v, k in zip(x, keep)], pa.list_(pa.float16()))
        pq.write_table(pa.table({S.UID: uids, S.CAPTION: [f"caption {u}" for u in uids],
                                 S.CLIP_SCORE: pa.array(rng.random(rows), pa.float32()), S.IMAGE_EMBEDDING: emb}),
                       root / "data" / f"{f:05d}.parquet", row_group_size=1000)
        allx.append(x.astype(np.float32)[keep])
        alluid += [u for u, k in zip(uids, keep) if k]
    return root, np.concatenate(allx), alluid


def test_plan_keeps_lists_on_disk_from_the_threshold():
    assert ON_DISK_FROM == 1_000_000
    below = plan_index(999_999, 512, on_disk_from=ON_DISK_FROM)
    assert below.kind == "flat" and not below.on_disk
    at = plan_index(1_000_000, 512, on_disk_from=ON_DISK_FROM)
    assert at.on_disk and at.kind == "ivfsq8" and at.factory == "IVF4096,SQ8"
    assert at.estimated_bytes == 4096 * 512 * 4 and at.disk_bytes == 1_000_000 * (512 + 8)  # RAM: the quantizer
    huge = plan_index(5_000_000_000, 768, memory=16 << 30, on_disk_from=ON_DISK_FROM)  # LAION-5B in 16 GiB
    assert huge.on_disk and huge.factory == "IVF262144_HNSW32,SQ8" and huge.estimated_bytes <= 16 << 30
    pq8 = plan_index(2_000_000, 512, kind="ivfpq", on_disk_from=ON_DISK_FROM)  # 8-bit PQ: lists are not fast-scan
    assert pq8.on_disk and pq8.factory == "IVF4096,PQ128" and pq8.disk_bytes == 2_000_000 * (128 + 8)
    assert plan_index(2_000_000, 512).factory == "IVF4096,PQ128x4fsr,Refine(SQfp16)"  # threshold None: in RAM
    assert plan_index(10_000, 32, kind="ivfsq8").factory == "IVF256,SQ8"
    assert plan_index(10, 8, kind="hnsw", on_disk_from=0).on_disk is False
    with pytest.raises(ValueError, match="quantizer"):
        plan_index(10 ** 12, 512, memory=512 << 20, on_disk_from=0)  # 2^18 lists x 512 floats + graph: 1 GiB
    custom = plan_index(2_000_000, 512, factory="IVF1024,PQ64x4fs", on_disk_from=ON_DISK_FROM)
    assert custom.kind == "custom" and custom.on_disk  # decided when the index exists (below)
    # fewer rows, but more than 512 MiB of float32 vectors (820k x 256 = 840 MB: a flat index held that in RAM)
    assert ON_DISK_BYTES == 512 << 20
    by_bytes = plan_index(820_000, 256, on_disk_from=ON_DISK_FROM, on_disk_bytes=ON_DISK_BYTES)
    assert by_bytes.on_disk and by_bytes.factory == "IVF4096,SQ8" and "of vectors >= the on-disk" in by_bytes.reason
    assert plan_index(500_000, 256, on_disk_from=ON_DISK_FROM, on_disk_bytes=ON_DISK_BYTES).kind == "flat"  # 512 MB
    assert plan_index(820_000, 256, on_disk_from=ON_DISK_FROM).kind == "flat"  # no byte threshold: by rows only


def test_which_indices_can_keep_their_lists_on_disk():
    import faiss

    from curate.index_disk import not_on_disk_reason

    for ok in ("IVF16,SQ8", "IVF16,Flat", "IVF16,PQ8", "OPQ8,IVF16,PQ8", "IVF16_HNSW32,SQfp16"):
        assert not_on_disk_reason(faiss.index_factory(32, ok)) is None, ok
    assert "fast-scan" in not_on_disk_reason(faiss.index_factory(32, "IVF16,PQ16x4fs"))
    assert "Refine" in not_on_disk_reason(faiss.index_factory(32, "IVF16,PQ8,Refine(SQfp16)"))
    assert not_on_disk_reason(faiss.index_factory(32, "HNSW16")) == "not an IVF index"
    assert not_on_disk_reason(faiss.index_factory(32, "Flat")) == "not an IVF index"


def _lists(index):
    import faiss

    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)


def test_the_byte_threshold_sends_an_index_of_fewer_rows_to_disk(tmp_path, capfd):
    out, _, uids = _output(tmp_path / "out", files=1, rows=3000)
    e = lambda: json.loads((out / "index" / "index.json").read_text())["indices"]["kept.image"]  # noqa: E731
    assert main(["index", str(out)]) == 0 and not e()["on_disk"]  # 3,000 x 32 floats: far below both defaults
    assert main(["index", str(out), "--on-disk-bytes", "64KiB"]) == 0
    assert e()["on_disk"] and "of vectors >= the on-disk threshold" in e()["reason"] and e()["rows"] == len(uids)
    assert main(["index", str(out), "--on-disk-bytes", "never", "--on-disk-from", "never"]) == 0 and not e()["on_disk"]
    capfd.readouterr()
    assert main(["index", str(out), "--on-disk-bytes", "lots"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--on-disk-bytes" in err[0], err


def test_on_disk_index_returns_what_the_same_ivf_in_ram_returns(tmp_path, monkeypatch, capfd):
    import faiss

    import curate.index_disk as disk
    from curate.index_disk import open_index
    from curate.search import Searcher

    out, x, uids = _output(tmp_path / "out")
    folder = out / "index"
    # in RAM: the same factory (IVF512,SQ8: 20,958 vectors) below the threshold
    assert main(["index", str(out), "--kind", "ivfsq8", "--on-disk-from", "never"]) == 0
    ram_entry = json.loads((folder / "index.json").read_text())["indices"]["kept.image"]
    assert ram_entry["factory"] == "IVF512,SQ8" and not ram_entry["on_disk"] and not list(folder.glob("*.ivfdata"))
    ram = open_index(folder / "kept.image.faiss")
    assert isinstance(_lists(ram), faiss.ArrayInvertedLists)
    s = Searcher(out)
    queries = [x[i] for i in (0, 7000, 20000)]
    ram_hits = [s.search(q, k=10).select(["uid", "score"]).to_pylist() for q in queries]
    ram_where = s.search(x[1], k=20, where=f"{S.CLIP_SCORE} < 0.1").column("uid").to_pylist()

    # on disk: above the threshold (auto picks the same IVF512,SQ8), streamed through several shards
    monkeypatch.setattr(disk, "SHARD_BYTES", 150_000)  # 150 kB of codes a shard: 8 shards
    capfd.readouterr()
    assert main(["index", str(out), "--on-disk-from", "20000"]) == 0
    printed = capfd.readouterr()
    assert "lists memory-mapped from kept.image." in printed.out and "resizing" not in printed.out
    e = json.loads((folder / "index.json").read_text())["indices"]["kept.image"]
    assert e["on_disk"] and e["factory"] == "IVF512,SQ8" and e["kind"] == "ivfsq8" and e["rows"] == len(uids)
    ivfdata = folder / e["ivfdata"]
    assert ivfdata.is_file() and e["ivfdata_bytes"] == ivfdata.stat().st_size == len(uids) * (32 + 8)
    assert (folder / "kept.image.faiss").stat().st_size < ivfdata.stat().st_size / 10  # quantizer + offsets
    assert sorted(p.name for p in folder.iterdir()) == sorted(  # no shard or temporary file left
        ["index.json", "kept.image.faiss", "kept.image.ids.parquet", "kept.image.rows.npy", e["ivfdata"]])
    assert e["params"] == ram_entry["params"] and e["recall_at_10"] == ram_entry["recall_at_10"] >= 0.9
    od = open_index(folder / "kept.image.faiss")
    lists = _lists(od)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    assert lists.filename == str(ivfdata.resolve())
    assert od.ntotal == ram.ntotal == len(uids)
    # exactly the same neighbours and distances, at every nprobe
    q = x[np.random.default_rng(0).choice(len(x), 300, replace=False)]
    for nprobe in (1, 4, 16, 512):
        faiss.extract_index_ivf(od).nprobe = faiss.extract_index_ivf(ram).nprobe = nprobe
        d1, i1 = od.search(q, 10)
        d2, i2 = ram.search(q, 10)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2), nprobe
    # the positions stored as ids are the rows of the mapping
    rows = np.load(folder / "kept.image.rows.npy", mmap_mode="r")
    mapping = pq.read_table(folder / "kept.image.ids.parquet")
    assert len(rows) == mapping.num_rows == len(uids) and mapping.column("uid").to_pylist() == uids
    files = [f["name"] for f in e["files"]]
    assert [files[f] for f in rows["file"][::997]] == mapping.column("file").to_pylist()[::997]
    assert rows["row"][::997].tolist() == mapping.column("row").to_pylist()[::997]
    # Searcher (what `curate search` and serve use): the on-disk index, the same rows as before
    s = Searcher(out)
    assert [s.search(qv, k=10).select(["uid", "score"]).to_pylist() for qv in queries] == ram_hits
    assert ram_hits[0][0]["uid"] == uids[0] and ram_hits[1][0]["uid"] == uids[7000]
    assert isinstance(_lists(s.index("kept", "image").index), faiss.OnDiskInvertedLists)
    assert s.search(x[1], k=20, where=f"{S.CLIP_SCORE} < 0.1").column("uid").to_pylist() == ram_where
    located = s.search(x[9000], k=3, locate=True)
    f, r = located.column("_file")[0].as_py(), located.column("_row")[0].as_py()
    assert pq.read_table(out / "data" / f, columns=[S.UID]).column(0)[r].as_py() == uids[9000]


def test_curate_search_and_serve_on_an_on_disk_index(tmp_path, capfd):
    import faiss

    from curate.search import Searcher

    out, x, uids = _output(tmp_path / "out", files=2, rows=6000)
    assert main(["index", str(out), "--on-disk-from", "1e4", "--nprobe", "4"]) == 0
    e = json.loads((out / "index" / "index.json").read_text())["indices"]["kept.image"]
    assert e["on_disk"] and e["params"] == {"nprobe": 4} and 0 < e["recall_at_10"] < 1
    capfd.readouterr()
    # `curate search`: stdout is the JSON alone (FAISS prints nothing when it opens the index)
    assert main(["search", str(out), "--uid", uids[5], "-k", "5", "--format", "json", "--columns", "uid,score"]) == 0
    hits = json.loads(capfd.readouterr().out)
    assert hits[0]["uid"] == uids[5] and hits[0]["score"] > 0.99 and len(hits) == 5
    # --nprobe at search time: all lists, the exact neighbours of the SQ8 codes
    assert main(["search", str(out), "--uid", uids[5], "-k", "10", "--format", "json", "--columns", "uid", "--nprobe", "100000"]) == 0
    wide = [h["uid"] for h in json.loads(capfd.readouterr().out)]
    v = x[5] / np.linalg.norm(x[5])
    assert len(set(wide) & {uids[i] for i in np.argsort(-(x @ v))[:10]}) >= 9
    assert main(["search", str(out), "--uid", uids[5], "--nprobe", "0"]) == 2
    assert "nprobe must be between" in capfd.readouterr().err
    # the output moved elsewhere: the lists are opened from the new place
    moved = shutil.move(str(out), str(tmp_path / "elsewhere"))
    s = Searcher(moved)
    assert s.search(x[3000], k=1).column("uid")[0].as_py() == uids[3000]
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(s.index("kept", "image").index).invlists)
    assert lists.filename.startswith(str(Path(moved).resolve()))
    # serve's search page (the same Searcher)
    from fastapi.testclient import TestClient

    from curate.serve.app import create_app

    c = TestClient(create_app(Path(moved), tmp_path / "subsets", allowed_hosts=["testserver"]))
    r = c.get(f"/search?uid={uids[42]}&k=5")
    assert r.status_code == 200 and uids[42] in r.text
    # lists missing: one line naming the fix
    ivfdata = Path(moved) / "index" / e["ivfdata"]
    ivfdata.rename(ivfdata.with_suffix(".gone"))
    assert main(["search", moved, "--uid", uids[5]]) == 2
    err = capfd.readouterr().err
    assert "which is missing" in err and "curate index" in err and err.count("\n") == 1
    # rebuilt below the threshold: in RAM again, the old lists removed
    ivfdata.with_suffix(".gone").rename(ivfdata)
    assert main(["index", moved, "--on-disk-from", "never"]) == 0
    assert not list((Path(moved) / "index").glob("*.ivfdata"))
    assert Searcher(moved).search(x[5], k=1).column("uid")[0].as_py() == uids[5]
