"""Vector pieces of semantic dedup: nearest centroids, similar pairs, spherical k-means.

What is exact: every decision is taken in float64 on the CPU -- a cosine ``> threshold`` between
rows L2-normalised in float64 (:func:`normalise`), a nearest centroid by float64 inner products.
Fast searches only propose candidates, with a margin above their worst-case rounding error:

* nearest centroids (:func:`nearest`): a float32 product (torch on the CPU, FAISS on a GPU)
  proposes each row's best two centroids; where their scores are closer than ``MARGIN * |x|``
  (float32's error is below ``d * 2^-24 * |x|``, i.e. 3e-5 |x| for d = 512) both are scored in
  float64 (ties: the smaller centroid id);
* similar pairs (:func:`similar_pairs`): fixed-size blocks of rows (normalised in float32)
  multiplied with torch -- in bfloat16 on CPUs with AMX bf16 matrix units (oneDNN, products
  accumulated in float32), in float32 otherwise -- over the upper triangle of block pairs;
  every pair whose approximate cosine exceeds ``threshold - margin`` is re-checked in float64.
  :data:`BF16_MARGIN` (2^-6) exceeds the bf16 path's worst case for unit rows of dimension up
  to :data:`BF16_MAX_DIM` (inputs rounded to 8 bits: 2 * 2^-8, fp32 accumulation: d * 2^-24,
  a bf16 result: 2^-8; 0.0122 at d = 4096), :data:`MARGIN` (1e-3) the float32 path's;
  ``tests/test_dedup_scale.py`` checks the bound on the hardware and that both paths give the
  float64 pairs.  So the pairs -- hence the decisions -- do not depend on the device, the
  precision used or the thread count; only the number of candidates re-checked does.

k-means (:func:`spherical_kmeans`) is FAISS's ``faiss.Kmeans(spherical=True)`` -- the call the
SemDeDup reference makes -- on the CPU, or with ``device="cuda"`` on one GPU (what ``gpu=True``
does, on the process's first GPU: the assignment searches run on a GPU flat index; sampling, initialisation and centroid updates stay
FAISS's CPU code, from the same seed).  FAISS's CPU k-means gives the same centroids for any
thread count (checked in the tests); the GPU's float32 products round differently from the CPU
BLAS, so a row whose two best centroids are within rounding of each other may be assigned
differently during training -- on data without such near-ties the centroids are the CPU ones.
Another FAISS or BLAS build may likewise move a few rows between clusters.

GPU switch: every function taking ``device`` runs its ``"cuda"`` branch -- FAISS k-NN searches
(:func:`knn_search`) instead of the torch products, growing-k pair search -- with CPU FAISS indexes
when FAISS sees no GPU (one warning per process and function), so that branch is tested on CPUs and
gives the same results as the CPU branch (same candidates after the float64 re-check).  (Before, curate ran
its own float64 Lloyd loop: slower, device-independent, but unable to reproduce SemDeDup's
clustering.)  Assignments to the centroids are exact as above.

Without FAISS (a machine where it cannot be installed, e.g. a GPU box with only torch): the searches
(:func:`knn_search`, :func:`similar_pairs`) run as torch products on the GPU when torch sees one, else
on the CPU -- the same candidates, re-checked in float64, so the same pairs and nearest centroids --
and k-means is :func:`torch_spherical_kmeans` when asked for (``backend="torch"``; its centroids are
not FAISS's: its own sample and initial centroids).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")

#: float32 candidate margin: float32 dot products of unit rows err by < 1e-4 for d <= 4096
MARGIN = 1e-3
#: bf16 candidate margin: inputs rounded to bf16 (2 * 2^-8), fp32 accumulation (d * 2^-24)
#: and a bf16 result (2^-8) err by < 0.0123 for unit rows of d <= BF16_MAX_DIM
BF16_MARGIN = 2.0 ** -6
BF16_MAX_DIM = 4096
_CHUNK = 8192
_GPU_MAX_K = 2048
#: rows per block of the blocked pairwise product: 512 x 512 products stay in a core's L2 cache
#: (measured ~800 GFLOPS on one AMX core in bf16, ~350 for 1024 x 1024)
_BLOCK = 512
#: on the GPU, clusters up to this size are searched by the CPU block product
_DENSE_MAX = 2048
#: rows per block of the torch pair search on a GPU without FAISS
_GPU_BLOCK = 4096
#: set CURATE_DEDUP_BF16=0 to force float32 products
USE_BF16 = os.environ.get("CURATE_DEDUP_BF16", "1") != "0"


def import_faiss(who: str = "semantic dedup"):
    """The ``faiss`` module, or an error naming the install line (it comes from an extra)."""
    try:
        import faiss
    except ImportError:
        from curate.config import ConfigError

        raise ConfigError(f"{who}: FAISS is not installed; pip install 'curate[cpu]' (or 'curate[gpu]' on a "
                          "CUDA 12 machine: it replaces the CPU build)") from None
    return faiss


@lru_cache(maxsize=1)
def faiss_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


@lru_cache(maxsize=1)
def torch_cuda() -> bool:
    """Whether torch sees a CUDA device (the FAISS-less GPU path)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_warned: set[str] = set()


