"""``dedup_semantic``: near-duplicates by cosine similarity of embeddings (FAISS; SemDeDup at scale).

Two rows are semantic duplicates when the cosine of their L2-normalised embeddings
(``image_embedding`` by default, written by ``clip_embed``) is ``> threshold`` (strict;
default 0.95, i.e. SemDeDup's ``eps = 0.05``; ``eps`` may be given instead).  0.95 is where
SemDeDup's LAION experiments sit (eps 0.03-0.1) and where re-encodes/resizes of a photo
(cosine ~0.98-1 with CLIP) are caught while distinct photos of one subject usually are not.
Tune it with the embedding model: it is a property of the embeddings.

Methods (``method: auto`` = exact up to ``exact_max_rows`` rows with embeddings, else k-means):

* ``exact``: every pair above the threshold among all rows, in one task that holds every
  embedding (raw, as stored) -- for small corpora.  ``method: exact`` with more than
  ``exact_max_rows`` (default 50,000) rows with embeddings is refused with a one-line error
  that names ``method: kmeans``; ``method: auto`` switches to k-means there.  When the live
  rows entering the stage are already at most ``exact_max_rows``, the task reads the rows
  straight from the input files (nothing is copied); otherwise the scan below counts them.
* ``kmeans`` (SemDeDup's scheme), in ``ctx.map`` tasks (Ray tasks under the Ray runner; the
  driver only holds file lists and counts, see ``bench/dedup_scale.py``):

  1. scan -- the only read of the input files (decoding parquet lists is the costly part): rows
     with an embedding are counted and written in compact form (raw embedding bytes), and the
     k-means sample is set aside: rows whose DuckDB ``hash(uid) % 1e6`` falls under a cut, about
     ``kmeans_sample_per_centroid`` rows per centroid, at most ``kmeans_max_sample``;
  2. train (one task): ``faiss.Kmeans(d, k, niter=kmeans_iterations, seed=seed,
     spherical=True)`` -- SemDeDup's own call -- on the sample's embeddings as stored (float32),
     ordered by uid (mode keep_one: the clustering does not depend on the input layout) or by
     input position (mode semdedup, as SemDeDup); ``k = n_clusters`` (default
     ``rows / rows_per_cluster``); FAISS trains on at most 256 rows per centroid (its default);
  3. assign: nearest centroid of every row (decided in float64), rows written by cluster bucket
     (about ``rows_per_bucket`` rows each);
  4. clusters: one task per bucket, its clusters on parallel threads; per cluster the pairs
     above the threshold come from blocked matrix products (bf16 on CPUs with AMX, float32
     otherwise, candidates re-checked in float64: :mod:`curate.dedup.vectors`), then the
     decisions.

  Pairs split across clusters are missed (``bench/dedup.py`` measures the recall against exact
  search).  A task holds one bucket of raw embeddings plus per-cluster working copies.

Decisions (``mode``):

* ``keep_one`` (default): best-first by the keep rule (default highest ``clip_score``), a row
  is removed iff a better *kept* row of its cluster is a duplicate; ``duplicate_of`` = the
  most similar such row (see :mod:`curate.dedup`).
* ``semdedup``: the paper's rule as SemDeDup's code applies it.  Inside each cluster rows are
  ordered by ``1 - embedding . centroid`` (the embedding as stored, the unit centroid; the
  cosine distance for unit embeddings), farthest first, ties by input order (shard, then row);
  row j is removed iff its highest cosine to an earlier row is ``> 1 - eps``, even when that
  earlier row was removed itself; ``duplicate_of`` = that earlier row (ties: the earliest).

Reproducing SemDeDup: ``mode: semdedup`` with its ``k``, ``niter`` (``kmeans_iterations``),
``seed`` and ``eps``, and a sample of every row (``kmeans_sample_per_centroid`` and
``kmeans_max_sample`` at least the row count): the training rows are then SemDeDup's, in its
order (input order), FAISS's subsample of 256 rows per centroid and its initial centroids are
the same, so are the centroids (same FAISS build) and the decisions -- except where float32 and
float64 round a near-tie differently (SemDeDup assigns and sorts in float32).
``bench/dedup.py --only semdedup`` finds the removed rows identical at 200,000 x 512 (k=100)
and at 1,000,000 x 512 (k=500); ``tests/test_dedup_scale.py`` checks it on a small corpus.  The
training task reads the keys of every sampled row but loads only FAISS's subset in float32
(:func:`curate.dedup.vectors.faiss_training_rows`).  With ``centroids_path`` (a ``.npy``
(k, d) array, e.g. SemDeDup's ``kmeans_centroids.npy``) nothing is trained.

Speed (``bench/dedup.py --only semdedup``: a re-implementation of SemDeDup's pipeline and this
stage on the same parquet shards, local runner, 2 cores shared with other jobs -- times vary by
~2x with their load; these are from a quiet spell):

* 200,000 x 512, k=100, 3 interleaved runs: SemDeDup 13.6-14.2 s (5.5-6.0 s of it reading the
  parquet); this stage 3.3-6.0 s with SemDeDup's training set (same removed rows; median 2.6x)
  and 3.3-4.0 s with the default sample (median 4.1x);
* 1,000,000 x 512, k=500: SemDeDup 67.5 s (28.0 s reading), this stage 22.3 s (same removed
  rows, 3.0x; peak RSS 1.6 GB vs 3.9 GB) and 21.8 s with the default sample (3.1x).

Against SemDeDup without its parquet read (as if from a float32 memmap) the ratios are 1.6x /
2.3x at 200,000 rows and 1.8x at 1,000,000.  The gain is in the pairwise step: bf16 products of
fixed 512-row blocks over the upper triangle (one compiled kernel shape, cache-resident) instead
of a float32 n x n matrix per cluster, float64 only for the few candidate pairs; and one read of
the input.  Under Ray the driver stays flat: 283 MB at 20,000 rows, 284 MB at 200,000
(``bench/dedup_scale.py``).

Devices: the pairwise products run on the CPU (torch) -- on the GPU through FAISS when the
installed FAISS has GPU support (``pip install 'curate[gpu]'``; ``device: auto``) -- and every
decision is re-checked in float64 on the CPU, so both give the same result
(:mod:`curate.dedup.vectors`).  The k-means training follows ``kmeans_device`` (default: ``device``):
on a GPU it is ``faiss.Kmeans`` with a GPU flat index (``gpu=True``), as SemDeDup's reference runs it -- same seed, same
sample and initial centroids; the GPU's float32 rounding can move a near-tied row during training,
so set ``kmeans_device: cpu`` for centroids that never depend on the hardware.  Rows without an embedding are never semantic duplicates.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate import schema as S
from curate.dedup import store, vectors
from curate.dedup.base import (METRIC, DedupParams, DedupStage, check_columns, keep_columns, metric_array,
                               rank)
from curate.dedup.greedy import keep_one, semdedup
from curate.io import fs
from curate.io.sql import arrow
from curate.io.views import POS, view_refs, view_schema, view_sql
from curate.registry import register
from curate.stage import StageError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95
_SAMPLE_MOD = 1_000_000
_SAMPLE_COLUMNS = [S.UID, S.SHARD, S.SOURCE_ROW, "emb", "dtype"]


class DedupSemanticParams(DedupParams):
    stage: Literal["dedup_semantic"] = "dedup_semantic"
    keep: Literal["clip_score", "largest_image", "smallest_uid"] = Field(
        "clip_score", description="keep rule of mode keep_one: clip_score, largest_image or smallest_uid")
    column: Literal["image_embedding", "text_embedding"] = Field("image_embedding", description="embedding column")
    threshold: float | None = Field(None, ge=-1, lt=1, description="duplicates: cosine > threshold (default 0.95)")
    eps: float | None = Field(None, gt=0, le=2, description="SemDeDup's eps: threshold = 1 - eps (give one of the two)")
    mode: Literal["keep_one", "semdedup"] = Field("keep_one", description="keep_one: best row by the keep rule; "
                                                  "semdedup: the SemDeDup paper's rule")
    method: Literal["auto", "exact", "kmeans"] = Field("auto", description="exact search or SemDeDup k-means")
    exact_max_rows: int = Field(50_000, ge=1, description="method auto: exact search up to this many rows; "
                                "method exact refuses more (it holds every embedding in one process)")
    n_clusters: int | None = Field(None, ge=1, description="k-means clusters (default rows / rows_per_cluster)")
    rows_per_cluster: int = Field(2000, ge=1, description="mean cluster size when n_clusters is not given")
    centroids_path: str | None = Field(None, description=".npy (k, d) centroids to use instead of training")
    kmeans_iterations: int = Field(20, ge=1, description="FAISS k-means iterations (SemDeDup's niter)")
    kmeans_sample_per_centroid: int = Field(128, ge=1, description="training rows per centroid")
    kmeans_max_sample: int = Field(200_000, ge=1, description="at most this many training rows")
    seed: int = Field(0, description="FAISS k-means seed (SemDeDup's seed; its config uses 1234)")
    rows_per_bucket: int = Field(100_000, ge=1, description="rows per cluster-bucket task")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="FAISS device (auto: GPU if FAISS has one)")
    kmeans_device: Literal["auto", "cpu", "cuda"] | None = Field(
        None, description="device of the k-means training (default: the same as device)")
    kmeans_backend: Literal["faiss", "torch"] = Field(
        "faiss", description="faiss: SemDeDup's own faiss.Kmeans (needs FAISS); torch: Lloyd's spherical k-means "
                             "in torch for machines without FAISS (other centroids than FAISS's)")
    gpus_per_task: float = Field(1.0, gt=0, description="GPUs requested by each fit task on a Ray cluster with GPUs")

    @model_validator(mode="after")
    def _check(self) -> "DedupSemanticParams":
        if self.threshold is not None and self.eps is not None:
            raise ValueError("give threshold or eps, not both")
        if self.mode == "semdedup" and self.method == "exact":
            raise ValueError("mode semdedup works per k-means cluster: use method auto or kmeans")
        return self

    @property
    def cutoff(self) -> float:
        if self.eps is not None:
            return 1.0 - self.eps
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold


def _read_active(path: str, columns: list[str], emb: str) -> tuple[pa.Table, np.ndarray]:
    """Active rows with an embedding of one file (DuckDB: it decodes parquet lists ~1.5x faster
    than pyarrow) and their raw embeddings, in the file's own float type."""
    import duckdb

    schema = view_schema(path)
    names = [c for c in columns if c in schema.names and c != emb]
    con = duckdb.connect()
    fs.register(con, [path])  # a fit input on object storage: read through its fsspec filesystem
    con.execute("SET threads = 1")  # files are read in parallel instead
    where = f'WHERE "{S.REJECT_REASON}" IS NULL AND "{emb}" IS NOT NULL'
    cols = ", ".join(f'"{c}"' for c in names) + f', "{emb}"'
    position = S.SOURCE_ROW not in schema.names  # notebook tables: position in the file
    if view_refs(path):  # a runner's fit view: columns joined by position from where they were made
        src = view_sql(path, [*names, emb, S.REJECT_REASON])
        rel = con.sql(f'SELECT {cols} FROM {src} {where} ORDER BY "{POS}"')
    else:
        src = f"read_parquet($path{', file_row_number = true' if position else ''})"
        rel = con.sql(f"SELECT {cols}{', file_row_number' if position else ''} FROM {src} {where}",
                      params={"path": str(path)})
    t = arrow(rel)
    con.close()
    if position:
        t = t.append_column(S.SOURCE_ROW, pc.cast(t["file_row_number"], pa.int64())).drop_columns(["file_row_number"])
    x = vectors.matrix(t[emb])
    stored = schema.field(emb).type.value_type
    if stored != pa.from_numpy_dtype(x.dtype) and pa.types.is_floating(stored) and stored.bit_width < 32:
        x = x.astype(stored.to_pandas_dtype())  # DuckDB widens float16 to float: back to the stored values
    return t.drop_columns([emb]), x


