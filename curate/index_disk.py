"""IVF indices served from disk: inverted lists in a memory-mapped ``.ivfdata`` file (FAISS ``OnDiskInvertedLists``).

This is how autofaiss and clip-retrieval serve LAION's billions of rows from a few GB of RAM; the
steps are FAISS's own (``faiss.contrib.ondisk``), written here so the build streams and the files
stay where curate puts them:

* **build** (:class:`OnDiskBuilder`): the trained, empty IVF index is cloned per *shard*; each
  shard takes the next vectors (ids: their global positions) until its codes reach
  :data:`SHARD_BYTES`, and is written to a temporary file.  The shards' inverted lists, opened
  memory-mapped, are then merged list by list into one ``.ivfdata`` file (per list: its codes, then
  its ids), and the temporary shards are removed.  Memory stays at one shard plus the quantizer, whatever
  the corpus size; list ``j`` holds its ids in ascending order, as an index built in RAM does, so
  both return the same results for the same parameters.
* **files**: ``NAME.faiss`` holds the coarse quantizer, the codec and each list's size and offset,
  plus the *file name* (no directory) of its ``.ivfdata``; with FAISS alone it opens as
  ``faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)``.
* **open** (:func:`open_index`): read-only and memory-mapped: resident memory is the quantizer plus
  the pages of the lists that queries visit (page cache, which the kernel reclaims), never the lists
  as a whole.  The ``.ivfdata`` is looked up beside ``NAME.faiss``, so an output can be moved or copied.

Only IVF indices with ordinary inverted lists qualify (:func:`not_on_disk_reason`): FAISS's fast-scan
lists (``PQ..x4fs``) are packed in blocks and ``Refine`` keeps its re-ranking copies in RAM.

This module imports nothing from curate (a low layer): errors are plain ``ValueError`` /
``FileNotFoundError`` for the caller to word.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: codes (+ 8-byte ids) one temporary shard holds in RAM during the build
SHARD_BYTES = 256 * 1024 ** 2
#: threads FAISS starts at every search to read the visited lists ahead (its default: 32).  Starting them
#: cost 12x the search itself on warm lists (346 vs 4,070 single queries/s, IVF1024 over 200k x 64), so
#: the lists are read by the search's page faults (kernel read-ahead) instead
PREFETCH_THREADS = 0
IVFDATA_SUFFIX = ".ivfdata"


def not_on_disk_reason(index: Any) -> str | None:
    """Why ``index`` (a FAISS index) cannot keep its inverted lists on disk; None when it can."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return "not an IVF index"
    if hasattr(faiss.downcast_index(index), "refine_index"):
        return "Refine keeps its re-ranking vectors in RAM"
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(lists, faiss.BlockInvertedLists):
        return "fast-scan lists (x4fs) are packed in blocks, not on-disk lists"
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return f"{type(lists).__name__} lists"
    if ivf.code_size <= 0 or ivf.code_size >= 1 << 20:
        return "no fixed code size"
    return None


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """FAISS's OnDiskInvertedLists announces each file resize with printf on stdout: send it to stderr, so
    the command's own output stays clean (the C buffer is flushed before and after)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, AttributeError, ValueError):  # no libc handle or no usable fds: leave stdout alone
        yield
        return
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


class OnDiskBuilder:
    """Adds vectors to a trained, empty IVF index in shards and merges them into one ``.ivfdata``
    (see the module doc).  ``directory`` holds the temporary shards (``.NAME.shardNNNNN.tmp``)."""

    def __init__(self, trained: Any, directory: Path, name: str, shard_bytes: int | None = None) -> None:
        import faiss

        reason = not_on_disk_reason(trained)
        if reason:
            raise ValueError(f"on-disk index: {reason}")
        self.trained, self.directory, self.name = trained, Path(directory), name
        ivf = faiss.extract_index_ivf(trained)
        self.nlist, self.code_size = int(ivf.nlist), int(ivf.code_size)
        self.shard_rows = max(1, int(shard_bytes or SHARD_BYTES) // (self.code_size + 8))
        self.shards: list[Path] = []
        self.current = None
        self.ntotal = 0

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        import faiss

        ids = np.ascontiguousarray(ids, np.int64)
        start = 0
        while start < len(x):
            if self.current is None:
                self.current = faiss.clone_index(self.trained)
            take = min(self.shard_rows - self.current.ntotal, len(x) - start)
            self.current.add_with_ids(np.ascontiguousarray(x[start:start + take]), ids[start:start + take])
            start += take
            self.ntotal += take
            if self.current.ntotal >= self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        import faiss

        if self.current is None or self.current.ntotal == 0:
            return
        path = self.directory / f".{self.name}.shard{len(self.shards):05d}.tmp"
        faiss.write_index(self.current, str(path))
        self.shards.append(path)
        self.current = None
        log.debug("index %s: shard %d written (%s)", self.name, len(self.shards), path.name)

    def finish(self, ivfdata: Path) -> Any:
        """Merge the shards into ``ivfdata`` (a new file); returns the trained index holding every vector, its
        lists on disk (opened read-write until it is written; :func:`write` then names the final file)."""
        import faiss

        self._flush()
        index = self.trained
        ivf = faiss.extract_index_ivf(index)
        parts = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in self.shards]  # lists not loaded
        vec = faiss.InvertedListsPtrVector()
        for p in parts:
            vec.push_back(faiss.extract_index_ivf(p).invlists)
        lists = faiss.OnDiskInvertedLists(self.nlist, self.code_size, str(ivfdata))
        with _c_stdout_to_stderr():
            ntotal = lists.merge_from_multiple(vec.data(), vec.size(), False) if len(parts) else 0
        lists.prefetch_nthread = PREFETCH_THREADS  # the tuning searches that follow
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns it now
        index.ntotal = ivf.ntotal = ntotal
        del vec, parts
        self.cleanup()
        if ntotal != self.ntotal:
            raise RuntimeError(f"on-disk index: merged {ntotal} vectors, added {self.ntotal}")
        return index

    def cleanup(self) -> None:
        for p in self.shards:
            p.unlink(missing_ok=True)
        self.shards = []
        self.current = None


def write(index: Any, path: Path, ivfdata_name: str) -> None:
    """Write an on-disk index to ``path``, recording its lists' file by name only (no directory)."""
    import faiss

    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise TypeError("on-disk index: the inverted lists are not on disk")
    if "/" in ivfdata_name or not ivfdata_name.endswith(IVFDATA_SUFFIX):
        raise ValueError(f"on-disk index: bad lists file name {ivfdata_name!r}")
    lists.filename = ivfdata_name  # only written out: the mapping stays on the open file
    faiss.write_index(index, str(path))


