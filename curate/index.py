"""``curate index OUT``: FAISS indices over an output's embeddings, under ``OUT/index/``.

For each (view, modality) asked -- ``kept`` rows by default, optionally ``rejected`` ones, image
embeddings and optionally text embeddings -- it writes

* ``OUT/index/{view}.{modality}.faiss``: the index (inner product over L2-normalised vectors);
* ``OUT/index/{view}.{modality}.ids.parquet``: one row per index position (``uid``, ``file``: the
  Parquet file under ``data/`` or ``rejected/``, ``row``: the row in it), in position order;
* ``OUT/index/{view}.{modality}.rows.npy``: the same mapping as a memory-mapped array (``file``: uint32,
  the file's position in the entry's ``files``; ``row``: int64), what searches read;
* ``OUT/index/{view}.{modality}.{token}.ivfdata``: above ``on_disk_from`` rows, the inverted lists of
  an IVF index, memory-mapped by searches (curate/index_disk.py); the ``.faiss`` then holds only the
  coarse quantizer and the lists' offsets;
* ``OUT/index/index.json``: per index the factory string, why it was chosen, rows, dimension,
  tuned search parameters, recall@10 against exact search and the files it covers.

The build streams the Parquet files batch by batch (only the embedding and uid columns are read):
one pass samples training vectors (when the index needs training), one adds every vector, writes the
uid mapping and accumulates the exact top-10 of the recall queries (a sample of the corpus) in a
FAISS result heap -- memory stays at the index itself plus one batch (an on-disk index: its
quantizer plus one shard of codes, :data:`curate.index_disk.SHARD_BYTES`).  See curate/index_plan.py
for the choice of index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema as S
from curate.index_plan import DEFAULT_MEMORY, ON_DISK_BYTES, ON_DISK_FROM, IndexPlan, human_bytes, plan_index
from curate.io.files import InputError, write_json_atomic
from curate.layout import Layout
from curate.query import parquet_files

log = logging.getLogger(__name__)

INDEX_DIR = "index"
MODALITIES = {"image": S.IMAGE_EMBEDDING, "text": S.TEXT_EMBEDDING}
VIEWS = ("kept", "rejected")
BATCH_ROWS = 65_536
TRAIN_ROWS_PER_LIST = 64
MAX_TRAIN_ROWS = 500_000
RECALL_QUERIES = 1000
RECALL_K = 10
TARGET_RECALL = 0.9
ROWS_DTYPE = np.dtype([("file", "<u4"), ("row", "<i8")])  # NAME.rows.npy


def index_dir(output: str | Path) -> Path:
    return Path(output) / INDEX_DIR


def meta_path(output: str | Path) -> Path:
    return index_dir(output) / "index.json"


def view_dir(layout: Layout, view: str) -> Path:
    return layout.data if view == "kept" else layout.rejected


def file_list(layout: Layout, view: str) -> list[dict[str, Any]]:
    """The Parquet files of a view with size and row count (what an index covers; a change makes it stale)."""
    return [{"name": f.name, "size": f.stat().st_size, "rows": pq.read_metadata(f).num_rows}
            for f in parquet_files(view_dir(layout, view))]


def iter_vectors(files: list[Path], column: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(file name, row numbers, uids, float32 unit vectors) per batch, rows without a vector skipped."""
    from curate.dedup.vectors import matrix

    for f in files:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            continue
        start = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[S.UID, column]):
            rows = np.arange(start, start + batch.num_rows, dtype=np.int64)
            start += batch.num_rows
            col = batch.column(1)
            valid = pc.is_valid(col).to_numpy(zero_copy_only=False) & (pc.list_value_length(col).fill_null(0)
                                                                        .to_numpy(zero_copy_only=False) > 0)
            if not valid.any():
                continue
            mask = pa.array(valid)
            x = np.ascontiguousarray(matrix(col.filter(mask)), dtype=np.float32)
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            x /= np.where(norm > 0, norm, 1.0)
            yield f.name, rows[valid], np.asarray(batch.column(0).filter(mask).to_pylist(), dtype=object), x