def _dtype_column(x: np.ndarray) -> pa.DictionaryArray:
    """The embedding dtype of every row, dictionary-encoded (one string stored)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(x), np.int32)), pa.array([x.dtype.str]))


def _embeddings_of(t: pa.Table) -> np.ndarray:
    """The raw (un-normalised) embedding rows of a compact table (``emb`` bytes + ``dtype``)."""
    if t.num_rows == 0:
        return np.zeros((0, 0), np.float32)
    return vectors.unpack(t["emb"], t["dtype"][0].as_py())


def _in_sample(uids: pa.ChunkedArray, cut: int) -> pa.Array:
    """Deterministic k-means sample: DuckDB's ``hash(uid) % 1e6 < cut`` (independent of the layout)."""
    import duckdb

    con = duckdb.connect()  # default settings: keeps the row order
    con.register("_u", pa.table({"u": uids}))
    mask = arrow(con.sql(f"SELECT hash(u) % {_SAMPLE_MOD} < {cut} AS m FROM _u"))["m"]
    con.close()
    return mask.combine_chunks()


def _scan_file(args: tuple) -> tuple[int, str | None, str | None]:
    """One input file -> its active rows in compact form (+ the k-means sample rows)."""
    path, emb, keep, cut, rows_out, sample_out = args
    cols = [S.UID, S.SHARD, S.SOURCE_ROW, emb, *keep_columns(keep, view_schema(path).names)]
    t, x = _read_active(path, cols, emb)
    if t.num_rows == 0:
        return 0, None, None
    rows = pa.table({S.UID: t[S.UID], S.SHARD: t[S.SHARD], S.SOURCE_ROW: t[S.SOURCE_ROW],
                     METRIC: metric_array(t, keep), "emb": vectors.pack(x), "dtype": _dtype_column(x)})
    fs.write_table(rows, rows_out, compression="none")
    if cut <= 0:
        return t.num_rows, rows_out, None
    if cut >= _SAMPLE_MOD:  # every row is in the sample
        return t.num_rows, rows_out, rows_out
    picked = rows.filter(_in_sample(t[S.UID], cut))
    if picked.num_rows == 0:
        return t.num_rows, rows_out, None
    fs.write_table(picked.select(_SAMPLE_COLUMNS), sample_out, compression="none")
    return t.num_rows, rows_out, sample_out


