"""``curate search``: nearest neighbours of a text, an image or a row, in an output's FAISS index.

``Searcher(OUT)`` loads ``OUT/index/`` (see curate/index.py) lazily: an index when first searched
(moved to the GPU when FAISS sees one and the index is flat or IVF in RAM; an index whose lists are on
disk is opened read-only with them memory-mapped, curate/index_disk.py), the run's own CLIP model
(``clip_embed``'s model, pretrained, seed from config.resolved.yaml) when a text or an image is
first encoded.  Results are a ``pyarrow.Table``: ``rank``, ``score`` (cosine), then the row's
columns but the image bytes and embeddings, read back from its Parquet file by position (the
index's memory-mapped ``rows.npy`` -- ``ids.parquet`` for an index built before it -- maps each position
to its file and row) -- never by a scan of the output.

``where``: a SQL condition on those columns (DuckDB, no file access); the index is asked for more
neighbours (4x, 16x, ... up to :data:`MAX_CANDIDATES`) until ``k`` rows satisfy it.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.index import file_list, index_dir, meta_path, view_dir
from curate.io.files import InputError
from curate.layout import Layout
from curate.row_reader import BULK_COLUMNS, RowReader

log = logging.getLogger(__name__)

MAX_K = 10_000
MAX_CANDIDATES = 100_000
MAX_TEXT_CHARS = 2_000
MAX_QUERY_IMAGE_BYTES = 20 << 20
MAX_QUERY_IMAGE_PIXELS = 50_000_000
READ_THREADS = 4  # threads reading the hits' row groups (a filtered search's 192 candidates sit in ~170 files)


class LoadedIndex:
    def __init__(self, output: Path, name: str, entry: dict[str, Any]) -> None:
        from curate.dedup.vectors import gpu_available, import_faiss
        from curate.index_disk import open_index
        from curate.search_params import apply_params

        faiss = import_faiss("curate search")
        self.name, self.entry = name, entry
        folder = index_dir(output)
        try:  # an on-disk index: read-only, its lists memory-mapped from the .ivfdata beside it
            self.index = open_index(folder / f"{name}.faiss")
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"search: index {name}: {e}; run `curate index {output}` again") from None
        apply_params(self.index, entry.get("params") or {})
        if gpu_available() and entry.get("kind") in ("flat", "ivfpq") and "Refine" not in entry.get("factory", "") \
                and not entry.get("on_disk"):
            try:
                self.index = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError as e:  # not every index type has a GPU version
                log.info("index %s stays on the CPU (%s)", name, str(e).splitlines()[0])
        self.ids, self.ids_file = RowReader(folder), f"{name}.ids.parquet"
        rows = folder / entry["positions"] if entry.get("positions") else None
        # position -> (file, row): a memory-mapped array (only the pages of the hits are read); indices built
        # before it existed read the row groups of ids.parquet that hold the hits
        self.rows = np.load(rows, mmap_mode="r") if rows is not None and rows.exists() else None
        self.row_files = np.asarray([f["name"] for f in entry.get("files", [])], dtype=object)
        self.lock = threading.Lock()

    def search(self, x: np.ndarray, k: int, widen: int = 1, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k``; an IVF index visits ``widen`` times its tuned number of lists (a filtered search
        asking for many candidates must look beyond the lists that hold the first few), or ``widen`` times
        ``nprobe`` when given."""
        import faiss

        x = np.ascontiguousarray(x, np.float32).reshape(1, -1)
        with self.lock:  # parameters (and GPU resources) are shared
            try:
                ivf = faiss.try_extract_index_ivf(self.index) if widen > 1 or nprobe else None
            except RuntimeError:  # a GPU index
                ivf = None
            old = ivf.nprobe if ivf is not None else 0
            if ivf is not None:
                ivf.nprobe = max(1, min(ivf.nlist, (nprobe or old) * widen))
            try:
                return self.index.search(x, min(k, self.index.ntotal))
            finally:
                if ivf is not None:
                    ivf.nprobe = old

    def positions(self, ids: np.ndarray) -> pa.Table:
        """``file`` and ``row`` of index positions (in the given order) -- and ``uid`` for an index without
        a ``rows.npy`` (built before it), whose ``ids.parquet`` row groups holding them are read."""
        if self.rows is None:
            return self.ids.read(self.ids_file, ids)
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.rows)):
            raise InputError(f"search: index {self.name} and its rows.npy disagree; run `curate index` again")
        rec = self.rows[ids]  # reads the pages that hold them
        return pa.table({"file": pa.array(self.row_files[rec["file"]].tolist(), pa.string()),
                         "row": pa.array(np.asarray(rec["row"], np.int64), pa.int64())})