def _sample(files: list[Path], counts: list[int], column: str, size: int, seed: int) -> np.ndarray:
    """Up to ``size`` vectors at seeded random row positions, in one streaming pass (``counts``: rows per file)."""
    rng = np.random.default_rng(seed)
    total = sum(counts)
    pick = np.sort(rng.choice(total, size=min(size, total), replace=False))
    out, seen = [], 0
    for f, rows in zip(files, counts):
        lo, hi = np.searchsorted(pick, [seen, seen + rows])
        if hi > lo:
            want = pick[lo:hi] - seen
            for _, r, _, x in iter_vectors([f], column):
                keep = np.isin(r, want)
                if keep.any():
                    out.append(x[keep])
        seen += rows
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _dimension(files: list[Path], column: str) -> int:
    for _, _, _, x in iter_vectors(files, column):
        return x.shape[1]
    return 0


def build_one(layout: Layout, view: str, modality: str, memory: int, kind: str = "auto", factory: str | None = None,
              target_recall: float = TARGET_RECALL, seed: int = 0, on_disk_from: int | None = ON_DISK_FROM,
              nprobe: int | None = None, on_disk_bytes: int | None = ON_DISK_BYTES) -> dict[str, Any]:
    """Build one index (see the module doc); returns its index.json entry.  ``nprobe``: fixed instead of tuned."""
    from curate.dedup.vectors import gpu_available, import_faiss
    from curate.index_disk import OnDiskBuilder, not_on_disk_reason
    from curate.progress import progress
    from curate.search_params import apply_params, tune

    faiss = import_faiss("curate index")
    column = MODALITIES[modality]
    files = parquet_files(view_dir(layout, view))
    counts = [pq.read_metadata(f).num_rows for f in files]
    total = sum(counts)
    dim = _dimension(files, column)
    if dim == 0:
        raise InputError(f"index: no {column} in {view_dir(layout, view)} (the run needs a clip_embed stage)")
    t0 = time.perf_counter()
    try:
        plan: IndexPlan = plan_index(total, dim, memory, kind, factory, on_disk_from, on_disk_bytes)
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except (ValueError, RuntimeError) as e:
        raise InputError(f"index: {' '.join(str(e).split())[:300]}") from None
    name = f"{view}.{modality}"
    if plan.on_disk and (why := not_on_disk_reason(index)):
        plan.on_disk = False
        plan.reason += f"; kept in RAM: {why}"
    log.info("index %s: %s (%s)", name, plan.factory, plan.reason)
    ivf = faiss.try_extract_index_ivf(index)
    n_train = 0 if index.is_trained else min(MAX_TRAIN_ROWS, max(TRAIN_ROWS_PER_LIST * (ivf.nlist if ivf else 256),
                                                                    50_000))
    sample = _sample(files, counts, column, n_train + RECALL_QUERIES, seed)  # one pass: training rows and queries
    sample = sample[np.random.default_rng(seed).permutation(len(sample))]
    queries = sample[:RECALL_QUERIES].copy()  # a copy: a view would keep the whole sample alive while adding
    if not index.is_trained:
        train = sample
        if ivf is not None and gpu_available():  # k-means of the coarse quantizer on the GPU (as autofaiss)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
        log.info("index %s: training on %d vectors", name, len(train))
        t_train = time.perf_counter()
        index.train(train)
        del train
        t_train = time.perf_counter() - t_train
    del sample
    if n_train:
        log.info("index %s: trained in %.1fs", name, t_train)
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True) if len(queries) else None
    out_dir = index_dir(layout.root)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids_tmp = out_dir / f".{name}.ids.parquet.tmp"
    rows_tmp = out_dir / f".{name}.rows.bin.tmp"
    ivfdata = f"{name}.{os.urandom(4).hex()}.ivfdata" if plan.on_disk else None
    ivfdata_tmp = out_dir / f".{ivfdata}.tmp" if ivfdata else None
    sink = OnDiskBuilder(index, out_dir, name) if plan.on_disk else None
    file_no = {f.name: i for i, f in enumerate(files)}
    id_schema = pa.schema([pa.field("uid", pa.string()), pa.field("file", pa.string()), pa.field("row", pa.int64())])
    added = 0
    try:
        with pq.ParquetWriter(ids_tmp, id_schema, compression="zstd") as writer, open(rows_tmp, "wb") as rows_out, \
                progress(f"index {name}", total, "rows") as bar:
            for fname, rows, uids, x in iter_vectors(files, column):
                if sink is not None:
                    sink.add(x, np.arange(added, added + len(x), dtype=np.int64))
                else:
                    index.add(x)
                if heap is not None:
                    d, i = faiss.knn(queries, x, min(RECALL_K, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
                    if d.shape[1] < RECALL_K:
                        pad = RECALL_K - d.shape[1]
                        d = np.hstack([d, np.full((len(d), pad), -np.inf, np.float32)])
                        i = np.hstack([i, np.full((len(i), pad), -1, np.int64)])
                    heap.add_result(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + added, -1))
                writer.write_table(pa.table({"uid": pa.array(uids.tolist(), pa.string()),
                                             "file": pa.array([fname] * len(rows), pa.string()),
                                             "row": pa.array(rows, pa.int64())}, schema=id_schema),
                                   row_group_size=BATCH_ROWS)
                rec = np.empty(len(rows), ROWS_DTYPE)
                rec["file"], rec["row"] = file_no[fname], rows
                rows_out.write(rec.tobytes())
                added += len(x)
                bar.advance(len(x))
        if sink is not None:
            log.info("index %s: merging %d shards into %s", name, len(sink.shards) + (sink.current is not None),
                     ivfdata)
            index = sink.finish(ivfdata_tmp)
        params, recall = {}, 1.0
        if heap is not None:
            heap.finalize()
            params, recall = tune(index, queries, heap.I, RECALL_K, target_recall, nprobe)
            apply_params(index, params)
        seconds = time.perf_counter() - t0
        _finish_rows(rows_tmp, out_dir / f".{name}.rows.npy.tmp", added)
        if sink is not None:
            from curate.index_disk import write

            os.replace(ivfdata_tmp, out_dir / ivfdata)  # a new name: an open index keeps its own file
            write(index, out_dir / f".{name}.faiss.tmp", ivfdata)
        else:
            faiss.write_index(index, str(out_dir / f".{name}.faiss.tmp"))
        os.replace(out_dir / f".{name}.faiss.tmp", out_dir / f"{name}.faiss")
        os.replace(ids_tmp, out_dir / f"{name}.ids.parquet")
        os.replace(out_dir / f".{name}.rows.npy.tmp", out_dir / f"{name}.rows.npy")
    finally:
        if sink is not None:
            sink.cleanup()
        for tmp in (ids_tmp, rows_tmp, ivfdata_tmp, out_dir / f".{name}.rows.npy.tmp"):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    for old in out_dir.glob(f"{name}.*.ivfdata"):  # lists of an earlier build
        if old.name != ivfdata:
            old.unlink(missing_ok=True)
    exact = plan.kind == "flat"
    log.info("index %s: %d vectors, %s%s, recall@%d %.3f vs exact search on %d queries%s, %.1fs", name, added,
             plan.factory, " (lists on disk)" if ivfdata else "", RECALL_K, recall, len(queries),
             " (exact index)" if exact else "", seconds)
    entry = {"view": view, "modality": modality, "column": column, "factory": plan.factory, "kind": plan.kind,
             "reason": plan.reason, "rows": added, "dim": dim, "metric": "inner_product", "params": params,
             "recall_at_10": round(float(recall), 4), "recall_queries": int(len(queries)),
             "estimated_bytes": plan.estimated_bytes, "memory_budget": memory,
             "index_bytes": (out_dir / f"{name}.faiss").stat().st_size, "build_seconds": round(seconds, 2),
             "files": file_list(layout, view), "positions": f"{name}.rows.npy", "on_disk": bool(ivfdata)}
    if ivfdata:
        entry.update(ivfdata=ivfdata, ivfdata_bytes=(out_dir / ivfdata).stat().st_size)
    return entry


def _finish_rows(body: Path, dest: Path, n: int) -> None:
    """``NAME.rows.npy`` from the records streamed to ``body`` (an .npy header, then the records)."""
    with open(dest, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(ROWS_DTYPE),
                                                 "fortran_order": False, "shape": (n,)})
        with open(body, "rb") as src:
            shutil.copyfileobj(src, f, 16 << 20)


