"""Exports of a run's kept rows for training loaders (``curate export``).

* WebDataset: tar shards of ``KEY.<jpg|png|webp>`` (the stored image bytes), ``KEY.txt``
  (the training text) and ``KEY.json`` (every scalar column: uid, url, caption, recaption,
  training_caption, clip_score, sizes...).  KEY is the row's uid when it is a safe file
  name (letters, digits, ``-``, ``_``), else the sha1 of the uid; ``uid`` is always in
  the json.  Shards are written atomically with fixed tar metadata, so an export is
  byte-for-byte reproducible; ``manifest.json`` lists them.
* DataComp uids: the ``.npy`` subset file DataComp's resharder takes (``-s``): a sorted
  numpy structured array of dtype ``np.dtype("u8,u8")`` holding each 128-bit uid as two
  uint64 (hex digits 0-15 and 16-31).  DataComp pool uids are 32 hex digits, and so are
  curate's own uids when the input has none.  Other uids are refused unless
  ``hash_uids=True``, which uses ``md5(uid)`` as every row's 128-bit id.

Both stream rows from DuckDB (bounded memory) and accept an SQL ``where`` filter on the
``kept`` view, e.g. ``clip_score >= 0.3`` to export a stricter subset without a re-run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from curate import schema as S
from curate.io.files import InputError, write_json_atomic
from curate.io.remote import abort_upload, is_remote, output_root
from curate.query import connect

BATCH_ROWS = 2048
CAPTION_FIELDS = ("auto", S.TRAINING_CAPTION, S.CAPTION, S.RECAPTION)
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")  # + ".json" fits a ustar name
_HEX128 = "[0-9a-fA-F]{32}"


def image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return "img"


def sample_key(uid: str) -> str:
    return uid if _SAFE_KEY.fullmatch(uid) else hashlib.sha1(uid.encode()).hexdigest()


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _kept_rows(output_dir: Path, columns: str, where: str | None,
               order: str = "") -> tuple[Any, Iterator[pa.RecordBatch]]:
    con = connect(output_dir)
    sql = f"SELECT {columns} FROM kept" + (f" WHERE {where}" if where else "") + (f" ORDER BY {order}" if order else "")
    try:
        reader = con.sql(sql).to_arrow_reader(BATCH_ROWS)
    except Exception as e:  # duckdb.Error: a bad --where is the user's mistake
        con.close()
        raise InputError(f"export: {str(e).splitlines()[0]}") from None
    return con, reader


class _TarShards:
    """Writes numbered tar shards (``tarfile``, ustar, mode 644, mtime 0: reproducible byte for byte) of at
    most ``shard_size`` samples, each atomically: a local shard is renamed into place when complete; on
    object storage its upload completes only then (an aborted shard's upload is discarded)."""

    def __init__(self, dest: Any, shard_size: int) -> None:
        self.dest, self.shard_size = dest, shard_size
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{len(self.shards):05d}.tar"
        if is_remote(self.dest):
            self._tmp = None
            self._f = self.dest.fs.open((self.dest / name).path, "wb")
        else:
            self._tmp = self.dest / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            self._f = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": 0})
        self._count = 0

    def _close(self) -> None:
        if self._f is not None:
            self._tar.close()  # end-of-archive blocks, padded to a whole record
            size = self._f.tell()
            self._f.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.dest / self.shards[-1]["name"])
            self.shards[-1]["bytes"] = size
            self._f = self._tar = None

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._f is None or self._count >= self.shard_size:
            self._close()
            self._open()
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.shards[-1]["samples"] += 1

    def abort(self) -> None:
        if self._f is not None:
            if self._tmp is None:
                abort_upload(self._f)
            else:
                self._f.close()
                self._tmp.unlink(missing_ok=True)
            self.shards.pop()
            self._f = self._tar = None

    def finish(self) -> None:
        self._close()