def stored_ivfdata(data: bytes) -> tuple[str, int] | None:
    """(name, byte offset of its length field) of the ``.ivfdata`` an index file refers to, or None.

    FAISS writes ``OnDiskInvertedLists`` last in an IVF index file: ..., the file name as a vector of
    chars (8-byte little-endian length, the bytes), then the total size (8 bytes)."""
    tail = len(IVFDATA_SUFFIX)
    for n in range(tail, min(4096, len(data) - 16) + 1):
        at = len(data) - 8 - n - 8
        if data[at + 8 + n - tail:at + 8 + n] != IVFDATA_SUFFIX.encode():
            continue
        if struct.unpack_from("<Q", data, at)[0] == n:
            return data[at + 8:at + 8 + n].decode("utf-8", "replace"), at
    return None


def open_index(path: Path) -> Any:
    """An index file opened to search: an on-disk index read-only with its lists memory-mapped from the
    ``.ivfdata`` beside it (whatever directory the build wrote in the file), any other index as FAISS reads it.

    (Rather than ``IO_FLAG_ONDISK_SAME_DIR``, which prints a line on stdout at every open, the file name
    is substituted in the small index file before FAISS reads it.)"""
    import faiss

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:  # the name is at the end: read the tail first (an in-RAM index can be GBs)
        f.seek(max(0, size - 4200))
        found = stored_ivfdata(f.read())
    if found is None:
        return faiss.read_index(str(path))
    data = path.read_bytes()  # an on-disk index file is small: the quantizer and the lists' offsets
    found = stored_ivfdata(data)
    if found is None:
        raise ValueError(f"{path.name} changed while it was opened")
    name, at = found
    target = path.parent / os.path.basename(name)
    if not target.is_file():
        raise FileNotFoundError(f"{path.name} keeps its lists in {target.name}, which is missing")
    new = os.path.abspath(target).encode()
    patched = data[:at] + struct.pack("<Q", len(new)) + new + data[-8:]
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(patched, np.uint8), reader.data)
    del data, patched
    index = faiss.read_index(reader, faiss.IO_FLAG_READ_ONLY)
    if not is_on_disk(index):
        raise ValueError(f"{path.name}: not an on-disk index though it names {name}")
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).prefetch_nthread = PREFETCH_THREADS
    return index


def is_on_disk(index: Any) -> bool:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def load_whole(index: Any) -> Any:
    """The same index with its lists copied into RAM (``ArrayInvertedLists``): the baseline an on-disk
    index is compared with (tests, bench/index_disk.py)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    src = ivf.invlists
    ram = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for j in range(ivf.nlist):
        n = src.list_size(j)
        if n:
            ram.add_entries(j, n, src.get_ids(j), src.get_codes(j))
    ivf.replace_invlists(ram, True)
    ram.this.disown()
    return index
