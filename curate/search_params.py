"""Search-time parameters of a FAISS index: set them, and tune them for a target recall (autofaiss-style).

* IVF indices: ``nprobe`` (lists visited per query), and ``k_factor`` of a ``Refine`` wrapper
  (candidates re-ranked per result, one of :data:`K_FACTORS`); an HNSW coarse quantizer gets
  ``efSearch = max(2 * nprobe, 64)``.
* HNSW indices: ``efSearch``.

``nprobe`` can also be fixed at build time (``curate index --nprobe``) or per search
(``curate search --nprobe``).

:func:`tune` tries increasing values on the recall queries and keeps the smallest one whose
recall@k against the exact top-k reaches the target (else the largest tried).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

K_FACTORS = (8, 16, 32, 64)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)


def _hnsw(index):
    import faiss

    idx = faiss.downcast_index(index)
    return idx if hasattr(idx, "hnsw") else None


def apply_params(index, params: dict[str, Any]) -> None:
    """Set ``nprobe`` / ``efSearch`` / ``k_factor`` on ``index`` (a CPU index, possibly wrapped)."""
    import faiss

    if "k_factor" in params:
        ref = faiss.downcast_index(index)
        if hasattr(ref, "k_factor"):
            ref.k_factor = int(params["k_factor"])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
        q = _hnsw(ivf.quantizer)
        if q is not None:
            q.hnsw.efSearch = max(2 * int(params["nprobe"]), 64)
    h = _hnsw(index)
    if h is not None and "efSearch" in params:
        h.hnsw.efSearch = int(params["efSearch"])


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) / max(1, int((t[:k] >= 0).sum()))
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune(index, queries: np.ndarray, truth: np.ndarray, k: int, target: float,
         nprobe: int | None = None) -> tuple[dict[str, Any], float]:
    """(params, recall@k): the cheapest setting reaching ``target`` (see the module doc); ``nprobe`` given:
    that many lists (at most nlist), only ``k_factor`` tuned."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    factors = K_FACTORS if hasattr(faiss.downcast_index(index), "k_factor") else (None,)
    if ivf is not None:
        probes = [p for p in NPROBES if p < ivf.nlist] + [ivf.nlist]
        if nprobe is not None:
            probes = [max(1, min(int(nprobe), ivf.nlist))]
        grid = [{"nprobe": p, **({"k_factor": f} if f else {})} for p in probes for f in factors]
    elif _hnsw(index) is not None:
        grid = [{"efSearch": e} for e in EF_SEARCH]
    else:
        grid = [{}]
    best: tuple[dict[str, Any], float] = ({}, 0.0)
    for g in grid:
        params = dict(g)
        apply_params(index, params)
        _, found = index.search(queries, k)
        r = recall_at(found, truth, k)
        log.debug("tune %s: recall@%d %.4f", params, k, r)
        best = (params, r)
        if r >= target:
            break
    return best
