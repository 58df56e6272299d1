"""FAISS pieces of semantic dedup, on the GPU when FAISS has one, on the CPU otherwise.

Every search runs in float32 (FAISS) with a safety margin (``MARGIN``) and is then re-checked
in float64 with numpy on the CPU: nearest centroids are picked among FAISS's best two in
float64 (ties: the smaller centroid id), similar pairs are the candidates above
``threshold - MARGIN`` whose float64 cosine is ``> threshold``.  Float32 error is ~1e-6, so CPU
and GPU give the same decisions and so do different thread counts.  k-means is a plain
spherical Lloyd loop whose assignment step uses the same nearest-centroid search and whose
update step sums in float64 in a fixed order, so it is device-independent too.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

MARGIN = 1e-3
_CHUNK = 8192
_GPU_MAX_K = 2048
_DENSE_MAX = 2048  # clusters up to this size: one dense float32 matmul


def gpu_available() -> bool:
    try:
        import faiss
    except ImportError:  # pragma: no cover
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if device == "cuda":
        log.warning("device: cuda asked but this FAISS build sees no GPU (pip install 'curate[gpu]'); using CPU")
    return "cpu"


def _setup(device: str):
    import faiss

    faiss.omp_set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))
    return faiss, (faiss.StandardGpuResources() if device == "cuda" else None)


def matrix(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<float> column without nulls as an (n, d) array of its own float type."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    d = int(lengths[0])
    if (lengths != d).any():
        raise ValueError(f"embeddings of different lengths ({sorted(set(lengths.tolist()))[:5]})")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, d)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised in float64 (zero rows stay zero)."""
    x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def embeddings(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<float16/float32> column without nulls as an (n, d) float64 array, L2-normalised."""
    return normalise(matrix(col))


def pack(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Rows of ``x`` as raw bytes (fast to write and read back in temporary files)."""
    x = np.ascontiguousarray(x)
    width = x.shape[1] * x.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(x), [None, pa.py_buffer(x.tobytes())])


def unpack(arr: pa.Array | pa.ChunkedArray, dtype: str) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), dtype)
    width = arr.type.byte_width
    raw = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * width:(arr.offset + len(arr)) * width]
    return raw.view(dtype).reshape(len(arr), -1)


def _knn(x32: np.ndarray, base32: np.ndarray, k: int, device: str):
    faiss, res = _setup(device)
    if res is not None:
        return faiss.knn_gpu(res, x32, base32, k, metric=faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexFlatIP(base32.shape[1])
    index.add(base32)
    return index.search(x32, k)


def nearest(x: np.ndarray, c64: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (max cosine) of every row of ``x`` and that cosine, decided in float64."""
    n, k = len(x), len(c64)
    labels, cos = np.zeros(n, np.int64), np.zeros(n)
    if n == 0:
        return labels, cos
    c32 = np.ascontiguousarray(c64, np.float32)
    kk = min(2, k)
    for lo in range(0, n, _CHUNK):
        xs = x[lo:lo + _CHUNK].astype(np.float64)
        _, idx = _knn(np.ascontiguousarray(xs, np.float32), c32, kk, device)
        idx = np.sort(idx, axis=1)  # ties in float64 go to the smaller centroid id
        s = np.einsum("nd,nkd->nk", xs, c64[idx])
        best = np.argmax(s, axis=1)
        labels[lo:lo + _CHUNK] = idx[np.arange(len(xs)), best]
        cos[lo:lo + _CHUNK] = s[np.arange(len(xs)), best]
    return labels, cos


def _verify(x64: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float):
    sims = np.concatenate([np.einsum("nd,nd->n", x64[i[lo:lo + _CHUNK]], x64[j[lo:lo + _CHUNK]])
                           for lo in range(0, len(i), _CHUNK)]) if len(i) else np.zeros(0)
    ok = sims > threshold
    return i[ok], j[ok], sims[ok]


def similar_pairs(x64: np.ndarray, threshold: float, device: str = "cpu"):
    """All pairs i < j with float64 cosine > threshold among the (normalised) rows of ``x64``."""
    n = len(x64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if n < 2:
        return empty
    x32 = np.ascontiguousarray(x64, np.float32)
    low = threshold - MARGIN
    if n <= _DENSE_MAX:
        i, j = np.nonzero(np.triu(x32 @ x32.T > low, 1))
    elif device == "cuda":
        i, j = _pairs_gpu(x32, low)
    else:
        faiss, _ = _setup("cpu")
        index = faiss.IndexFlatIP(x32.shape[1])
        index.add(x32)
        lims, _, nbr = index.range_search(x32, low)
        i = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
        keep = nbr > i
        i, j = i[keep], nbr[keep]
    return _verify(x64, i.astype(np.int64), j.astype(np.int64), threshold)


def _pairs_gpu(x32: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray]:
    """GPU FAISS has no range search on flat indexes: k-NN with k grown until it covers every
    neighbour above ``low``; rows needing more than the GPU's k limit use the CPU range search."""
    n = len(x32)
    out_i, out_j = [], []
    rows = np.arange(n)
    k = min(n, 64)
    while len(rows):
        sims, nbr = _knn(x32[rows], x32, k, "cuda")
        full = (sims[:, -1] > low) & (k < n)
        done = ~full
        r, c = np.nonzero((sims > low) & done[:, None])
        out_i.append(rows[r])
        out_j.append(nbr[r, c])
        rows = rows[full]
        k = min(n, k * 4)
        if len(rows) and k > _GPU_MAX_K:
            faiss, _ = _setup("cpu")
            index = faiss.IndexFlatIP(x32.shape[1])
            index.add(x32)
            lims, _, nb = index.range_search(x32[rows], low)
            out_i.append(np.repeat(rows, np.diff(lims).astype(np.int64)))
            out_j.append(nb)
            break
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    keep = j > i
    return i[keep], j[keep]


def spherical_kmeans(x: np.ndarray, k: int, iterations: int, seed: int, device: str = "cpu") -> np.ndarray:
    """Lloyd's k-means of the normalised rows ``x`` on the unit sphere; (k, d) float64 centroids.

    Init: k distinct rows drawn with ``seed``.  An empty cluster takes over half of the largest
    one (its centroid nudged by +-1e-4 along a fixed direction), as FAISS does.
    """
    n, d = x.shape
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    c = x[np.sort(rng.choice(n, k, replace=False))].astype(np.float64)
    nudge = rng.standard_normal(d) * 1e-4
    for _ in range(iterations):
        labels, _ = nearest(x, c, device)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        sums = np.zeros((k, d))
        nz = counts > 0
        sums[nz] = np.add.reduceat(x[order], starts[nz], axis=0, dtype=np.float64)
        for e in np.flatnonzero(~nz):
            big = int(np.argmax(counts))
            sums[e], sums[big] = sums[big] + nudge, sums[big] - nudge
            counts[e] = counts[big] = counts[big] // 2
        norm = np.linalg.norm(sums, axis=1, keepdims=True)
        c = sums / np.where(norm > 0, norm, 1.0)
    return c