def export_webdataset(output_dir: str | Path, dest: str | Path | None = None, shard_size: int = 10_000,
                      caption_field: str = "auto", where: str | None = None, overwrite: bool = False) -> dict:
    """Write the kept rows (optionally filtered by ``where``) as WebDataset tar shards; returns the manifest."""
    out = output_root(output_dir)
    dest = output_root(dest) if dest else out / "export" / "webdataset"
    if shard_size < 1:
        raise InputError("export: --shard-size must be at least 1")
    if caption_field not in CAPTION_FIELDS:
        raise InputError(f"export: caption field must be one of {', '.join(CAPTION_FIELDS)}")
    con = connect(out)
    cols = list(con.sql("SELECT * FROM kept LIMIT 0").columns)
    con.close()
    if S.IMAGE not in cols:
        raise InputError(f"export: {out} has no '{S.IMAGE}' column (did the pipeline download images?)")
    if caption_field == "auto":
        caption_field = S.TRAINING_CAPTION if S.TRAINING_CAPTION in cols else S.CAPTION
    elif caption_field not in cols:
        raise InputError(f"export: {out} has no '{caption_field}' column")
    existing = sorted(dest.glob("*.tar")) if dest.is_dir() else []
    if existing and not overwrite:
        raise InputError(f"export: {dest} already holds {len(existing)} tar shards; pass --overwrite")
    for f in existing:
        f.unlink()
    if not is_remote(dest):
        dest.mkdir(parents=True, exist_ok=True)
    skip = {S.IMAGE, S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING, S.REJECT_REASON, S.REJECT_STAGE, S.REJECT_DETAIL,
            S.ERROR_TYPE}
    con, reader = _kept_rows(out, "*", where)
    writer = _TarShards(dest, shard_size)
    skipped = 0
    try:
        for batch in reader:
            meta_cols = [c for c in batch.schema.names
                         if c not in skip and not pa.types.is_nested(batch.schema.field(c).type)
                         and not pa.types.is_binary(batch.schema.field(c).type)]
            meta = {c: batch.column(c).to_pylist() for c in meta_cols}
            images = batch.column(S.IMAGE).to_pylist()
            texts = batch.column(caption_field).to_pylist()
            fallback = batch.column(S.CAPTION).to_pylist()
            for i, img in enumerate(images):
                if not img:
                    skipped += 1
                    continue
                row = {c: _json_value(meta[c][i]) for c in meta_cols}
                text = texts[i] if texts[i] is not None else fallback[i]
                writer.add(sample_key(str(row[S.UID])), [
                    (image_ext(img), img), ("txt", (text or "").encode()),
                    ("json", json.dumps(row, ensure_ascii=False, sort_keys=True).encode())])
    except BaseException:
        writer.abort()
        raise
    else:
        writer.finish()
    finally:
        con.close()
    n = sum(s["samples"] for s in writer.shards)
    manifest = {"format": "webdataset", "source": str(out), "where": where, "caption_field": caption_field,
                "samples": n, "skipped_without_image": skipped, "shards": writer.shards,
                "url_pattern": str(dest / (f"{{00000..{len(writer.shards) - 1:05d}}}.tar" if writer.shards else ""))}
    write_json_atomic(manifest, dest / "manifest.json")
    return manifest


def export_datacomp_uids(output_dir: str | Path, dest: str | Path | None = None, where: str | None = None,
                         hash_uids: bool = False) -> dict:
    """Write the sorted ``np.dtype("u8,u8")`` array of kept uids DataComp's resharder reads."""
    import numpy as np

    out = output_root(output_dir)
    final = output_root(dest) if dest else out / "export" / "datacomp_uids.npy"
    # the array is built in a local file (a memory map); on object storage it is uploaded when complete
    dest = Path(tempfile.mkdtemp(prefix="curate-uids-")) / final.name if is_remote(final) else final
    if dest.suffix != ".npy":
        raise InputError(f"export: {dest}: the DataComp subset file must end in .npy")
    filt = f" WHERE {where}" if where else ""
    con = connect(out)
    try:
        n, bad, example = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE NOT regexp_full_match(uid, '{_HEX128}')), "
            f"any_value(uid) FILTER (WHERE NOT regexp_full_match(uid, '{_HEX128}')) FROM kept{filt}").fetchall()[0]
    except Exception as e:  # duckdb.Error
        con.close()
        raise InputError(f"export: {str(e).splitlines()[0]}") from None
    con.close()
    if bad and not hash_uids:
        raise InputError(f"export: {bad} of {n} kept uids are not 128-bit hex (e.g. {example!r}); DataComp needs "
                         "32-hex-digit uids -- pass --hash-uids to use md5(uid) instead")
    u = "md5(uid)" if hash_uids else "lower(uid)"
    cols = (f"('0x' || substr({u}, 1, 16))::UBIGINT AS hi, ('0x' || substr({u}, 17, 16))::UBIGINT AS lo")
    con, reader = _kept_rows(out, cols, where, order="hi, lo")  # DuckDB sorts (spilling to disk if needed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{uuid.uuid4().hex[:8]}.tmp.npy")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype("u8,u8"), shape=(n,))
        i = 0
        for batch in reader:
            k = batch.num_rows
            arr["f0"][i:i + k] = batch.column("hi").to_numpy(zero_copy_only=False)
            arr["f1"][i:i + k] = batch.column("lo").to_numpy(zero_copy_only=False)
            i += k
        if i != n:
            raise RuntimeError(f"export: expected {n} uids, read {i}")
        arr.flush()
        del arr
        os.replace(tmp, dest)
        if dest != final:
            final.fs.put_file(str(dest), final.path)
    finally:
        con.close()
        if tmp.exists():
            tmp.unlink()
        if dest != final:
            shutil.rmtree(dest.parent, ignore_errors=True)
    info = {"format": "datacomp-uids", "source": str(out), "where": where, "path": str(final), "uids": n,
            "hashed": bool(hash_uids), "dtype": "u8,u8"}
    write_json_atomic(info, final.with_suffix(".json"))
    return info
