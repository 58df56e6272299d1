"""Which rows of a near-duplicate graph are kept: the keep-one rule and SemDeDup's rule.

Both take nodes ``0..n-1`` and undirected verified edges ``(a, b, sim)`` (sim: higher = more
alike; a pHash distance ``d`` is passed as ``-d``) and return ``(removed, target, target_sim)``
with ``target[i]`` the node a removed node ``i`` is a duplicate of (-1 when kept).
"""

from __future__ import annotations

import numpy as np

_MAX_ROUNDS = 64
_UNDECIDED, _KEPT, _REMOVED = 0, 1, 2


def keep_one(rank: np.ndarray, a: np.ndarray, b: np.ndarray, sim: np.ndarray):
    """Visit nodes best-first (``rank`` 0 = best): a node is removed iff a better *kept* node is
    its neighbour; its target is the most similar such node (ties: the better one).

    This is the sequential greedy rule, computed in parallel rounds: a node is decided as soon
    as every better neighbour is (at least one node, the best undecided, is decided per round);
    chains longer than ``_MAX_ROUNDS`` are finished sequentially in rank order.
    """
    n = len(rank)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    sim = np.asarray(sim, np.float64)
    hi = np.where(rank[a] < rank[b], a, b)  # the better end of each edge
    lo = np.where(rank[a] < rank[b], b, a)
    state = np.zeros(n, np.int8)
    has_better = np.zeros(n, bool)
    has_better[lo] = True
    state[~has_better] = _KEPT
    for _ in range(_MAX_ROUNDS):
        if not (state == _UNDECIDED).any():
            break
        hit = (state[hi] == _KEPT) & (state[lo] == _UNDECIDED)
        state[lo[hit]] = _REMOVED
        blocked = np.zeros(n, bool)
        blocked[lo[(state[hi] != _REMOVED) & (state[lo] == _UNDECIDED)]] = True
        state[(state == _UNDECIDED) & ~blocked] = _KEPT
    if (state == _UNDECIDED).any():
        _finish_sequentially(state, rank, hi, lo)
    removed = state == _REMOVED
    target = np.full(n, -1, np.int64)
    target_sim = np.full(n, np.nan)
    ok = (state[hi] == _KEPT) & removed[lo]
    h, l, s = hi[ok], lo[ok], sim[ok]
    order = np.lexsort((rank[h], -s, l))  # per removed node: most similar, then better
    h, l, s = h[order], l[order], s[order]
    first = np.r_[True, l[1:] != l[:-1]] if len(l) else np.zeros(0, bool)
    target[l[first]] = h[first]
    target_sim[l[first]] = s[first]
    return removed, target, target_sim


def _finish_sequentially(state: np.ndarray, rank: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> None:
    order = np.argsort(lo, kind="stable")
    lo_s, hi_s = lo[order], hi[order]
    starts = np.searchsorted(lo_s, np.arange(len(state) + 1))
    todo = np.flatnonzero(state == _UNDECIDED)
    for v in todo[np.argsort(rank[todo])]:
        better = hi_s[starts[v]:starts[v + 1]]
        state[v] = _REMOVED if (state[better] == _KEPT).any() else _KEPT


def semdedup(position: np.ndarray, a: np.ndarray, b: np.ndarray, sim: np.ndarray):
    """SemDeDup inside one cluster: ``position`` is each node's place in the cluster order.

    Node j is removed iff some earlier node is a neighbour (the caller passes only pairs with
    cosine > 1 - eps), whether or not that earlier node was itself removed; its target is the
    earlier neighbour with the highest similarity (ties: the earliest).
    """
    n = len(position)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    sim = np.asarray(sim, np.float64)
    first = np.where(position[a] < position[b], a, b)
    later = np.where(position[a] < position[b], b, a)
    removed = np.zeros(n, bool)
    removed[later] = True
    target = np.full(n, -1, np.int64)
    target_sim = np.full(n, np.nan)
    order = np.lexsort((position[first], -sim, later))
    f, l, s = first[order], later[order], sim[order]
    top = np.r_[True, l[1:] != l[:-1]] if len(l) else np.zeros(0, bool)
    target[l[top]] = f[top]
    target_sim[l[top]] = s[top]
    return removed, target, target_sim