def _scan(args: tuple[list[str], str, str, int, str, str]) -> list[tuple[int, str | None, str | None]]:
    """The only read of the input files: count rows with an embedding, write them in compact form
    (uid, shard, row, keep-rule value, raw embedding bytes) and the k-means sample.  Files are read
    in parallel (``vectors.parallel_map``; decoding parquet lists is the costly part)."""
    files, emb, keep, cut, out, name = args
    jobs = [(f, emb, keep, cut, f"{out}/rows/{name}-{j:05d}.parquet", f"{out}/sample/{name}-{j:05d}.parquet")
            for j, f in enumerate(files)]
    return vectors.parallel_map(_scan_file, jobs)


def _train(args: tuple[list[str], int, int, int, str, str, str, str]) -> int:
    """Spherical k-means (FAISS) on the sample, rows ordered by uid or by input position; the
    centroids are saved as ``out``.  Beyond 256 rows per centroid FAISS trains on a random subset
    (``faiss.rand_perm`` with the seed); those rows are picked here the same way
    (:func:`curate.dedup.vectors.faiss_training_rows`), so only they are loaded in float32."""
    samples, k, iterations, seed, order, out, device, backend = args
    keys_cols = [S.UID] if order == "uid" else [S.SHARD, S.SOURCE_ROW]
    keys = pa.concat_tables(store.read_files(samples, columns=keys_cols))
    n = keys.num_rows
    k = min(k, n)
    rows = pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in keys_cols]).to_numpy()
    picked = vectors.faiss_training_rows(n, k, seed, backend)
    if picked is not None:
        rows = rows[picked]  # training order: FAISS's subset, in FAISS's order
    ends = np.cumsum([fs.read_metadata(f).num_rows for f in samples], dtype=np.int64)
    x32 = None
    for f, lo, hi in zip(samples, [0, *ends[:-1].tolist()], ends.tolist()):
        at = np.flatnonzero((rows >= lo) & (rows < hi))
        if len(at) == 0:
            continue
        emb = _embeddings_of(fs.read_table(f, columns=["emb", "dtype"]))
        x32 = np.empty((len(rows), emb.shape[1]), np.float32) if x32 is None else x32
        x32[at] = emb[rows[at] - lo]
    fs.save_npy(out, vectors.spherical_kmeans(x32, k, iterations, seed, device, backend))
    return n


