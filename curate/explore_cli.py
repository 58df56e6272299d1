"""``curate query``, ``curate report`` and ``curate export`` (registered by curate/cli.py)."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import sys
from typing import Any, Iterable, TextIO

from curate.io.files import InputError

TABLE_ROWS = 50
CELL_WIDTH = 48


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("query", help="DuckDB SQL over an output (views: kept, rejected, samples)",
                       description="Run SQL over OUTPUT_DIR's Parquet files, read in place. Views: kept "
                                   "(data/), rejected (rejected/), samples (both). Example: curate query out "
                                   "\"SELECT reject_reason, count(*) FROM rejected GROUP BY 1 ORDER BY 2 DESC\"")
    s.add_argument("output", help="a curate output directory")
    s.add_argument("sql", help="one SQL statement")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table (default; first --max-rows rows), csv or json (all rows, streamed)")
    s.add_argument("--max-rows", type=int, default=TABLE_ROWS, help=f"rows shown as a table (default {TABLE_ROWS})")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("report", help="(re)write OUTPUT_DIR/report.html")
    s.add_argument("output", help="a curate output directory")
    s.add_argument("--out", default=None, help="where to write the HTML (default OUTPUT_DIR/report.html)")
    s.add_argument("--samples", type=int, default=None, help="kept samples in the image grid")
    s.add_argument("--per-reason", type=int, default=None, help="rejected samples shown per reason")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("export", help="export kept rows as WebDataset shards or a DataComp uid file")
    s.add_argument("output", help="a curate output directory")
    s.add_argument("--format", required=True, choices=["webdataset", "datacomp-uids"])
    s.add_argument("--dest", default=None, help="directory of the tar shards (default OUTPUT_DIR/export/webdataset) "
                                                "or the .npy file (default OUTPUT_DIR/export/datacomp_uids.npy)")
    s.add_argument("--where", default=None, help="SQL filter on the kept view, e.g. \"clip_score >= 0.3\"")
    s.add_argument("--shard-size", type=int, default=10_000, help="samples per tar shard (webdataset)")
    s.add_argument("--caption-field", default="auto",
                   choices=["auto", "training_caption", "caption", "recaption"],
                   help="text of KEY.txt (webdataset; auto: training_caption if present, else caption)")
    s.add_argument("--overwrite", action="store_true", help="replace existing tar shards in --dest (webdataset)")
    s.add_argument("--hash-uids", action="store_true",
                   help="datacomp-uids: use md5(uid) as every row's 128-bit id (for uids that are not 32 hex "
                        "digits)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("refilter", help="tighten a finished output with an SQL condition, as a new output "
                                        "(no model runs again)",
                       description="Write DEST, a complete curate output holding the kept rows of OUTPUT_DIR "
                                   "that satisfy --where; the others join DEST's rejected/ with reason "
                                   "--reason. Example: curate refilter out strict --where \"clip_score >= 0.3 AND "
                                   "caption_perplexity <= 2000\"")
    s.add_argument("output", help="a curate output directory (the source; never modified)")
    s.add_argument("dest", help="the new output directory")
    s.add_argument("--where", required=True, help="SQL condition on the kept rows' columns (rows kept when true)")
    s.add_argument("--reason", default="refiltered", help="reject_reason of the rows it removes")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    s.set_defaults(func=cmd_refilter)


# -- query ---------------------------------------------------------------------------------------
def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from curate.query import connect

    con = connect(args.output)
    try:
        rel = con.sql(args.sql)
        if rel is None:  # a statement without a result
            return 0
        names = list(rel.columns)
        if args.format == "table":
            rows = [tuple(r) for r in rel.limit(args.max_rows + 1).fetchall()]
            sys.stdout.write(format_table(names, rows[: args.max_rows], more=len(rows) > args.max_rows) + "\n")
        else:
            reader = rel.to_arrow_reader(4096)
            batches = (zip(*[b.column(i).to_pylist() for i in range(b.num_columns)]) for b in reader)
            rows_iter = (r for batch in batches for r in batch)
            (write_csv if args.format == "csv" else write_json)(names, rows_iter, sys.stdout)
    except duckdb.Error as e:  # the SQL is the user's: one line, exit 2
        raise InputError(f"query: {' '.join(str(e).split())}") from None
    finally:
        con.close()
    return 0


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        head = ", ".join(_cell(x) for x in v[:3])
        return f"[{head}{', …' if len(v) > 3 else ''}] ({len(v)})"
    s = str(v).replace("\n", " ")
    return s if len(s) <= CELL_WIDTH else s[: CELL_WIDTH - 1] + "…"


def format_table(names: list[str], rows: list[tuple], more: bool = False) -> str:
    """A psql-like text table; bytes and long lists are summarised, long text cut."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows for i in range(len(names))]

    def line(vals: list[str]) -> str:
        return " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(names), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{', more not shown: use --max-rows' if more else ''})")
    return "\n".join(out)


def _plain(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def write_csv(names: list[str], rows: Iterable[tuple], out: TextIO) -> None:
    """CSV with a header; bytes as base64, lists as JSON arrays."""
    w = csv.writer(out)
    w.writerow(names)
    for r in rows:
        w.writerow(["" if v is None else json.dumps(_plain(v)) if isinstance(v, (list, dict)) else _plain(v)
                    for v in r])


def write_json(names: list[str], rows: Iterable[tuple], out: TextIO) -> None:
    """A JSON array of objects, streamed; bytes as base64."""
    out.write("[")
    for i, r in enumerate(rows):
        out.write(("," if i else "") + "\n" + json.dumps(dict(zip(names, (_plain(v) for v in r))),
                                                       ensure_ascii=False, default=str))
    out.write("\n]\n")


# -- report and export ---------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from curate.report import write_report

    opts = {k: v for k, v in (("samples", args.samples), ("per_reason", args.per_reason)) if v is not None}
    path = write_report(args.output, path=args.out, **opts)
    sys.stdout.write(f"report: {path}\n")
    return 0


def cmd_refilter(args: argparse.Namespace) -> int:
    from curate.subset import refilter

    res = refilter(args.output, args.dest, args.where, reason=args.reason, overwrite=args.overwrite)
    sys.stdout.write(f"{res['kept_after']} of {res['kept_before']} kept rows satisfy the condition -> {res['dest']}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from curate import export

    if args.format == "webdataset":
        m = export.export_webdataset(args.output, args.dest, shard_size=args.shard_size,
                                     caption_field=args.caption_field, where=args.where, overwrite=args.overwrite)
        sys.stdout.write(f"{m['samples']} samples in {len(m['shards'])} shards: {m['url_pattern']}\n")
        if m["skipped_without_image"]:
            sys.stdout.write(f"skipped {m['skipped_without_image']} kept rows without an image\n")
    else:
        info = export.export_datacomp_uids(args.output, args.dest, where=args.where, hash_uids=args.hash_uids)
        sys.stdout.write(f"{info['uids']} uids ({'md5 of the uid' if info['hashed'] else 'hex uid'}) "
                         f"-> {info['path']} (numpy dtype u8,u8, sorted)\n")
    return 0