def faiss_gpu(device: str, what: str) -> bool:
    """Whether ``device`` asks for a GPU and FAISS has one; when it asks and FAISS has none, the GPU code
    path runs on CPU FAISS indexes and a warning (once per process and ``what``) says so."""
    if device != "cuda":
        return False
    if gpu_available():
        return True
    if what not in _warned:
        _warned.add(what)
        log.warning("%s: device cuda but FAISS sees no GPU: running the GPU code path on the CPU", what)
    return False


def resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if not faiss_installed():  # no FAISS at all: the searches run as torch products, on the GPU if torch has one
        if torch_cuda():
            return "cuda"
        if device == "cuda":
            log.warning("device: cuda asked but no GPU is visible (FAISS is not installed; torch sees none); using CPU")
        return "cpu"
    if device == "cuda":
        log.warning("device: cuda asked but this FAISS build sees no GPU (pip install 'curate[gpu]'); using CPU")
    return "cpu"


def _threads() -> int:
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """torch ops with one intra-op thread (restored after).  On small matrices torch's thread
    pool costs more than it gains (measured: 100 products of 2000 x 512 in bf16 take the same
    time on one thread as on two, and the elementwise steps take 3-8x longer on two); the dedup
    tasks get their parallelism from :func:`parallel_map` and from Ray instead."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def parallel_map(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(x) for x in items]`` on ``_threads()`` Python threads (torch and numpy release the GIL)."""
    workers = min(_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


_gpu_local = threading.local()


def _setup(device: str):
    """(faiss, GPU resources or None); one ``StandardGpuResources`` per thread, kept (creating one per
    search would allocate its scratch memory and cuBLAS handle again every time)."""
    faiss = import_faiss()

    faiss.omp_set_num_threads(_threads())
    if device != "cuda":
        return faiss, None
    res = getattr(_gpu_local, "res", None)
    if res is None:
        res = _gpu_local.res = faiss.StandardGpuResources()
    return faiss, res


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AMX tiles), accumulating in fp32."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # pragma: no cover - older torch
        return False


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
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(x), [None, pa.py_buffer(x.view(np.uint8))])


def unpack(arr: pa.Array | pa.ChunkedArray, dtype: str) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), dtype)
    width = arr.type.byte_width
    raw = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * width:(arr.offset + len(arr)) * width]
    return raw.view(dtype).reshape(len(arr), -1)