def _assign(args: tuple) -> int:
    """Nearest centroid of every compact row of a file group; rows written by cluster bucket."""
    files, centroids, buckets, out, name, device = args
    c64 = fs.load_npy(centroids)
    out = fs.as_path(out)

    def one(job: tuple[int, str]) -> int:
        j, path = job
        t = fs.read_table(path)
        labels = vectors.nearest(_embeddings_of(t), c64, device)
        store.write_partitioned(t.append_column("cluster", pa.array(labels, pa.int64())), labels % buckets,
                                out, f"{name}-{j:05d}")
        return t.num_rows

    with vectors.torch_single_thread():
        return sum(vectors.parallel_map(one, list(enumerate(files))))


def decide(t: pa.Table, x: np.ndarray, cutoff: float, mode: str, device: str,
           centroid: np.ndarray | None = None, parallel: bool = True) -> tuple[pa.Table, int]:
    """Decisions for the rows of one cluster (or all rows for the exact method).

    ``t``: the rows' uid, shard, source_row and keep-rule value; ``x``: their raw embeddings;
    ``centroid``: the cluster's unit centroid (mode semdedup).  Only rows in a similar pair can be
    removed or be a target, so ranks and positions are computed for those rows alone: their
    relative order is the same as over the whole cluster."""
    i, j, sim = vectors.similar_pairs(x, cutoff, device, parallel)
    rows = np.unique(np.concatenate([i, j]))
    if len(rows) == 0:
        return store.decisions_table([], [], [], []), 0
    sub = t.take(pa.array(rows))
    a, b = np.searchsorted(rows, i), np.searchsorted(rows, j)
    if mode == "semdedup":
        # farthest from the centroid first: smallest (embedding as stored) . centroid, in float64
        near = vectors.inner(x[rows], centroid)
        order = pc.sort_indices(pa.table({"c": pa.array(near), "s": sub[S.SHARD], "r": sub[S.SOURCE_ROW]}),
                                sort_keys=[("c", "ascending"), ("s", "ascending"), ("r", "ascending")])
        pos = np.empty(len(rows), np.int64)
        pos[order.to_numpy()] = np.arange(len(rows))
        removed, target, tsim = semdedup(pos, a, b, sim)
    else:
        removed, target, tsim = keep_one(rank(sub[METRIC], sub[S.UID]), a, b, sim)
    idx = np.flatnonzero(removed)
    uids = sub[S.UID].to_numpy(zero_copy_only=False)
    targets = uids[target[idx]]
    detail = [f"cosine {s:.4f} with {u}" for s, u in zip(tsim[idx].tolist(), targets.tolist())]
    dec = store.decisions_table(sub[S.SHARD].take(pa.array(idx)), uids[idx].tolist(), targets.tolist(), detail)
    return dec, len(i)


