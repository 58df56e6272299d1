"""Which FAISS index ``curate index`` builds, from the corpus size and a memory budget.

The rules follow autofaiss's (criteo/autofaiss), written out so they are documented and
reproducible (docs/CONTRACT.md, "curate index"); every vector is L2-normalised and searched by inner
product (= cosine):

* **Flat** (exact search) below :data:`FLAT_MAX_ROWS` rows when ``rows * d * 4`` bytes fit the budget.
* otherwise **IVF-PQ**: ``IVF{nlist},PQ{m}x4fsr`` (4-bit fast-scan PQ of the residuals: ``m / 2`` bytes a
  vector; trains in seconds where 8-bit PQ took minutes on 2 cores, and scans lists with SIMD) with
  ``nlist`` the power of two nearest ``4 * sqrt(rows)``
  (between 64 and 2^18, at least 39 training rows per list) and an HNSW32 coarse quantizer from
  2^14 lists on (``IVF{nlist}_HNSW32``: the centroid search stays sub-linear); ``m`` (sub-quantizers)
  is the largest of 128, 96, 64, 48, 32, 16, 8 dividing ``d`` (at most ``d / 2``) whose codes fit the budget;
  when float16 copies of the vectors fit as well, ``,Refine(SQfp16)`` re-ranks ``k_factor * k``
  PQ candidates with them (recall close to the IVF probing's own).
* ``kind="hnsw"``: ``HNSW32`` (float vectors + graph: fast and accurate, slow to build);
  ``factory="..."``: any ``faiss.index_factory`` string, as given.
* **on disk** from ``on_disk_from`` rows (``curate index --on-disk-from``, default :data:`ON_DISK_FROM`;
  None: never) or from ``on_disk_bytes`` bytes of float32 vectors (``--on-disk-bytes``, default
  :data:`ON_DISK_BYTES`, 512 MiB; None: never): ``IVF{nlist},SQ8`` (same ``nlist`` and quantizer rule) whose inverted lists live in a
  memory-mapped ``.ivfdata`` file (curate/index_disk.py) -- only the coarse quantizer must fit the
  budget.  SQ8 (one byte a dimension) keeps distances within about 1% of exact, so recall is the IVF
  probing's own and ``nprobe`` alone trades it for speed; ``kind="ivfpq"`` on disk gives 8-bit
  ``PQ{m}`` codes instead (``m`` the largest divisor of ``d`` in the list above, at most ``d / 4``:
  4x smaller, lower recall).  ``kind="ivfsq8"`` asks for ``IVF{nlist},SQ8`` below the threshold too
  (in RAM).  A ``factory`` string goes on disk above the threshold when it is an IVF index with
  ordinary lists (no fast-scan, no Refine); otherwise it stays in RAM.

Search-time parameters (``nprobe``, ``efSearch``) are tuned after the build on a sample of the
corpus, autofaiss-style: the smallest value reaching the target recall@10 against exact search.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

FLAT_MAX_ROWS = 1_000_000
ON_DISK_FROM = 1_000_000  # rows from which `curate index` keeps IVF lists on disk (its --on-disk-from default)
#: and from this many bytes of float32 vectors (rows x d x 4; its --on-disk-bytes default): 820,000 kept rows of
#: 256-d embeddings are below 1M rows, but a flat index of them held 840 MB of a `curate serve`'s 2.0 GB
ON_DISK_BYTES = 512 * 1024 ** 2
DEFAULT_MEMORY = 4 * 1024 ** 3
PQ_SUBQUANTIZERS = (128, 96, 64, 48, 32, 16, 8)
HNSW_QUANTIZER_FROM = 2 ** 14
ID_BYTES = 8  # FAISS stores an int64 id per vector in inverted lists
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


@dataclass
class IndexPlan:
    factory: str
    kind: str  # flat | ivfpq | ivfsq8 | hnsw | custom
    nlist: int = 0
    pq_bytes: int = 0
    refine: bool = False
    estimated_bytes: int = 0  # resident: the whole index in RAM, or the quantizer of an on-disk one
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    on_disk: bool = False  # inverted lists in a memory-mapped .ivfdata file (IVF indices only)
    disk_bytes: int = 0  # the .ivfdata's size (codes + 8-byte ids), when on disk

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_bytes(value: str | int | float) -> int:
    """``4GB``, ``512MiB``, ``1e9`` or a number of bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (e.g. 4GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def ivf_lists(rows: int) -> int:
    """Power of two nearest 4 sqrt(rows), in [64, 2^18], with >= 39 training rows per list."""
    target = 4 * math.sqrt(max(rows, 1))
    nlist = 2 ** int(round(math.log2(max(target, 1))))
    nlist = max(64, min(nlist, 2 ** 18))
    while nlist > 1 and nlist * 39 > rows:
        nlist //= 2
    return max(1, nlist)


def plan_index(rows: int, dim: int, memory: int = DEFAULT_MEMORY, kind: str = "auto",
               factory: str | None = None, on_disk_from: int | None = None,
               on_disk_bytes: int | None = None) -> IndexPlan:
    """The index for ``rows`` vectors of dimension ``dim`` within ``memory`` bytes (see the module doc);
    ``on_disk_from``: rows, ``on_disk_bytes``: bytes of float32 vectors, from which IVF lists are kept on disk
    (None: never)."""
    flat_bytes = rows * dim * 4
    disk_cause = None  # which threshold sends the lists to disk, for the reason printed and stored
    if on_disk_from is not None and rows >= on_disk_from:
        disk_cause = f"{rows} rows >= {on_disk_from}"
    elif on_disk_bytes is not None and flat_bytes >= on_disk_bytes:
        disk_cause = f"{human_bytes(flat_bytes)} of vectors >= the on-disk threshold"
    on_disk = disk_cause is not None
    if factory:
        why = "factory string given" + (f"; {disk_cause}: lists on disk if it is an IVF index" if on_disk else "")
        return IndexPlan(factory, "custom", reason=why, on_disk=on_disk)
    if kind == "flat" or (kind == "auto" and not on_disk and rows < FLAT_MAX_ROWS and flat_bytes <= memory):
        why = "asked" if kind == "flat" else \
            f"{rows} rows < {FLAT_MAX_ROWS} and {human_bytes(flat_bytes)} fit the budget"
        return IndexPlan("Flat", "flat", estimated_bytes=flat_bytes, reason=why)
    if kind == "hnsw":
        return IndexPlan("HNSW32", "hnsw", estimated_bytes=flat_bytes + rows * 32 * 2 * 4, reason="asked")
    if kind not in ("auto", "ivfpq", "ivfsq8"):
        raise ValueError(f"unknown index kind {kind!r} (auto, flat, ivfpq, ivfsq8, hnsw)")
    nlist = ivf_lists(rows)
    coarse = nlist * dim * 4 * (2 if nlist >= HNSW_QUANTIZER_FROM else 1)
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    if on_disk or kind == "ivfsq8":
        return _plan_plain_ivf(rows, dim, memory, kind, nlist, coarse, quantizer, disk_cause)
    for m in (m for m in PQ_SUBQUANTIZERS if dim % m == 0 and 2 * m <= dim):
        codes = rows * (m // 2 + ID_BYTES) + coarse
        if codes <= memory:
            break
    else:
        raise ValueError(f"{rows} vectors of dimension {dim} do not fit a memory budget of {human_bytes(memory)} as "
                         f"PQ codes (or {dim} has no divisor among {PQ_SUBQUANTIZERS}): raise --memory or give "
                         "--factory")
    refine = codes + rows * dim * 2 <= memory
    fac = f"{quantizer},PQ{m}x4fsr" + (",Refine(SQfp16)" if refine else "")
    why = (f"{rows} rows{' >= ' + str(FLAT_MAX_ROWS) if rows >= FLAT_MAX_ROWS else ''}; flat would need "
           f"{human_bytes(flat_bytes)} of a {human_bytes(memory)} budget; PQ{m} codes"
           f"{' + float16 re-ranking copies' if refine else ''}")
    return IndexPlan(fac, "ivfpq", nlist, m, refine, codes + (rows * dim * 2 if refine else 0), why)


def _plan_plain_ivf(rows: int, dim: int, memory: int, kind: str, nlist: int, coarse: int, quantizer: str,
                    disk_cause: str | None) -> IndexPlan:
    """IVF with ordinary inverted lists: SQ8 codes (``kind`` auto / ivfsq8) or 8-bit PQ (ivfpq), on disk (why:
    ``disk_cause``) or not (None)."""
    on_disk = disk_cause is not None
    if kind == "ivfpq":
        ms = [m for m in PQ_SUBQUANTIZERS if dim % m == 0 and 4 * m <= dim]
        if not ms:
            raise ValueError(f"dimension {dim} has no divisor among {PQ_SUBQUANTIZERS} of at most {dim} / 4: "
                             "give --factory")
        m, code, codec = ms[0], ms[0], f"PQ{ms[0]}"
    else:
        m, code, codec = 0, dim, "SQ8"
    lists = rows * (code + ID_BYTES)
    resident = coarse if on_disk else coarse + lists
    if resident > memory:
        what = "its coarse quantizer" if on_disk else "its codes"
        raise ValueError(f"{rows} vectors of dimension {dim} as {quantizer},{codec}: {what} "
                         f"({human_bytes(resident)}) do not fit a memory budget of {human_bytes(memory)}: raise "
                         "--memory or give --factory")
    if on_disk:
        why = (f"{disk_cause}: inverted lists on disk ({human_bytes(lists)} of {codec} codes, "
               f"memory-mapped), {human_bytes(coarse)} quantizer in RAM")
    else:
        why = "asked"
    return IndexPlan(f"{quantizer},{codec}", "ivfpq" if kind == "ivfpq" else "ivfsq8", nlist, m, False, resident,
                     why, on_disk=on_disk, disk_bytes=lists if on_disk else 0)