def _tensor(a: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """A torch view of a numpy array -- often a read-only view of an Arrow buffer, which torch
    warns about; it is only ever read here."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def knn_search(x32: np.ndarray, base32: np.ndarray, k: int, device: str):
    """FAISS exact inner-product k-NN: (scores, ids); a GPU flat search when ``device="cuda"`` and FAISS
    has a GPU, else a CPU ``IndexFlatIP`` (see :func:`faiss_gpu`).  Without FAISS: torch products and
    top-k, on the GPU when ``device="cuda"`` and torch sees one."""
    if not faiss_installed():
        return _torch_knn(x32, base32, k, "cuda" if device == "cuda" and torch_cuda() else "cpu")
    faiss, res = _setup("cuda" if faiss_gpu(device, "FAISS k-NN search") else "cpu")
    if res is not None:
        return faiss.knn_gpu(res, x32, base32, k, metric=faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexFlatIP(base32.shape[1])
    index.add(base32)
    return index.search(x32, k)


def _torch_knn(x32: np.ndarray, base32: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    base = torch.from_numpy(np.ascontiguousarray(base32, np.float32)).to(device)
    scores, ids = np.empty((len(x32), k), np.float32), np.empty((len(x32), k), np.int64)
    for lo in range(0, len(x32), _CHUNK):
        q = torch.from_numpy(np.ascontiguousarray(x32[lo:lo + _CHUNK], np.float32)).to(device)
        top = torch.topk(q @ base.T, k, dim=1)
        scores[lo:lo + len(q)], ids[lo:lo + len(q)] = top.values.cpu().numpy(), top.indices.cpu().numpy()
    return scores, ids


def _top_centroids(raw: np.ndarray, c32: np.ndarray, k: int,
                   device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 inner products, ids) of the ``k`` best centroids of every raw row, best first, and
    the rows' float32 norms (FAISS on the GPU, torch matmul + top-k on the CPU)."""
    if device == "cuda":
        x32 = np.ascontiguousarray(raw, np.float32)
        return (*knn_search(x32, c32, k, device), np.linalg.norm(x32, axis=1))
    import torch

    x32 = _tensor(raw).float()
    top = torch.topk(torch.mm(x32, torch.from_numpy(c32).T), k, dim=1)
    return top.values.numpy(), top.indices.numpy(), torch.linalg.vector_norm(x32, dim=1).numpy()


def nearest(x: np.ndarray, c64: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Nearest centroid (max cosine) of every row of ``x``, decided in float64.

    ``x`` may be raw (any float type, any norm); ``c64`` are unit rows; the ranking of centroids
    does not depend on a row's norm.  On CPUs with AMX, a bf16 product settles every row whose
    best score leads the second by more than ``2 * BF16_MARGIN * |x|`` (each bf16 score is within
    ``BF16_MARGIN * |x|`` of the exact one, so no other centroid can win).  The other rows go
    through a float32 search for their best two centroids: where those differ by more than
    ``MARGIN * |x|`` (float32's error is below ``d * 2^-24 * |x|``) the float32 order is the exact
    order; otherwise both are scored in float64 and the larger wins (ties: the smaller centroid
    id).  ``_CHUNK`` rows at a time.
    """
    n, k = len(x), len(c64)
    labels = np.zeros(n, np.int64)
    if n == 0:
        return labels
    c32 = np.ascontiguousarray(c64, np.float32)
    kk = min(2, k)
    bf16 = device != "cuda" and kk == 2 and USE_BF16 and native_bf16() and x.shape[1] <= BF16_MAX_DIM
    for lo in range(0, n, _CHUNK):
        raw = x[lo:lo + _CHUNK]
        rows = np.arange(len(raw))
        if bf16:
            best, open_ = _settle_bf16(raw, c32)
            labels[lo:lo + _CHUNK] = best
            rows = np.flatnonzero(open_)
            if len(rows) == 0:
                continue
        s32, idx, norm32 = _top_centroids(raw[rows], c32, kk, device)
        labels[lo + rows] = idx[:, 0]
        if kk < 2:
            continue
        close = np.flatnonzero(s32[:, 0] - s32[:, 1] <= MARGIN * norm32)
        if len(close):
            pair = np.sort(idx[close], axis=1)
            s64 = np.einsum("nd,nkd->nk", raw[rows[close]].astype(np.float64), c64[pair])
            labels[lo + rows[close]] = pair[np.arange(len(close)), np.argmax(s64, axis=1)]
    return labels


def _settle_bf16(raw: np.ndarray, c32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 best centroid of every raw row, and which rows it does not settle (see :func:`nearest`)."""
    import torch

    x = _tensor(raw).float()
    norm = torch.linalg.vector_norm(x, dim=1)
    s = torch.mm(x.to(torch.bfloat16), torch.from_numpy(c32).to(torch.bfloat16).T).float()
    top = torch.topk(s, 2, dim=1)
    gap = top.values[:, 0] - top.values[:, 1]
    return top.indices[:, 0].numpy(), (gap <= 2 * BF16_MARGIN * norm).numpy()


def inner(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float64 inner product of every raw row of ``x`` (as stored, not re-normalised) with ``c``.

    (``einsum``, not ``@``: a BLAS call from many small tasks makes BLAS's thread pool spin.)"""
    return np.einsum("nd,d->n", x.astype(np.float64), c)


def _verify(x: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float):
    """float64 cosine of the candidate pairs, rows normalised by :func:`normalise`; keeps those > threshold."""
    rows = np.unique(np.concatenate([i, j]))
    unit = normalise(x[rows])
    a, b = np.searchsorted(rows, i), np.searchsorted(rows, j)
    sims = np.zeros(len(i))
    for lo in range(0, len(i), _CHUNK):
        sims[lo:lo + _CHUNK] = np.einsum("nd,nd->n", unit[a[lo:lo + _CHUNK]], unit[b[lo:lo + _CHUNK]])
    ok = sims > threshold
    return i[ok], j[ok], sims[ok]


def _unit_rows(x: np.ndarray, dtype) -> "torch.Tensor":  # noqa: F821
    """Rows normalised in float32 (zero rows stay zero), then rounded to the torch ``dtype``.

    Only candidates come from these rows, so float32 normalisation (relative error ~1e-7 per
    element) is covered by the margins; decisions use :func:`normalise` (float64).
    """
    import torch

    out = torch.empty((len(x), x.shape[1]), dtype=dtype)
    for lo in range(0, len(x), _CHUNK):
        xs = _tensor(x[lo:lo + _CHUNK]).float()
        norm = torch.linalg.vector_norm(xs, dim=1, keepdim=True)
        out[lo:lo + _CHUNK] = (xs / torch.where(norm > 0, norm, torch.ones_like(norm))).to(dtype)
    return out


def _torch():
    import torch

    return torch


def _floor(v: float, dtype) -> float:
    """The largest value of torch ``dtype`` that is <= v (comparisons cast a Python float to the
    tensor's dtype, rounding to nearest, which could lift a bf16 cut-off by up to 2^-9)."""
    import torch

    t = torch.tensor([v], dtype=torch.float64).to(dtype)
    if t.double().item() > v:
        t = torch.nextafter(t, torch.tensor([float("-inf")], dtype=dtype))
    return float(t.double().item())


def block_candidates(u: "torch.Tensor", low: float, block: int,  # noqa: F821
                     parallel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j with ``u[i] . u[j] > low`` in ``u``'s precision, over the upper triangle of blocks.

    Rows are zero-padded to a multiple of ``block`` so every product has the same shape (oneDNN
    compiles a kernel per new shape: ~30 ms, more than the product itself); self-similarities of
    diagonal blocks are masked and only rows whose maximum exceeds ``low`` are scanned.  With
    ``parallel`` the block rows run on :func:`parallel_map` threads.
    """
    import torch

    n = len(u)
    nb = -(-n // block)
    if nb * block > n:
        u = torch.cat([u, u.new_zeros((nb * block - n, u.shape[1]))])
    low = _floor(low, u.dtype)

    def stripe(bi: int) -> tuple[np.ndarray, np.ndarray]:
        lo = bi * block
        a = u[lo:lo + block]
        out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for lo2 in range(lo, nb * block, block):
            s = torch.mm(a, u[lo2:lo2 + block].T)
            if lo2 == lo:
                s.fill_diagonal_(float("-inf"))
            rows = torch.nonzero(s.amax(dim=1) > low).flatten()
            if len(rows) == 0:
                continue
            r, c = torch.nonzero(s[rows] > low, as_tuple=True)
            gi = lo + rows[r].cpu().numpy().astype(np.int64)
            gj = lo2 + c.cpu().numpy().astype(np.int64)
            keep = (gi < gj) & (gj < n)  # upper triangle, no padding rows
            out_i.append(gi[keep])
            out_j.append(gj[keep])
        return np.concatenate(out_i), np.concatenate(out_j)

    parts = (parallel_map if parallel else lambda f, xs: [f(x) for x in xs])(stripe, list(range(nb)))
    return np.concatenate([i for i, _ in parts]), np.concatenate([j for _, j in parts])


def _cpu_candidates(x: np.ndarray, threshold: float, parallel: bool) -> tuple[np.ndarray, np.ndarray]:
    import torch

    bf16 = USE_BF16 and native_bf16() and x.shape[1] <= BF16_MAX_DIM
    u = _unit_rows(x, torch.bfloat16 if bf16 else torch.float32)
    return block_candidates(u, threshold - (BF16_MARGIN if bf16 else MARGIN), _BLOCK, parallel)


def similar_pairs(x: np.ndarray, threshold: float, device: str = "cpu", parallel: bool = True):
    """All pairs i < j whose float64 cosine is > threshold, among the rows of ``x``.

    ``x`` may be raw (float16/32/64, any norm): candidate rows are normalised in float64 as by
    :func:`normalise` (no float64 copy of all rows is made).  Returns ``(i, j, cosine)``.
    """
    n = len(x)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if n < 2:
        return empty
    if device == "cuda" and n > _DENSE_MAX and not faiss_installed():  # torch block products on the GPU
        u = _unit_rows(x, _torch().float32).to("cuda" if torch_cuda() else "cpu")
        i, j = block_candidates(u, threshold - MARGIN, _GPU_BLOCK, parallel=False)
    elif device == "cuda" and n > _DENSE_MAX:
        i, j = knn_pairs(_unit_rows(x, _torch().float32).numpy(), threshold - MARGIN)
    else:
        i, j = _cpu_candidates(x, threshold, parallel)
    return _verify(x, i.astype(np.int64), j.astype(np.int64), threshold)


def knn_pairs(x32: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray]:
    """GPU FAISS has no range search on flat indexes: k-NN with k grown until it covers every
    neighbour above ``low``; rows needing more than the GPU's k limit use the CPU range search."""
    n = len(x32)
    out_i, out_j = [], []
    rows = np.arange(n)
    k = min(n, 64)
    while len(rows):
        sims, nbr = knn_search(x32[rows], x32, k, "cuda")
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


#: FAISS's default ``max_points_per_centroid``: it trains on at most this many rows per centroid
FAISS_MAX_POINTS = 256


def faiss_training_rows(n: int, k: int, seed: int, backend: str = "faiss") -> np.ndarray | None:
    """The rows (positions in the training order) ``faiss.Kmeans(seed=seed)`` trains on when given
    ``n`` rows for ``k`` centroids, or None when it takes them all: beyond ``FAISS_MAX_POINTS``
    per centroid it takes the first ``k * FAISS_MAX_POINTS`` of ``faiss.rand_perm(n, seed)``, in
    that order.  Handing FAISS exactly those rows gives the same centroids (checked in the tests)
    without holding every row in float32.  ``backend="torch"``: :func:`torch_spherical_kmeans`'s own
    subset, the first ``k * FAISS_MAX_POINTS`` of a numpy permutation with ``seed``."""
    if n <= k * FAISS_MAX_POINTS:
        return None
    if backend == "torch":
        return np.random.default_rng(seed).permutation(n)[:k * FAISS_MAX_POINTS].astype(np.int64)
    faiss = import_faiss()

    perm = np.empty(n, np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm[:k * FAISS_MAX_POINTS].astype(np.int64)


def spherical_kmeans(x: np.ndarray, k: int, iterations: int, seed: int, device: str = "cpu",
                     backend: str = "faiss") -> np.ndarray:
    """``faiss.Kmeans(d, k, niter=iterations, seed=seed, spherical=True)`` trained on the rows of
    ``x`` as given (float32, in the given order; ``device="cuda"``: assignment searches on one GPU when
    FAISS has one, see :func:`faiss_gpu`); returns (k, d) float64 unit centroids.

    This is the SemDeDup reference's clustering call: FAISS draws its initial centroids with
    ``seed`` and, beyond 256 rows per centroid, trains on a random subset of that size (its
    default ``max_points_per_centroid``).  Empty clusters are split by FAISS.
    ``backend="torch"``: :func:`torch_spherical_kmeans` instead (no FAISS needed).
    """
    if backend == "torch":
        return torch_spherical_kmeans(x, k, iterations, seed, device)
    faiss = import_faiss()

    x32 = np.ascontiguousarray(x, np.float32)
    n, d = x32.shape
    k = max(1, min(k, n))
    faiss.omp_set_num_threads(_threads())
    km = faiss.Kmeans(d, k, niter=iterations, seed=seed, spherical=True, verbose=False, gpu=False,
                      min_points_per_centroid=1, max_points_per_centroid=FAISS_MAX_POINTS)
    if faiss_gpu(device, "FAISS k-means"):  # what gpu=True does, on this process's first GPU only
        _, res = _setup("cuda")
        km.index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(d))
    km.train(x32)
    return normalise(km.centroids.astype(np.float64))


def torch_spherical_kmeans(x: np.ndarray, k: int, iterations: int, seed: int, device: str = "cpu") -> np.ndarray:
    """Lloyd's spherical k-means in torch, for machines without FAISS: float32 products on the GPU when
    ``device="cuda"`` and torch sees one.  Initial centroids: k-means++ seeding with ``seed``; each
    iteration assigns every row to its best centroid (max inner product of unit rows) and moves each
    centroid to the normalised sum of its rows; an empty cluster takes the row farthest from its own
    centroid (as FAISS splits them, by another rule).  Rows beyond ``k * FAISS_MAX_POINTS`` are subsampled
    by the caller (:func:`faiss_training_rows` with ``backend="torch"``).  Returns (k, d) float64 unit
    centroids; not FAISS's centroids."""
    import torch

    dev = "cuda" if device == "cuda" and torch_cuda() else "cpu"
    u = _unit_rows(np.ascontiguousarray(x), torch.float32).to(dev)
    n = len(u)
    k = max(1, min(k, n))
    gen = torch.Generator(device=dev).manual_seed(seed)
    # k-means++ seeding: each next centroid drawn with probability ~ its squared distance 2 - 2 cos to the
    # nearest centroid so far (one pass over the rows per centroid: the cost of one Lloyd iteration in all),
    # drawn on the device by inverse CDF (no copy of the weights to the host per centroid)
    picks = torch.empty(k, dtype=torch.int64, device=dev)
    picks[0] = torch.randint(n, (1,), generator=gen, device=dev)[0]
    closest = u @ u[picks[0]]
    for i in range(1, k):
        cdf = torch.cumsum((2.0 - 2.0 * closest).clamp_min(0).double(), 0)
        r = torch.rand(1, generator=gen, device=dev, dtype=torch.float64) * cdf[-1]
        picks[i] = torch.searchsorted(cdf, r).clamp_max(n - 1)[0]
        closest = torch.maximum(closest, u @ u[picks[i]])
    c = u[picks].clone()
    for _ in range(iterations):
        best = torch.empty(n, dtype=torch.float32, device=dev)
        label = torch.empty(n, dtype=torch.int64, device=dev)
        for lo in range(0, n, _CHUNK):
            top = (u[lo:lo + _CHUNK] @ c.T).max(dim=1)
            best[lo:lo + _CHUNK], label[lo:lo + _CHUNK] = top.values, top.indices
        sums = torch.zeros_like(c).index_add_(0, label, u)
        counts = torch.bincount(label, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # the rows worst served by their centroid seed the empty clusters
            far = torch.topk(-best, len(empty)).indices
            sums[empty] = u[far]
        c = sums / torch.linalg.vector_norm(sums, dim=1, keepdim=True).clamp_min(1e-12)
    return normalise(c.double().cpu().numpy())