def _clusters(args: tuple) -> dict[str, int]:
    """One bucket of clusters: decisions of every cluster in it (clusters on ``store.threads()`` threads)."""
    assign_dir, b, cutoff, mode, parts_dir, buckets, device, centroids = args
    files = store.partition_files(assign_dir, b)
    if not files:
        return {"pairs": 0, "removed": 0, "largest": 0}
    t = pa.concat_tables(store.read_files(files))
    labels = t["cluster"].to_numpy()
    order = np.argsort(labels, kind="stable")  # row order inside a cluster does not matter
    labels = labels[order]
    x = _embeddings_of(t.select(["emb", "dtype"]).combine_chunks())
    meta = t.select([S.UID, S.SHARD, S.SOURCE_ROW, METRIC])
    c64 = fs.load_npy(centroids) if mode == "semdedup" else None
    cuts = np.flatnonzero(np.diff(labels)) + 1
    spans = [(int(lo), int(hi)) for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(labels)])]

    def one(span: tuple[int, int]) -> tuple[pa.Table, int] | None:
        lo, hi = span
        if hi - lo < 2:
            return None
        idx = order[lo:hi]
        return decide(meta.take(pa.array(idx)), x[idx], cutoff, mode, device,
                      c64[labels[lo]] if c64 is not None else None, parallel=False)

    with vectors.torch_single_thread():
        results = [r for r in vectors.parallel_map(one, spans) if r is not None]
    outs = [dec for dec, _ in results]
    if outs:
        store.write_decisions(pa.concat_tables(outs), parts_dir, f"b{b:05d}", buckets)
    return {"pairs": sum(n for _, n in results), "removed": sum(d.num_rows for d in outs),
            "largest": max(hi - lo for lo, hi in spans)}


