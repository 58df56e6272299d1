"""Connected components of a graph held as partitioned edge files, one ``ctx.map`` task per partition.

The algorithm is Large-Star / Small-Star alternation (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014).  Node ids are uint64 (pHash values here); an undirected edge
``{x, y}`` is stored in *adjacency form* as ``(x, y)`` in the partition of ``x`` and ``(y, x)`` in
the partition of ``y`` (:func:`node_partition`: Fibonacci hashing of the id).  One round:

* **Large-Star** (task per partition, adjacency form in): each node ``u`` with neighbours ``N(u)``
  and ``m = min(N(u) + {u})`` replaces every edge to a larger neighbour ``v`` by ``(v, m)``;
  output keyed by ``v``, the larger end;
* **Small-Star** (task per partition, keyed edges in): each node ``u`` with smaller neighbours
  ``N`` and ``m = min(N)`` links ``N + {u}`` to ``m``; output in adjacency form.

A phase reports how many edges it changed; when a whole round changes none, every component is a
star centred on its smallest id and ``star_labels`` gives each node that id (exact, whatever
the partitioning).  Rounds: O(log^2 n) in theory, a handful in practice.  Edge counts never grow
(duplicates are dropped on read), so a task holds about ``edges / parts`` edges, except that at
the end the partition of a component's centre holds that whole component (its star).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from curate.dedup import store
from curate.io import fs

log = logging.getLogger(__name__)

MAX_ROUNDS = 200
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def node_partition(ids: np.ndarray, parts: int) -> np.ndarray:
    """Partition of every uint64 node id (Fibonacci hashing; the same in every process)."""
    h = np.asarray(ids, np.uint64) * _GOLDEN
    return ((h >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def _write(u: np.ndarray, v: np.ndarray, out: Any, parts: int, name: str) -> None:
    """Edges ``(u, v)`` into ``out/pNNNNN/name.parquet`` by the partition of ``u``."""
    if len(u):
        store.write_partitioned(pa.table({"u": pa.array(u, pa.uint64()), "v": pa.array(v, pa.uint64())}),
                                node_partition(u, parts), out, name)


def write_adjacency(x: np.ndarray, y: np.ndarray, out: Any, parts: int, name: str) -> None:
    """Undirected edges ``{x, y}`` in adjacency form (both directions) under ``out``."""
    _write(np.concatenate([x, y]), np.concatenate([y, x]), out, parts, name)


def _read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct edges ``(u, v)`` of a partition without self-loops, sorted by ``(u, v)``."""
    if not files:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    t = pa.concat_tables(store.read_files(files))
    u, v = t["u"].to_numpy(), t["v"].to_numpy()
    keep = u != v
    u, v = u[keep], v[keep]
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    first = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])] if len(u) else np.zeros(0, bool)
    return u[first], v[first]


def _groups(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``u`` sorted: a start-of-group mask and every row's group number."""
    start = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
    return start, np.cumsum(start) - 1


def _large_star(args: tuple[str, int, int, str, str]) -> int:
    in_dir, p, parts, out, name = args
    u, v = _read(store.partition_files(in_dir, p))
    start, gid = _groups(u)
    m = np.minimum(u[start], v[start])[gid]  # v sorted within u: v[start] is the smallest neighbour
    up = v > u
    _write(v[up], m[up], out, parts, name)
    return int(np.count_nonzero(m[up] != u[up]))


def _small_star(args: tuple[str, int, int, str, str]) -> int:
    in_dir, p, parts, out, name = args
    u, w = _read(store.partition_files(in_dir, p))  # w < u: edges keyed by their larger end
    start, gid = _groups(u)
    m_g = w[start]
    m = m_g[gid]
    other = w != m
    x = np.concatenate([w[other], u[start]])
    y = np.concatenate([m[other], m_g])
    write_adjacency(x, y, out, parts, name)
    sizes = np.diff(np.r_[np.flatnonzero(start), len(u)])
    return int(np.count_nonzero(sizes > 1))


def components(ctx: Any, adjacency: Any, parts: int, work: Any) -> Any:
    """Run Large-Star / Small-Star rounds from the adjacency-form edges under ``adjacency`` until no
    edge changes; returns the directory of the final stars (adjacency form, same partitioning).
    Folders: local paths or ``UPath``s (:mod:`curate.io.fs`)."""
    adjacency, work = fs.as_path(adjacency), fs.as_path(work)
    current = adjacency
    for r in range(MAX_ROUNDS):
        keyed, nxt = work / f"r{r:05d}-keyed", work / f"r{r:05d}-stars"
        for d in (keyed, nxt):
            fs.remove(d)
            fs.makedirs(d)
        changed = sum(ctx.map(_large_star, [(str(current), p, parts, str(keyed), f"t{p:05d}")
                                                         for p in range(parts)]))
        changed += sum(ctx.map(_small_star, [(str(keyed), p, parts, str(nxt), f"t{p:05d}")
                                                          for p in range(parts)]))
        fs.remove(keyed)
        if str(current) != str(adjacency):
            fs.remove(current)
        current = nxt
        log.debug("connected components: round %d, %d edges changed", r, changed)
        if changed == 0:
            log.info("connected components: %d partitions, converged after %d rounds", parts, r + 1)
            return current
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")


def star_labels(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Converged stars of one partition -> (node ids sorted, component id = smallest id in it)."""
    u, v = _read(files)
    start, _ = _groups(u)
    return u[start], np.minimum(u[start], v[start])