def build_index(output: str | Path, text: bool = False, rejected: bool = False, memory: int = DEFAULT_MEMORY,
                kind: str = "auto", factory: str | None = None, target_recall: float = TARGET_RECALL,
                seed: int = 0, on_disk_from: int | None = ON_DISK_FROM, nprobe: int | None = None,
                on_disk_bytes: int | None = ON_DISK_BYTES) -> dict[str, Any]:
    """Build ``OUT/index/`` (see the module doc); returns the content of index.json.  ``on_disk_from``: rows,
    ``on_disk_bytes``: bytes of float32 vectors, from which an IVF index keeps its lists on disk (None: never);
    ``nprobe``: fixed instead of tuned."""
    layout = Layout(Path(output).expanduser().resolve())
    if not layout.data.is_dir():
        raise InputError(f"index: {output} is not a curate output (no data/ directory)")
    meta = json.loads(meta_path(layout.root).read_text()) if meta_path(layout.root).exists() else {}
    indices = meta.get("indices", {})
    for view in ("kept", "rejected") if rejected else ("kept",):
        for modality in ("image", "text") if text else ("image",):
            if view == "rejected" and not parquet_files(layout.rejected):
                continue
            indices[f"{view}.{modality}"] = build_one(layout, view, modality, memory, kind, factory,
                                                      target_recall, seed, on_disk_from, nprobe, on_disk_bytes)
    meta = {"version": 1, "indices": indices, "clip": clip_settings(layout)}
    write_json_atomic(meta, meta_path(layout.root))
    return meta