def _exact(args: tuple[list[str], float, str, int, str]) -> dict[str, int]:
    """Method exact: every compact row in this one task, all pairs above the cut-off."""
    files, cutoff, parts_dir, buckets, device = args
    t = pa.concat_tables(store.read_files(files)).combine_chunks() if files else None
    if t is None or t.num_rows < 2:
        return {"pairs": 0, "removed": 0}
    return _exact_decide(t, _embeddings_of(t), cutoff, parts_dir, buckets, device)


def _exact_inputs(args: tuple) -> dict[str, int]:
    """Method exact on inputs known to be small (live rows <= ``exact_max_rows``): the active rows
    are read straight from the input files in this one task -- no compact copy is written."""
    files, emb, keep, cutoff, parts_dir, buckets, device = args

    def one(path: str) -> tuple[pa.Table, np.ndarray]:
        t, x = _read_active(path, [S.UID, S.SHARD, S.SOURCE_ROW, emb, *keep_columns(keep, view_schema(path).names)],
                            emb)
        return pa.table({S.UID: t[S.UID], S.SHARD: t[S.SHARD], S.SOURCE_ROW: t[S.SOURCE_ROW],
                         METRIC: metric_array(t, keep)}), x

    got = [(t, x) for t, x in vectors.parallel_map(one, files) if t.num_rows]
    n = sum(t.num_rows for t, _ in got)
    if n < 2:
        return {"pairs": 0, "removed": 0, "rows": n}
    t = pa.concat_tables([t for t, _ in got]).combine_chunks()
    return {**_exact_decide(t, np.concatenate([x for _, x in got]), cutoff, parts_dir, buckets, device), "rows": n}


def _exact_decide(t: pa.Table, x: np.ndarray, cutoff: float, parts_dir: str, buckets: int,
                  device: str) -> dict[str, int]:
    with vectors.torch_single_thread():
        dec, pairs = decide(t, x, cutoff, "keep_one", device)
    store.write_decisions(dec, parts_dir, "exact", buckets)
    return {"pairs": pairs, "removed": dec.num_rows}


