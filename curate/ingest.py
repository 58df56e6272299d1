"""Ingest: read the input files, give every row a uid, reject rows that are bad
on their own (missing/invalid/over-long url or caption, malformed or undecodable
records) and cut the rows into work shards of ``input.shard_size`` rows.

Shard ids are ``HHHHHHHHHHHHHHHH-CCCCC`` (a digest of the input file's path, chunk index), so ingest of
different files can run in parallel, and a shard's id never depends on timing nor on where its file sorts
among the input files (``curate run --append`` adds files anywhere).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.config import InputConfig
from curate.io.files import InputError, format_of, write_parquet_atomic
from curate.io.reader import BAD_ENCODING, ROW, Malformed, RawBatch, bad_type_column, input_columns, iter_raw
from curate.table_ops import mark_rejected, stable_uid

log = logging.getLogger(__name__)

STAGE_ID = "input"
ALLOWED_SCHEMES = ("http", "https")


@dataclass
class ShardInfo:
    shard: str
    rows: int
    path: str


def check_input(files: list[Path], cfg: InputConfig) -> dict[str, list[str]]:
    """Fail early, naming the file and column, when an input file lacks a needed column."""
    needed = ([] if cfg.provides_images else [cfg.url_col]) + [cfg.caption_col] + \
        ([cfg.uid_col] if cfg.uid_col else []) + ([cfg.image_col] if cfg.image_col else [])
    found = {}
    for f in files:
        fmt = format_of(f, cfg.format)
        if fmt == "webdataset":  # a tar has no header: its samples are checked row by row
            found[str(f)] = []
            continue
        cols = input_columns(f, fmt, cfg.max_line_bytes)
        if not cols:
            log.warning("%s: empty input file (no rows)", f)
            found[str(f)] = cols
            continue
        for c in needed:
            if c not in cols:
                raise InputError(f"{f}: column {c!r} not found (columns: {', '.join(cols[:20])}); "
                                 f"set input.url_col / input.caption_col / input.uid_col / input.image_col")
        found[str(f)] = cols
    return found


def _as_string(table: pa.Table, col: str, path: Path) -> pa.Array:
    arr = table[col]
    if pa.types.is_string(arr.type):
        return arr
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_large_string(arr.type) or pa.types.is_dictionary(arr.type) or pa.types.is_string_view(arr.type):
        return arr.cast(pa.string())
    raise InputError(f"{path}: column {col!r} has type {arr.type}, expected text")


def _url_problem(url: str) -> tuple[str, str] | None:
    u = url.strip()
    if not u:
        return "missing_url", "url is empty"
    try:
        parts = urlsplit(u)
    except ValueError as e:
        return "malformed_url", f"cannot parse url: {e}"
    if not parts.scheme:
        return "malformed_url", "url has no scheme"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return "unsupported_scheme", f"scheme {parts.scheme!r} is not http(s)"
    try:
        host = parts.hostname
    except ValueError as e:
        return "malformed_url", f"cannot parse url: {e}"
    if not host or any(ch.isspace() for ch in u) or ".." in host or host.startswith("."):
        return "malformed_url", "url has no valid host" if not host else "url contains whitespace or a bad host"
    return None


def normalize(raw: RawBatch, cfg: InputConfig, path: Path) -> pa.Table:
    """Turn a raw batch into rows with the base columns, carried columns and reject columns."""
    from curate.io import images

    t = raw.table
    n = t.num_rows
    if cfg.provides_images and cfg.url_col not in t.column_names:  # the url is only metadata then
        t = t.append_column(cfg.url_col, pa.nulls(n, pa.string()))
    if cfg.provides_images and cfg.caption_col not in t.column_names:
        t = t.append_column(cfg.caption_col, pa.nulls(n, pa.string()))
    urls = _as_string(t, cfg.url_col, path) if n else pa.array([], pa.string())
    caps = _as_string(t, cfg.caption_col, path) if n else pa.array([], pa.string())
    url_list, cap_list = urls.to_pylist(), caps.to_pylist()
    if cfg.uid_col:
        uids = pc.cast(t[cfg.uid_col], pa.string()).to_pylist() if n else []
    elif cfg.provides_images and images.KEY in t.column_names:  # no url: the sample key names the row
        keys = pc.cast(t[images.KEY], pa.string()).to_pylist()
        uids = [stable_uid(u if u is not None else f"{path.name}/{k}", c) for u, k, c in zip(url_list, keys, cap_list)]
    else:
        uids = [stable_uid(u, c) for u, c in zip(url_list, cap_list)]
    cols: dict[str, pa.Array] = {
        S.UID: pa.array(uids, pa.string()),
        S.URL: urls,
        S.CAPTION: caps,
        S.SOURCE_FILE: pa.array([str(path)] * n, pa.string()),
        S.SOURCE_ROW: t[ROW] if n else pa.array([], pa.int64()),
    }
    special = {cfg.url_col, cfg.caption_col, cfg.uid_col, ROW, BAD_ENCODING, images.IMAGE, images.TOO_LARGE,
               cfg.image_col}
    for name in t.column_names:
        if name in special or name.startswith("__bad_type_"):
            continue
        if cfg.provides_images and name in images.IMAGE_COLUMNS:  # img2dataset's columns, in curate's names
            cols[name] = pc.cast(t[name], S.field(name).type)
            continue
        out = name if (name not in S.COLUMNS and not name.startswith("_")) else f"input_{name.lstrip('_')}"
        if out != name:
            log.debug("%s: input column %r renamed to %r (name used by curate)", path, name, out)
        cols[out] = t[name]
    for c in S.REJECT_COLUMNS:
        cols[c] = pa.nulls(n, pa.string())
    table = pa.table(cols)
    table = _validate(table, t, cfg, url_list, cap_list, uids, path)
    if cfg.provides_images:
        table = _with_images(table, t, cfg, path)
    if raw.malformed:
        table = pa.concat_tables([table, _malformed_rows(raw.malformed, path, table.schema)])
    return table


def _with_images(table: pa.Table, raw: pa.Table, cfg: InputConfig, path: Path) -> pa.Table:
    """The image columns of an input that has its images; rows without a usable image rejected."""
    from curate.io import images

    n = table.num_rows
    col = cfg.image_col or images.IMAGE
    blobs = pc.cast(raw[col], pa.binary()).to_pylist() if col in raw.column_names else [None] * n
    too_large = _flags(raw, images.TOO_LARGE, n)
    for i, b in enumerate(blobs):
        if b is not None and len(b) > cfg.max_image_bytes:
            blobs[i], too_large[i] = None, len(b)
    info = images.describe_images(blobs, cfg.max_image_pixels)
    given = {c: table[c].to_pylist() for c in images.IMAGE_COLUMNS if c in table.column_names}
    status = given.get(S.DOWNLOAD_STATUS, [None] * n)
    error = given.get(S.DOWNLOAD_ERROR, [None] * n)
    reasons, details = [], []
    for i, (sha, w, h, reason, detail) in enumerate(info):
        if status[i] not in (None, "success"):  # img2dataset could not download it
            reason, detail = "download_failed", error[i] or status[i]
        elif too_large[i]:
            reason, detail = "image_too_large", f"{too_large[i]} bytes, more than input.max_image_bytes={cfg.max_image_bytes}"
        reasons.append(reason)
        details.append(detail)
    computed = {
        S.IMAGE: blobs,
        S.IMAGE_SHA256: [x[0] for x in info],
        S.WIDTH: [x[1] for x in info],
        S.HEIGHT: [x[2] for x in info],
        S.ORIGINAL_WIDTH: [x[1] for x in info],
        S.ORIGINAL_HEIGHT: [x[2] for x in info],
        S.DOWNLOAD_STATUS: ["success" if b is not None else s for b, s in zip(blobs, status)],
    }
    for c, values in computed.items():
        if c in given and c != S.IMAGE:  # what img2dataset recorded wins where it has a value
            values = [g if g is not None else v for g, v in zip(given[c], values)]
        arr = pa.array(values, S.field(c).type)
        i = table.schema.get_field_index(c)
        table = table.set_column(i, S.field(c), arr) if i >= 0 else table.append_column(S.field(c), arr)
    live = pc.is_null(table[S.REJECT_REASON]).to_pylist()
    mask = [lv and r is not None for lv, r in zip(live, reasons)]
    if not any(mask):
        return table
    errors = ["img2dataset" if r == "download_failed" else ("decode_error" if r == "decode_failed" else None)
              for r in reasons]
    return mark_rejected(table, mask, pa.array(reasons, pa.string()), STAGE_ID, pa.array(details, pa.string()),
                         pa.array(errors, pa.string()))


def _flags(raw: pa.Table, col: str, n: int) -> list:
    return raw[col].to_pylist() if col in raw.column_names else [None] * n


def _validate(table: pa.Table, raw: pa.Table, cfg: InputConfig, urls: list, caps: list, uids: list,
              path: Path) -> pa.Table:
    n = len(urls)
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    bad_enc = _flags(raw, BAD_ENCODING, n)
    bad_url = _flags(raw, bad_type_column(cfg.url_col), n)
    bad_cap = _flags(raw, bad_type_column(cfg.caption_col), n)
    rows = table[S.SOURCE_ROW].to_pylist()
    for i, (u, c, uid) in enumerate(zip(urls, caps, uids)):
        if bad_enc[i]:
            reasons[i] = "invalid_encoding"
            details[i] = f"{path.name} row {rows[i]}: {bad_enc[i]} not valid UTF-8 (bad bytes stored as U+FFFD)"
        elif u is not None and len(u) > cfg.max_url_chars:
            reasons[i] = "url_too_long"
            details[i] = (f"url has {len(u)} characters, more than input.max_url_chars={cfg.max_url_chars} "
                          f"(stored truncated to {cfg.max_url_chars})")
        elif c is not None and len(c) > cfg.max_caption_chars:
            reasons[i] = "caption_too_long"
            details[i] = (f"caption has {len(c)} characters, more than input.max_caption_chars="
                          f"{cfg.max_caption_chars} (stored truncated to {cfg.max_caption_chars})")
        elif bad_url[i] and not cfg.provides_images:
            reasons[i], details[i] = "invalid_url", f"{cfg.url_col} is not a string"
        elif u is None and not cfg.provides_images:
            reasons[i], details[i] = "missing_url", f"{cfg.url_col} is null"
        elif not cfg.provides_images and (p := _url_problem(u)) is not None:
            reasons[i], details[i] = p
        elif bad_cap[i]:
            reasons[i], details[i] = "invalid_caption", f"{cfg.caption_col} is not a string"
        elif c is None:
            reasons[i], details[i] = "missing_caption", f"{cfg.caption_col} is null"
        elif not c.strip():
            reasons[i], details[i] = "empty_caption", f"{cfg.caption_col} is empty"
        elif uid is None or not str(uid).strip():
            reasons[i], details[i] = "missing_uid", f"{cfg.uid_col} is null or empty"
    mask = [r is not None for r in reasons]
    if not any(mask):
        return table
    table = _truncate(table, S.URL, urls, cfg.max_url_chars)
    table = _truncate(table, S.CAPTION, caps, cfg.max_caption_chars)
    errors = ["encoding_error" if r == "invalid_encoding" else None for r in reasons]
    return mark_rejected(table, mask, pa.array(reasons, pa.string()), STAGE_ID, pa.array(details, pa.string()),
                         pa.array(errors, pa.string()))


def _truncate(table: pa.Table, col: str, values: list, limit: int) -> pa.Table:
    """Over-long values (always rejected) are stored cut to ``limit`` so rejected/ stays small."""
    if not any(v is not None and len(v) > limit for v in values):
        return table
    cut = [v[:limit] if v is not None and len(v) > limit else v for v in values]
    return table.set_column(table.schema.get_field_index(col), col, pa.array(cut, pa.string()))


def _malformed_rows(bad: list[Malformed], path: Path, schema: pa.Schema) -> pa.Table:
    n = len(bad)
    cols = {
        S.UID: [stable_uid(None, f"{path}:{m.row}:{m.detail}") for m in bad],
        S.SOURCE_FILE: [str(path)] * n,
        S.SOURCE_ROW: [m.row for m in bad],
        S.REJECT_REASON: [m.reason for m in bad],
        S.REJECT_STAGE: [STAGE_ID] * n,
        S.REJECT_DETAIL: [f"{path.name} row {m.row if m.row is not None else '?'}: {m.detail}" for m in bad],
        S.ERROR_TYPE: [m.error_type for m in bad],
    }
    arrays = [pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def ingest_file(file_id: str, path: Path, cfg: InputConfig, out_dir: Path, compression: str) -> list[ShardInfo]:
    """Read one input file and write its shards to ``out_dir`` (ids ``FILE_ID-CCCCC``); returns what was
    written."""
    shards: list[ShardInfo] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    string_cols = [c for c in (cfg.url_col, cfg.caption_col, cfg.uid_col) if c]

    def flush(tables: list[pa.Table]) -> None:
        table = pa.concat_tables(tables, promote_options="permissive")
        shard = f"{file_id}-{len(shards):05d}"
        table = table.append_column(S.SHARD, pa.array([shard] * table.num_rows, pa.string()))
        dest = out_dir / f"{shard}.parquet"
        write_parquet_atomic(table, dest, compression)
        shards.append(ShardInfo(shard, table.num_rows, str(dest)))

    for raw in iter_raw(path, cfg.format, min(cfg.shard_size, 65536), string_cols, cfg.max_line_bytes,
                        cfg.max_image_bytes):
        table = normalize(raw, cfg, path)
        while table.num_rows:
            take = min(cfg.shard_size - pending_rows, table.num_rows)
            pending.append(table.slice(0, take))
            pending_rows += take
            table = table.slice(take)
            if pending_rows >= cfg.shard_size:
                flush(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        flush(pending)
    if not shards:
        log.warning("%s: no rows", path)
    return shards