def clip_settings(layout: Layout) -> dict[str, Any]:
    """The run's clip_embed parameters (model, pretrained, seed): the text tower that encodes queries."""
    import yaml

    if not layout.config.exists():
        return {}
    cfg = yaml.safe_load(layout.config.read_text()) or {}
    for st in cfg.get("stages") or []:
        if isinstance(st, dict) and st.get("stage") == "clip_embed":
            return {k: st.get(k) for k in ("model", "pretrained", "seed") if st.get(k) is not None}
    return {}


def describe(meta: dict[str, Any]) -> str:
    """The command's summary: one line per index."""
    lines = []
    for name, e in meta["indices"].items():
        size = human_bytes(e["index_bytes"]) + " on disk"
        if e.get("on_disk"):
            size = (f"lists memory-mapped from {e['ivfdata']} ({human_bytes(e['ivfdata_bytes'])}), "
                    f"{human_bytes(e['index_bytes'])} index file loaded")
        lines.append(f"{name}: {e['rows']} vectors x {e['dim']}, {e['factory']} ({e['reason']}); "
                     f"recall@10 {e['recall_at_10']:.3f} vs exact search on {e['recall_queries']} sampled queries"
                     f"{' (exact index)' if e['kind'] == 'flat' else ''}; params {e['params'] or '-'}; "
                     f"{size}; built in {e['build_seconds']:.1f}s")
    return "\n".join(lines)