@register
class DedupSemantic(DedupStage):
    name = "dedup_semantic"
    Params = DedupSemanticParams
    duplicate_kind = "semantic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p: DedupSemanticParams = self.params  # type: ignore[assignment]
        if (p.method == "kmeans" or p.mode == "semdedup") and p.kmeans_backend == "faiss":
            vectors.import_faiss(self.id)  # method auto: checked when it picks k-means

    def fit(self, ctx: Any) -> Any:
        p: DedupSemanticParams = self.params  # type: ignore[assignment]
        check_columns(self, ctx, (S.UID, S.SHARD, p.column), p.keep if p.mode == "keep_one" else None)
        work = fs.as_path(ctx.work_dir)
        for sub in ("rows", "sample", "assign", "parts"):
            fs.remove(work / sub)
            fs.makedirs(work / sub)
        device, gpus = self._device(ctx)
        keep = p.keep if p.mode == "keep_one" else "smallest_uid"
        buckets = store.n_buckets(len(ctx.paths))
        info: dict[str, Any] = {"mode": p.mode, "threshold": p.cutoff, "keep": p.keep if p.mode == "keep_one" else
                                "semdedup order", "device": device}
        if p.mode == "keep_one" and p.method != "kmeans" and ctx.total_rows is not None \
                and ctx.total_rows <= p.exact_max_rows:
            # few live rows: exact search straight from the inputs (no compact copy, no k-means sample)
            res = ctx.map(_exact_inputs, [(list(ctx.paths), p.column, keep, p.cutoff, str(work / "parts"), buckets,
                                           device)], num_gpus=gpus)[0]
            n = res.pop("rows")
            info.update(method="exact", rows_with_embedding=n, **res)
            return self._finish(ctx, work, info, buckets)
        total = max(1, ctx.total_rows or 1)
        k_hint = p.n_clusters or math.ceil(total / p.rows_per_cluster)
        want = min(p.kmeans_max_sample, k_hint * p.kmeans_sample_per_centroid)
        train = p.centroids_path is None and p.method != "exact"
        cut = min(_SAMPLE_MOD, math.ceil(_SAMPLE_MOD * want / total)) if train else 0
        groups = store.file_groups(ctx.paths)
        scans = ctx.map(_scan, [(g, p.column, keep, cut, str(work), f"s{i:05d}")
                                             for i, g in enumerate(groups)])
        n = sum(c for group in scans for c, _, _ in group)
        rows = [[r for _, r, _ in group if r] for group in scans]
        exact = p.method == "exact" or (p.method == "auto" and p.mode == "keep_one" and n <= p.exact_max_rows)
        if p.method == "exact" and n > p.exact_max_rows:
            raise StageError(f"{self.id}: method exact holds all {n:,} embeddings in one process (limit "
                             f"exact_max_rows={p.exact_max_rows:,}); use method: kmeans (SemDeDup) for larger corpora")
        info["rows_with_embedding"] = n
        if exact:
            res = ctx.map(_exact, [([r for g in rows for r in g], p.cutoff, str(work / "parts"),
                                                 buckets, device)], num_gpus=gpus)[0]
            info.update(method="exact", **res)
        else:
            centroids = self._centroids(ctx, [s for group in scans for _, _, s in group if s], n, work, info)
            cb = store.n_partitions(n, p.rows_per_bucket)
            ctx.map(_assign, [(g, centroids, cb, str(work / "assign"), f"a{i:05d}", device)
                                           for i, g in enumerate(rows) if g], num_gpus=gpus)
            fs.remove(work / "rows")
            res = ctx.map(_clusters, [(str(work / "assign"), b, p.cutoff, p.mode, str(work / "parts"),
                                                    buckets, device, centroids) for b in range(cb)], num_gpus=gpus)
            info.update(method="kmeans", n_clusters=len(fs.load_npy(centroids, mmap=True)), cluster_buckets=cb,
                        largest_cluster=max(r["largest"] for r in res), pairs=sum(r["pairs"] for r in res),
                        removed=sum(r["removed"] for r in res))
        return self._finish(ctx, work, info, buckets)

    def _finish(self, ctx: Any, work: Any, info: dict[str, Any], buckets: int) -> dict[str, Any]:
        for sub in ("rows", "sample", "assign"):
            fs.remove(work / sub)
        info["decisions"] = store.compact_decisions(ctx, work / "parts", buckets)
        log.info("%s: %s method, %d rows with embeddings, %d removed", self.id, info["method"],
                 info["rows_with_embedding"], info["removed"])
        return info

    def _device(self, ctx: Any, device: str | None = None) -> tuple[str, float]:
        p: DedupSemanticParams = self.params  # type: ignore[assignment]
        device = device or p.device
        if ctx.kind == "ray" and device != "cpu":
            import ray

            if ray.cluster_resources().get("GPU", 0) > 0:
                return "cuda", p.gpus_per_task
        return vectors.resolve_device(device), 0.0

    def _centroids(self, ctx: Any, samples: list[str], n: int, work: Any, info: dict[str, Any]) -> str:
        """Path of the (k, d) unit centroids: given ones, or trained in one task on the sample."""
        p: DedupSemanticParams = self.params  # type: ignore[assignment]
        out = work / "centroids.npy"
        if p.centroids_path:
            fs.save_npy(out, vectors.normalise(fs.load_npy(p.centroids_path)))
            return str(out)
        if not samples:
            raise StageError(f"stage {self.id!r}: no rows with {p.column} to train k-means on")
        k = p.n_clusters or math.ceil(n / p.rows_per_cluster)
        order = "input" if p.mode == "semdedup" else "uid"
        device, gpus = self._device(ctx, p.kmeans_device or p.device)
        info["kmeans_device"] = device
        info["kmeans_backend"] = p.kmeans_backend
        log.info("%s: spherical k-means (FAISS, %s), k=%d, %d iterations, seed %d", self.id, device, k,
                 p.kmeans_iterations, p.seed)
        ctx.map(_train, [(samples, k, p.kmeans_iterations, p.seed, order, str(out), device, p.kmeans_backend)],
                num_gpus=gpus)
        return str(out)
