"""Inputs that already hold their images: the pipeline starts at the first stage after ``download``.

* Parquet with a column of encoded image bytes: ``input.image_col``.
* ``format: img2dataset``: a folder img2dataset wrote.  Its ``NNNNN.parquet`` files list every row it
  tried (``status``, ``error_message``, ``width``, ``height``, ``original_width``,
  ``original_height``, ``sha256``); the image bytes are in a ``jpg``/``png``/``webp`` column
  (``output_format: parquet``) or in the sibling ``NNNNN.tar`` (``output_format: webdataset``),
  matched by ``key``.  Rows img2dataset failed on are rejected as ``download_failed``, with its
  error message: every row it listed ends up once in ``data/`` or ``rejected/``.
* ``format: webdataset``: plain tars of samples ``KEY.jpg|png|webp`` + ``KEY.txt`` (caption) +
  ``KEY.json`` (its fields become columns: ``url``, ...), read as a stream (stdlib ``tarfile``).

Hostile input: a member larger than ``input.max_image_bytes`` is not read (the row is
``image_too_large``); image sizes come from the header only (no decoding here), and an image whose
header claims more than ``input.max_image_pixels`` is ``image_too_large`` too; an unreadable header
is ``decode_failed``.  Columns img2dataset did not give (sha256 of the bytes, sizes) are computed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from curate import schema as S

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE = "__image"  # the raw batch column holding image bytes, whatever the source called it
KEY = "key"
#: img2dataset's columns -> curate's
I2D_COLUMNS = {"width": S.WIDTH, "height": S.HEIGHT, "original_width": S.ORIGINAL_WIDTH,
               "original_height": S.ORIGINAL_HEIGHT, "sha256": S.IMAGE_SHA256, "status": S.DOWNLOAD_STATUS,
               "error_message": S.DOWNLOAD_ERROR}
#: columns an image input may set directly (they are curate's, not renamed to input_*)
IMAGE_COLUMNS = (S.IMAGE, *I2D_COLUMNS.values())
TOO_LARGE = "__too_large"  # raw column: bytes of an image member that was not read (too large)


def _split(name: str) -> tuple[str, str]:
    """webdataset's key convention: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_tar_samples(path: Path, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """Samples of a webdataset tar, in order: ``{"key", IMAGE, "txt", "json", TOO_LARGE}``."""
    cur: dict[str, Any] | None = None
    with path.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:  # a Path or a UPath
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split(m.name)
            if cur is None or cur["key"] != key:
                if cur is not None:
                    yield cur
                cur = {"key": key}
            if ext in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                if m.size > max_member_bytes:
                    if ext in IMAGE_EXTENSIONS:
                        cur[TOO_LARGE] = m.size
                    continue
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if ext in IMAGE_EXTENSIONS:
                    cur.setdefault(IMAGE, data)
                else:
                    cur[ext] = data
    if cur is not None:
        yield cur


def _json_fields(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        obj = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)) for k, v in obj.items()}


def webdataset_rows(sample: dict[str, Any]) -> dict[str, Any]:
    """One plain webdataset sample as a row: its json fields, ``caption`` from txt, ``key``, the image."""
    row = _json_fields(sample.get("json"))
    row = {I2D_COLUMNS.get(k, k): v for k, v in row.items() if k not in (KEY, "caption")} | {
        "caption": row.get("caption")}
    if "txt" in sample:
        row["caption"] = sample["txt"].decode("utf-8", "replace")
    row[KEY] = sample["key"]
    row[IMAGE] = sample.get(IMAGE)
    row[TOO_LARGE] = sample.get(TOO_LARGE)
    return row


def iter_webdataset(path: Path, batch_rows: int, max_member_bytes: int) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    for sample in iter_tar_samples(path, max_member_bytes):
        rows.append(webdataset_rows(sample))
        if len(rows) >= batch_rows:
            yield _table(rows)
            rows = []
    if rows:
        yield _table(rows)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols = {}
    for n in names:
        values = [r.get(n) for r in rows]
        if n == IMAGE:
            cols[n] = pa.array(values, pa.binary())
        elif n == TOO_LARGE:
            cols[n] = pa.array(values, pa.int64())
        else:
            try:
                cols[n] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: text
                cols[n] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(cols)


def iter_img2dataset(path: Path, batch_rows: int, max_member_bytes: int) -> Iterator[pa.Table]:
    """An img2dataset shard: its parquet rows, each with its image (parquet column or sibling tar)."""
    from curate.io.remote import parquet_file

    pf = parquet_file(path)
    names = pf.schema_arrow.names
    image_col = next((c for c in IMAGE_EXTENSIONS if c in names), None)
    tar_path = path.with_suffix(".tar")
    samples = iter_tar_samples(tar_path, max_member_bytes) if image_col is None and tar_path.exists() else None
    pending: dict[str, dict[str, Any]] = {}  # tar samples read ahead of their parquet row

    def image_of(key: str | None) -> tuple[bytes | None, int | None]:
        if samples is None or key is None:
            return None, None
        while key not in pending:
            s = next(samples, None)
            if s is None:
                return None, None
            pending[s["key"]] = s
        s = pending.pop(key)
        return s.get(IMAGE), s.get(TOO_LARGE)

    for rb in pf.iter_batches(batch_size=batch_rows):
        t = pa.Table.from_batches([rb])
        t = t.rename_columns([I2D_COLUMNS.get(c, c) for c in t.column_names])
        if image_col is not None:
            images = t[image_col].to_pylist()
            t = t.drop_columns([image_col])
            too_large = [len(b) if b is not None and len(b) > max_member_bytes else None for b in images]
            images = [None if x else b for b, x in zip(images, too_large)]
        else:  # the tar holds only the rows img2dataset downloaded: a failed row's key would read it to the end
            keys = t[KEY].to_pylist() if KEY in t.column_names else [None] * t.num_rows
            status = t[S.DOWNLOAD_STATUS].to_pylist() if S.DOWNLOAD_STATUS in t.column_names else [None] * t.num_rows
            found = [image_of(k) if st in (None, "success") else (None, None) for k, st in zip(keys, status)]
            images, too_large = [f[0] for f in found], [f[1] for f in found]
        t = t.append_column(IMAGE, pa.array(images, pa.binary())).append_column(TOO_LARGE, pa.array(too_large, pa.int64()))
        yield t
    if pending:
        log.warning("%s: %d images in %s have no row in the parquet file (ignored)", path, len(pending), tar_path.name)


def image_header(data: bytes) -> tuple[str | None, str, int, int]:
    """(format, mode, width, height) from the image's header alone (nothing is decoded); raises when the
    header cannot be read.  Headers can lie: a decoder must still check what it gets against them."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.mode, int(im.width), int(im.height)


def describe_images(images: list[bytes | None], max_pixels: int) -> list[tuple[Any, ...]]:
    """Per image: (sha256, width, height, reason, detail); reason None when usable.  Header only."""
    out = []
    for b in images:
        if b is None:
            out.append((None, None, None, "missing_image", "no image bytes"))
            continue
        sha = hashlib.sha256(b).hexdigest()
        try:
            _, _, w, h = image_header(b)
        except Exception as e:  # noqa: BLE001 - any unreadable header is this row's problem only
            out.append((sha, None, None, "decode_failed", f"cannot read the image header: {type(e).__name__}"))
            continue
        if w * h > max_pixels:
            out.append((sha, w, h, "image_too_large", f"{w}x{h} pixels, more than input.max_image_pixels={max_pixels}"))
            continue
        out.append((sha, w, h, None, None))
    return out
