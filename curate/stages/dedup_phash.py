"""``dedup_phash``: perceptual near-duplicates, pHashes within a Hamming ``radius``.

Default ``radius: 6`` (of 64 bits).  Measured on real photos (scikit-image) at the demo's
256 px: JPEG re-encodes at quality 30-90 move the hash by 0-6 bits (median 0), resizes
0.5x-2x by 0-4, light colour jitter by 0-2, 2 % crops by ~4 (5 % crops by up to 26, which
pHash cannot follow: semantic dedup's job), while distinct crops of the same photo and
different look-alike photos are >= 10 bits apart.  6 covers every re-encode and resize
with a 4-bit margin to the closest look-alike.  On the quality corpus of
``tests/test_dedup_quality.py`` (69 overlapping crops of 23 photos, 11 variants each) radius
3 finds 94 % of re-encodes/resizes, 6 finds 99.8 %, both at pair precision 1.0.  Any radius
4-7 costs the same (see below); 8-11 costs ~15x more.

Algorithm (no all-pairs comparison, bounded memory):

1. rows are hash-shuffled by pHash (DuckDB, ``ctx.map`` tasks); each partition collapses
   identical hashes onto their best row by the keep rule (the others are duplicates of it,
   distance 0) and writes one row per distinct hash;
2. multi-index hashing (:mod:`curate.dedup.mih`): each distinct hash gets ``4*C(16, radius//4)``
   keys, keys are shuffled into partitions (tasks; with a single key partition the keys are
   made by the one task that needs them, nothing written), and pairs sharing a key are verified by
   popcount -- every pair within ``radius`` is found exactly once (pigeonhole over 16-bit
   chunks), no pair farther is reported;
3. the near-duplicate graph between distinct hashes is resolved best-first by the keep rule
   (:func:`curate.dedup.greedy.keep_one`): a hash's best row is removed iff a better kept
   hash is within ``radius``; ``duplicate_of`` = the closest such kept row.  A node's
   decision depends only on its connected component, so the resolution is partitioned:
   edges are spread by node partition (one per ``rows_per_partition`` edge ends); with more
   than one partition the connected components are computed in rounds of ``ctx.map`` tasks
   (:mod:`curate.dedup.components`); components are grouped into buckets (one per
   ``rows_per_partition`` edges) and each bucket is resolved in its own task.  The result is
   exactly the sequential keep-one over the whole graph (``tests/test_dedup_scale.py``
   compares it with a brute-force reference, on both runners, with many partitions);
4. rows that shared a hash follow their hash's best row (its ``duplicate_of``, or the best
   row itself when it was kept).

Scale: step 2 checks about ``4*C(16, s) * N^2 / 2^(17-s)`` candidate pairs for N uniformly
spread distinct hashes (s = radius // 4): 1M hashes at radius 6 take ~1 min on 2 cores
(``bench/dedup.py``), 16x less than FAISS brute force.  The work grows with N^2 / 65536, so
beyond ~1e8 distinct hashes use radius <= 3 (32x fewer checks) or split the corpus.  Memory:
a task holds one partition (about ``rows_per_partition`` rows, keys or edges), except that the
tasks of step 3 hold whole connected components, so one component must fit a task (a component
is a family of near-identical images: even a meme with 10M variants is ~1 GB of edges).  The
driver holds only file lists and counts; under Ray every step runs in tasks, so its peak memory
does not grow with the corpus (``bench/dedup_scale.py``: 262 MB at 20,000 rows and at 200,000).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import schema as S
from curate.dedup import components, mih, store
from curate.dedup.base import METRIC, DedupParams, DedupStage, check_columns, metric_sql, order_sql, rank
from curate.dedup.greedy import keep_one
from curate.io import fs
from curate.io.sql import arrow
from curate.registry import register

log = logging.getLogger(__name__)

RESOLVED_SCHEMA = pa.schema([(S.PHASH, pa.uint64()), ("target_uid", pa.string()), ("d", pa.int64())])
KEYS_PER_PARTITION = 8_000_000  # ~0.5 GB of working memory in a pair-finding task
VALUES_PER_CHUNK = 1 << 17  # key expansion: 8M keys at radius 4-7


class DedupPhashParams(DedupParams):
    stage: Literal["dedup_phash"] = "dedup_phash"
    radius: int = Field(6, ge=0, le=mih.MAX_RADIUS, description="max Hamming distance (of 64 bits) between "
                        "the pHashes of near-duplicates")


def _values(args: tuple[str, str, int, str, list[str]]) -> tuple[str, int, int]:
    """Partition of rows by hash -> one row per distinct hash (the best) + the other rows."""
    source, out_dir, p, work, inputs = args
    con = store.duckdb_connect(work, inputs)
    t = arrow(con.sql(f"""
        SELECT _k AS {S.PHASH}, {S.UID}, {S.SHARD}, {METRIC},
               row_number() OVER (PARTITION BY _k ORDER BY {order_sql()}) AS _rn
        FROM {source}"""))
    con.close()
    best = pc.equal(t["_rn"], 1)
    vals = t.filter(best).drop_columns(["_rn"]).sort_by(S.PHASH)
    members = t.filter(pc.invert(best)).select([S.PHASH, S.UID, S.SHARD])
    out = fs.as_path(out_dir)
    fs.write_table(vals, out / f"values-{p:05d}.parquet")
    fs.write_table(members, out / f"members-{p:05d}.parquet")
    return str(out / f"values-{p:05d}.parquet"), vals.num_rows, p


def _members_name(values: str) -> str:
    """The members file beside a values file (``.../values-N.parquet`` -> ``.../members-N.parquet``)."""
    head, _, name = values.rpartition("/")
    return (head + "/" if head else "") + name.replace("values-", "members-", 1)


def _keys(args: tuple[str, int, int, str, str]) -> None:
    """Map side of the MIH shuffle: keys of one values file, written by key partition.

    Values are expanded ``VALUES_PER_CHUNK`` at a time (each gives 4*C(16, radius//4) keys)."""
    path, radius, parts, out, name = args
    values = fs.read_table(path, columns=[S.PHASH])[S.PHASH].to_numpy()
    for c, lo in enumerate(range(0, len(values), VALUES_PER_CHUNK)):
        chunk = values[lo:lo + VALUES_PER_CHUNK]
        k, i = mih.keys(chunk, radius)
        store.write_partitioned(pa.table({"k": k, "h": chunk[i]}), mih.partition_of(k, parts), fs.as_path(out),
                                f"{name}-{c:04d}")


def _pairs(args: tuple[str, int, int, str]) -> int:
    """Reduce side: verified pairs of distinct hashes of one key partition."""
    keys_dir, q, radius, out = args
    files = store.partition_files(keys_dir, q)
    if not files:
        return 0
    t = pa.concat_tables(store.read_files(files))
    return _write_pairs(t["k"].to_numpy(), t["h"].to_numpy(), radius, out)


def _pairs_direct(args: tuple[list[str], int, str]) -> int:
    """One key partition only: the keys of every value are made in this task, no shuffle written."""
    paths, radius, out = args
    values = np.concatenate([t[S.PHASH].to_numpy() for t in store.read_files(paths, columns=[S.PHASH])]
                            or [np.zeros(0, np.uint64)])
    k, i = mih.keys(values, radius)
    return _write_pairs(k, values[i], radius, out)


def _write_pairs(k: np.ndarray, h: np.ndarray, radius: int, out: str) -> int:
    a, b, d = mih.pairs(k, h, radius)
    fs.write_table(pa.table({"a": pa.array(h[a], pa.uint64()), "b": pa.array(h[b], pa.uint64()),
                             "d": pa.array(d, pa.uint8())}), out)
    return len(a)


def _spread(args: tuple[str, int, str, str]) -> None:
    """Edges of one MIH partition -> by the node partition of ``a`` (and, with several node
    partitions, in adjacency form for the connected components)."""
    path, parts, graph, name = args
    t = fs.read_table(path)
    if t.num_rows == 0:
        return
    a, b = t["a"].to_numpy(), t["b"].to_numpy()
    g = fs.as_path(graph)
    store.write_partitioned(t, components.node_partition(a, parts), g / "edges", name)
    if parts > 1:
        components.write_adjacency(a, b, g / "adjacency", parts, name)


def _labels(args: tuple[str | None, str, int, int, int, int, str]) -> None:
    """Node partition ``p``: component of every node; its edges go to their component's bucket and
    its (node, component) labels to the hash partition of the node (where its values row is)."""
    stars, graph, p, parts, buckets, hash_parts, name = args
    g = fs.as_path(graph)
    edges = store.read_files(store.partition_files(g / "edges", p))
    if stars is None:  # one node partition: all nodes in one bucket, no components needed
        t = pa.concat_tables(edges)
        nodes = np.unique(np.concatenate([t["a"].to_numpy(), t["b"].to_numpy()]))
        comp = np.zeros(len(nodes), np.uint64)
    else:
        nodes, comp = components.star_labels(store.partition_files(stars, p))
    if edges:
        t = pa.concat_tables(edges)
        ca = comp[np.searchsorted(nodes, t["a"].to_numpy())]
        store.write_partitioned(t, components.node_partition(ca, buckets), g / "bucket_edges", name)
    labels = pa.table({S.PHASH: pa.array(nodes, pa.uint64()), "comp": pa.array(comp, pa.uint64())})
    store.write_partitioned(labels, store.duckdb_partition(nodes, hash_parts), g / "labels", name)


def _node_info(args: tuple[str, int, str, int, str]) -> None:
    """Hash partition ``i``: keep-rule values of its graph nodes, to their component's bucket."""
    vals_path, i, graph, buckets, name = args
    g = fs.as_path(graph)
    files = store.partition_files(g / "labels", i)
    if not files:
        return
    labels = pa.concat_tables(store.read_files(files))
    vals = fs.read_table(vals_path, columns=[S.PHASH, S.UID, METRIC]).join(labels, S.PHASH, join_type="inner")
    store.write_partitioned(vals.select([S.PHASH, S.UID, METRIC]),
                            components.node_partition(vals["comp"].to_numpy(), buckets), g / "bucket_nodes", name)


def _resolve_bucket(args: tuple[str, int, int, str, str]) -> int:
    """Keep-one over the components of one bucket; writes (phash, target_uid, d) of removed distinct
    hashes by hash partition.  Components are whole in a bucket, so this equals keep-one over the
    whole graph."""
    graph, r, hash_parts, out, name = args
    g = fs.as_path(graph)
    node_files = store.partition_files(g / "bucket_nodes", r)
    if not node_files:
        return 0
    info = pa.concat_tables(store.read_files(node_files)).sort_by(S.PHASH)
    edges = pa.concat_tables(store.read_files(store.partition_files(g / "bucket_edges", r)))
    nodes = info[S.PHASH].to_numpy()
    a, b = edges["a"].to_numpy(), edges["b"].to_numpy()
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    assert (nodes[ia] == a).all() and (nodes[ib] == b).all(), "pHash graph: an edge's node has no values row"
    d = edges["d"].to_numpy().astype(np.int64)
    removed, target, tsim = keep_one(rank(info[METRIC], info[S.UID]), ia, ib, -d.astype(np.float64))
    idx = np.flatnonzero(removed)
    uids = info[S.UID].to_numpy(zero_copy_only=False)
    t = pa.table({S.PHASH: pa.array(nodes[idx], pa.uint64()), "target_uid": pa.array(uids[target[idx]], pa.string()),
                  "d": pa.array((-tsim[idx]).astype(np.int64))}, schema=RESOLVED_SCHEMA)
    store.write_partitioned(t, store.duckdb_partition(nodes[idx], hash_parts), fs.as_path(out), name)
    return len(idx)


def _members(args: tuple[str, str, str, str, str, int]) -> int:
    """Decisions of one hash partition: removed best rows and every non-best row."""
    vals_path, members_path, resolved_dir, parts_dir, name, buckets = args
    files = fs.listdir(resolved_dir, suffix=".parquet")
    resolved = pa.concat_tables(store.read_files(files)) if files else RESOLVED_SCHEMA.empty_table()
    vals = fs.read_table(vals_path, columns=[S.PHASH, S.UID, S.SHARD])
    gone = vals.join(resolved, S.PHASH, join_type="inner")
    mem = fs.read_table(members_path).join(resolved, S.PHASH, join_type="left outer")
    best = vals.select([S.PHASH, S.UID]).rename_columns([S.PHASH, "best_uid"])
    mem = mem.join(best, S.PHASH, join_type="left outer")
    mem_target = pc.coalesce(mem["target_uid"], mem["best_uid"])
    mem_d = pc.coalesce(mem["d"], pa.scalar(0, pa.int64()))
    shard = pa.chunked_array(gone[S.SHARD].chunks + mem[S.SHARD].chunks, pa.string())
    uid = pa.chunked_array(gone[S.UID].chunks + mem[S.UID].chunks, pa.string())
    target = pa.chunked_array(gone["target_uid"].chunks + mem_target.chunks, pa.string())
    dist = pa.chunked_array(gone["d"].chunks + mem_d.chunks, pa.int64())
    detail = pc.binary_join_element_wise("phash distance ", pc.cast(dist, pa.string()), " to ", target, "")
    return store.write_decisions(store.decisions_table(shard, uid, target, detail), parts_dir, name, buckets)


@register
class DedupPhash(DedupStage):
    name = "dedup_phash"
    Params = DedupPhashParams
    duplicate_kind = "phash"

    def fit(self, ctx: Any) -> Any:
        p: DedupPhashParams = self.params  # type: ignore[assignment]
        schema = check_columns(self, ctx, (S.UID, S.SHARD, S.PHASH), p.keep)
        work = fs.as_path(ctx.work_dir)
        for sub in ("values", "keys", "edges", "graph", "resolved", "parts"):
            fs.remove(work / sub)
            fs.makedirs(work / sub)
        # 1. one row per distinct hash
        select = (f"SELECT {S.SHARD}, {S.UID}, {metric_sql(p.keep, schema.names)} AS {METRIC}, {S.PHASH} AS _k "
                  f"FROM {{src}} WHERE {S.REJECT_REASON} IS NULL AND {S.PHASH} IS NOT NULL")
        parts = store.n_partitions(ctx.total_rows, p.rows_per_partition)
        sources = store.shuffle(ctx, select, parts, work / "shuffle")
        vals = ctx.map(_values, [(src, str(work / "values"), i, str(work), ctx.paths[:1])
                                              for i, src in enumerate(sources) if src])
        fs.remove(work / "shuffle")
        n_values = sum(n for _, n, _ in vals)
        # 2. pairs of distinct hashes within the radius (multi-index hashing)
        n_keys = n_values * mih.CHUNKS * len(mih.masks(mih.chunk_radius(p.radius)))
        kparts = store.n_partitions(n_keys, KEYS_PER_PARTITION)
        if kparts == 1:  # the shuffle would write every key to one partition: make them where they are used
            n_pairs = ctx.map(_pairs_direct, [([path for path, _, _ in vals], p.radius,
                                               str(work / "edges" / "e00000.parquet"))])[0]
        else:
            ctx.map(_keys, [(path, p.radius, kparts, str(work / "keys"), f"v{i:05d}")
                            for i, (path, _, _) in enumerate(vals)])
            n_pairs = sum(ctx.map(_pairs, [(str(work / "keys"), q, p.radius, str(work / "edges" / f"e{q:05d}.parquet"))
                                           for q in range(kparts)]))
        fs.remove(work / "keys")
        # 3. best-first resolution, per bucket of connected components of the near-duplicate graph
        node_parts = store.n_partitions(2 * n_pairs, p.rows_per_partition)
        buckets = store.n_partitions(n_pairs, p.rows_per_partition)
        if n_pairs:
            self._resolve(ctx, work, vals, parts, node_parts, buckets)
        # 4. decisions for removed best rows and for rows sharing a hash
        dbuckets = store.n_buckets(len(ctx.paths))
        removed = sum(ctx.map(_members, [(v, _members_name(v),
                                                       str(work / "resolved" / f"p{i:05d}"), str(work / "parts"),
                                                       f"m{j:05d}", dbuckets) for j, (v, _, i) in enumerate(vals)]))
        fs.remove(work / "resolved")
        decisions = store.compact_decisions(ctx, work / "parts", dbuckets)
        log.info("%s: %d distinct pHashes, %d pairs within %d bits, %d rows removed", self.id, n_values, n_pairs,
                 p.radius, removed)
        return {"radius": p.radius, "keep": p.keep, "distinct_hashes": n_values, "pairs": n_pairs,
                "hash_partitions": parts, "key_partitions": kparts, "graph_partitions": node_parts,
                "component_buckets": buckets, "removed": removed, "decisions": decisions}

    def _resolve(self, ctx: Any, work: Any, vals: list[tuple[str, int, int]], parts: int, node_parts: int,
                 buckets: int) -> None:
        """Keep-one over the edges, partitioned: connected components (several node partitions),
        component buckets, one keep-one task per bucket; writes ``resolved/pNNNNN/`` by hash partition."""
        graph = work / "graph"
        edge_files = fs.listdir(work / "edges", suffix=".parquet")
        ctx.map(_spread, [(str(f), node_parts, str(graph), f.stem) for f in edge_files])
        fs.remove(work / "edges")
        stars = None
        if node_parts > 1:
            stars = str(components.components(ctx, graph / "adjacency", node_parts, graph / "cc"))
        ctx.map(_labels, [(stars, str(graph), q, node_parts, buckets, parts, f"l{q:05d}")
                                       for q in range(node_parts)])
        ctx.map(_node_info, [(v, i, str(graph), buckets, f"n{i:05d}") for v, _, i in vals])
        ctx.map(_resolve_bucket, [(str(graph), r, parts, str(work / "resolved"), f"r{r:05d}")
                                               for r in range(buckets)])
        fs.remove(graph)