class Searcher:
    """Searches of one output (thread-safe; the web app keeps one)."""

    def __init__(self, output: str | Path, device: str = "auto") -> None:
        self.layout = Layout(Path(output).expanduser().resolve())
        path = meta_path(self.layout.root)
        if not path.exists():
            raise InputError(f"search: {output} has no index; run `curate index {output}` first")
        self.meta = json.loads(path.read_text())
        self.device = device
        self._indices: dict[str, LoadedIndex] = {}
        self._readers = {v: RowReader(view_dir(self.layout, v)) for v in ("kept", "rejected")}
        self._clip = None
        self._lock = threading.Lock()
        self._local = threading.local()  # one DuckDB connection for conditions per thread (14 ms to open)

    def _condition_connection(self):
        con = getattr(self._local, "con", None)
        if con is None:
            from curate.sql_guard import empty_connect

            con = self._local.con = empty_connect()
        return con

    # -- indices ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.meta.get("indices", {}))

    def index(self, view: str, modality: str) -> LoadedIndex:
        name = f"{view}.{modality}"
        entry = self.meta.get("indices", {}).get(name)
        if entry is None:
            hint = " --text" if modality == "text" else ""
            hint += " --rejected" if view == "rejected" else ""
            raise InputError(f"search: no {name} index; run `curate index {self.layout.root}{hint}`")
        with self._lock:
            if name not in self._indices:
                if file_list(self.layout, view) != entry["files"]:
                    log.warning("index %s is stale: the files of %s changed since it was built (curate index %s)",
                                name, view, self.layout.root)
                self._indices[name] = LoadedIndex(self.layout.root, name, entry)
            return self._indices[name]

    # -- query vectors --------------------------------------------------------------------------
    def _model(self):
        with self._lock:
            if self._clip is None:
                from curate.clip_embedder import ClipEmbedder
                from curate.clip_model import DEFAULT_MODEL, load_clip, resolve_device

                cfg = self.meta.get("clip") or {}
                device = resolve_device(self.device)
                loaded = load_clip(cfg.get("model") or DEFAULT_MODEL, cfg.get("pretrained"), device,
                                   int(cfg.get("seed") or 0))
                self._clip = ClipEmbedder(loaded, device, batch_size=8, decode_threads=1, threads=1)
            return self._clip

    def text_vector(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise InputError("search: empty text")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"search: text longer than {MAX_TEXT_CHARS} characters")
        emb = self._model()
        with self._lock:  # float16, as the stored text embeddings are
            return emb.embed_texts([text])[0].astype(np.float16).astype(np.float32)

    def image_vector(self, data: bytes) -> np.ndarray:
        from curate.io.images import describe_images

        if not data:
            raise InputError("search: empty image")
        if len(data) > MAX_QUERY_IMAGE_BYTES:
            raise InputError(f"search: image larger than {MAX_QUERY_IMAGE_BYTES} bytes")
        _, w, h, reason, detail = describe_images([bytes(data)], MAX_QUERY_IMAGE_PIXELS)[0]
        if reason:
            raise InputError(f"search: {reason}: {detail}")
        emb = self._model()
        with self._lock:
            out = emb.embed([bytes(data)], [""])
        if out.errors[0]:
            raise InputError(f"search: cannot decode the image: {out.errors[0].splitlines()[0][:200]}")
        return out.image[0].astype(np.float32)

    def uid_vector(self, uid: str, modality: str = "image") -> np.ndarray:
        """The stored embedding of a row (kept or rejected), looked up through DuckDB with a bound uid."""
        from curate.query import columns as view_columns
        from curate.sql_guard import readonly_connect

        if not isinstance(uid, str) or not uid or len(uid) > 1000:
            raise InputError("search: bad uid")
        col = S.IMAGE_EMBEDDING if modality == "image" else S.TEXT_EMBEDDING
        con = readonly_connect(self.layout.root)
        try:
            if col not in view_columns(con):
                raise InputError(f"search: the output has no {col}")
            row = con.execute(f'SELECT "{col}" FROM samples WHERE uid = $uid AND "{col}" IS NOT NULL LIMIT 1',
                              {"uid": uid}).fetchone()
        finally:
            con.close()
        if row is None:
            raise InputError(f"search: no row with uid {uid[:80]!r} and an embedding")
        return np.asarray(row[0], np.float32)

    # -- search ---------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int = 10, where: str | None = None, view: str = "kept",
               modality: str = "image", locate: bool = False, nprobe: int | None = None) -> pa.Table:
        """The ``k`` nearest rows of ``view`` to ``vector`` (satisfying ``where``), best first.
        ``locate``: also ``_file`` and ``_row``, where each row is stored (not visible to ``where``).
        ``nprobe``: lists an IVF index visits (default: the value tuned by ``curate index``)."""
        from curate.sql_guard import one_line

        if view not in ("kept", "rejected") or modality not in ("image", "text"):
            raise InputError("search: view is kept or rejected, modality image or text")
        _check_k(k)
        _check_nprobe(nprobe)
        idx = self.index(view, modality)
        v = np.asarray(vector, np.float32).reshape(-1)
        if v.shape[0] != idx.index.d:
            raise InputError(f"search: the query has dimension {v.shape[0]}, the index {idx.index.d}")
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        con = self._condition_connection() if where else None
        if where:
            _check_where(con, where)
        fetch = k if not where else 4 * k
        narrow = where_columns(where) if where else None
        while True:
            scores, ids = idx.search(v, fetch, widen=fetch // k, nprobe=nprobe)
            keep = ids[0] >= 0
            pos, found = idx.positions(ids[0][keep]), scores[0][keep]
            table = self._rows(view, pos, found, narrow)
            if where:
                con.register("candidates", table)
                try:
                    table = con.sql(f"SELECT * FROM candidates WHERE ({where}) ORDER BY rank").to_arrow_table()
                except Exception as e:  # duckdb.Error: the condition is the caller's
                    raise InputError(f"search: where: {one_line(e)}") from None
                finally:
                    con.unregister("candidates")
            exhausted = fetch >= idx.index.ntotal or fetch >= MAX_CANDIDATES
            if table.num_rows >= k or not where or exhausted:
                break
            fetch = min(fetch * 4, MAX_CANDIDATES)
        table = table.slice(0, k)
        if narrow is not None:  # the candidates were read with the condition's columns only: now the k rows whole
            at = pc.subtract(table.column("rank"), 1)
            table = self._rows(view, pos.take(at), found[at.to_numpy()]).set_column(0, "rank", table.column("rank"))
        if locate:  # ``rank`` is still the candidate's place in ``pos`` here
            at = pc.subtract(table.column("rank"), 1)
            table = table.append_column("_file", pos.column("file").take(at)) \
                .append_column("_row", pos.column("row").take(at))
        return table.set_column(0, "rank", pa.array(np.arange(1, table.num_rows + 1), pa.int32()))

    def _rows(self, view: str, pos: pa.Table, scores: np.ndarray, columns: set[str] | None = None) -> pa.Table:
        """rank, score and the rows' columns (BULK_COLUMNS excepted; ``columns``: only those of them named
        there), in the order of ``pos``."""
        reader = self._readers[view]
        files = np.asarray(pos.column("file").to_pylist(), dtype=object)
        rows = pos.column("row").to_numpy()
        order = np.argsort(files, kind="stable")  # the hits grouped by file, one read per file
        names, starts = np.unique(files[order], return_index=True)

        def read(name: str, at: np.ndarray) -> pa.Table:
            if columns is None:
                return reader.read(name, at)
            have = [c for c in reader.columns(name) if c not in BULK_COLUMNS and c.lower() in columns]
            return reader.read(name, at, have or [S.UID])

        jobs = list(zip(names, np.split(order, starts[1:])))
        if len(jobs) >= 8:  # row groups of many files: decoded on threads (pyarrow lets go of the GIL)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(READ_THREADS, len(jobs))) as pool:
                parts = list(pool.map(lambda job: read(job[0], rows[job[1]]), jobs))
        else:
            parts = [read(name, rows[sel]) for name, sel in jobs]
        empty = pa.table({S.UID: pa.array([], pa.string())})
        base = pa.concat_tables(parts, promote_options="permissive") if parts else empty
        base = base.take(pa.array(np.argsort(order), pa.int64())) if len(order) else base
        head = pa.table({"rank": pa.array(np.arange(1, len(files) + 1), pa.int32()),
                         "score": pa.array(scores.astype(np.float32), pa.float32())})
        for name in base.column_names:
            head = head.append_column(name, base.column(name))
        return head


def where_columns(where: str) -> set[str] | None:
    """The (lower-cased) names a SQL condition may refer to -- every identifier outside string literals, quoted
    or not -- or None when it may refer to all columns (``*``, ``COLUMNS(...)``).  A filtered search reads
    only these columns of its candidates (a word that is not a column costs nothing), then the rows it keeps
    whole: with 192 candidates in as many row groups, decoding every column of each was most of a search."""
    import re

    text = re.sub(r"'(?:[^']|'')*'", " ", where)  # string literals are not names
    if "*" in text or re.search(r"\bcolumns\s*\(", text, re.IGNORECASE):
        return None
    quoted = [q.replace('""', '"') for q in re.findall(r'"((?:[^"]|"")*)"', text)]
    bare = re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", re.sub(r'"(?:[^"]|"")*"', " ", text))
    return {n.lower() for n in quoted + bare}


def _check_k(k: int) -> None:
    if not 1 <= int(k) <= MAX_K:
        raise InputError(f"search: k must be between 1 and {MAX_K}")


def _check_nprobe(nprobe: int | None) -> None:
    if nprobe is not None and not 1 <= int(nprobe) <= 1 << 20:
        raise InputError("search: nprobe must be between 1 and 1048576")


def _check_where(con, where: str) -> None:
    from curate.sql_guard import check_condition

    try:
        check_condition(con, where)
    except InputError as e:
        raise InputError(f"search: where: {e}") from None


def search(output: str | Path, text: str | None = None, image: bytes | str | Path | None = None,
           uid: str | None = None, k: int = 10, where: str | None = None, view: str = "kept",
           modality: str = "image", searcher: Searcher | None = None, locate: bool = False,
           nprobe: int | None = None) -> pa.Table:
    """One search (exactly one of ``text``, ``image`` -- bytes or a path --, ``uid``); a ``pyarrow.Table``
    (``locate``, ``nprobe``: see :meth:`Searcher.search`)."""
    from curate.sql_guard import empty_connect

    s = searcher or Searcher(output)
    given = [x is not None for x in (text, image, uid)]
    if sum(given) != 1:
        raise InputError("search: give exactly one of text, image, uid")
    _check_k(k)
    _check_nprobe(nprobe)
    if where:  # before any model is loaded
        con = empty_connect()
        try:
            _check_where(con, where)
        finally:
            con.close()
    if text is not None:
        vec = s.text_vector(text)
    elif image is not None:
        if not isinstance(image, (bytes, bytearray)):
            p = Path(image)
            if not p.is_file():
                raise InputError(f"search: no image file {image}")
            if p.stat().st_size > MAX_QUERY_IMAGE_BYTES:
                raise InputError(f"search: image larger than {MAX_QUERY_IMAGE_BYTES} bytes")
            image = p.read_bytes()
        vec = s.image_vector(bytes(image))
    else:
        vec = s.uid_vector(uid, modality)
    return s.search(vec, k, where, view, modality, locate, nprobe)
