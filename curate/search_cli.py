"""``curate index``, ``curate search`` and ``curate serve`` (registered by curate/cli.py)."""

from __future__ import annotations

import argparse
import sys

from curate.index_plan import ON_DISK_BYTES, ON_DISK_FROM
from curate.io.files import InputError

SHOWN = ("uid", "score", "caption", "url")


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("index", help="build FAISS indices of an output's embeddings under OUTPUT_DIR/index/",
                       description="Index the kept rows' image embeddings (and with --text their text embeddings, "
                                   "with --rejected the rejected rows' too). The index type follows the size and "
                                   "--memory (flat below 1M rows, IVF-PQ above; from --on-disk-from rows an "
                                   "IVF-SQ8 index whose lists stay on disk, memory-mapped by searches; see "
                                   "docs/CONTRACT.md); the output reports recall@10 against exact search on a sample.")
    s.add_argument("output", help="a curate output directory")
    s.add_argument("--text", action="store_true", help="also index text embeddings")
    s.add_argument("--rejected", action="store_true", help="also index the rejected rows that have embeddings")
    s.add_argument("--memory", default="4GiB", help="memory budget of one index (default 4GiB)")
    s.add_argument("--kind", choices=["auto", "flat", "ivfpq", "ivfsq8", "hnsw"], default="auto",
                   help="index kind (default auto)")
    s.add_argument("--factory", default=None, help="a faiss.index_factory string instead (e.g. IVF4096,PQ64x4fsr)")
    s.add_argument("--target-recall", type=float, default=0.9, help="recall@10 the search parameters are tuned for")
    s.add_argument("--on-disk-from", default=str(ON_DISK_FROM), metavar="ROWS",
                   help=f"from this many vectors an IVF index keeps its inverted lists in a memory-mapped .ivfdata "
                        f"file: searches hold the quantizer, not the lists, in RAM (default {ON_DISK_FROM}; 0: "
                        "always; 'never': in RAM)")
    s.add_argument("--on-disk-bytes", default=f"{ON_DISK_BYTES >> 20}MiB", metavar="SIZE",
                   help="also from this many bytes of float32 vectors (rows x dimension x 4), fewer rows than "
                        f"--on-disk-from (default {ON_DISK_BYTES >> 20}MiB; 'never': by rows only)")
    s.add_argument("--nprobe", type=int, default=None,
                   help="lists an IVF search visits, fixed instead of tuned for --target-recall")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="nearest rows to a text, an image or a row (needs `curate index`)",
                       description="Example: curate search out --text \"a red bicycle\" -k 20 "
                                   "--where \"clip_score > 0.3\"")
    s.add_argument("output", help="a curate output directory with an index/")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a caption, encoded by the run's CLIP text tower")
    q.add_argument("--image", help="an image file, encoded by the run's CLIP image tower")
    q.add_argument("--uid", help="the uid of a row (kept or rejected): its stored embedding")
    s.add_argument("-k", type=int, default=10, help="results (default 10)")
    s.add_argument("--where", default=None, help="SQL condition on the rows' columns, e.g. \"clip_score > 0.3\"")
    s.add_argument("--view", choices=["kept", "rejected"], default="kept", help="rows searched (default kept)")
    s.add_argument("--modality", choices=["image", "text"], default="image",
                   help="embeddings searched (default image: --text finds images)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--columns", default=",".join(SHOWN), help=f"columns printed (default {','.join(SHOWN)})")
    s.add_argument("--nprobe", type=int, default=None,
                   help="lists an IVF index visits (default: the value `curate index` tuned; more: slower, "
                        "higher recall)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("serve", help="a local web app to browse, search and carve subsets of an output")
    s.add_argument("output", help="a curate output directory")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    s.add_argument("--subsets-dir", default=None, help="where saved subsets go (default OUTPUT_DIR/subsets)")
    s.set_defaults(func=cmd_serve)


def cmd_index(args: argparse.Namespace) -> int:
    from curate.index import build_index, describe
    from curate.index_plan import parse_bytes

    try:
        memory = parse_bytes(args.memory)
    except ValueError as e:
        raise InputError(f"index: --memory: {e}") from None
    on_disk_from = None if args.on_disk_from.strip().lower() == "never" else _rows(args.on_disk_from)
    try:
        on_disk_bytes = None if args.on_disk_bytes.strip().lower() == "never" else parse_bytes(args.on_disk_bytes)
    except ValueError as e:
        raise InputError(f"index: --on-disk-bytes: {e} (or 'never')") from None
    if args.nprobe is not None and args.nprobe < 1:
        raise InputError("index: --nprobe must be at least 1")
    meta = build_index(args.output, text=args.text, rejected=args.rejected, memory=memory, kind=args.kind,
                       factory=args.factory, target_recall=args.target_recall, on_disk_from=on_disk_from,
                       nprobe=args.nprobe, on_disk_bytes=on_disk_bytes)
    sys.stdout.write(describe(meta) + "\n")
    from curate.dup_groups import summary  # the table `curate serve` pages duplicate groups from (issue #28)

    sys.stdout.write(summary(args.output) + "\n")
    return 0


def _rows(value: str) -> int:
    """``--on-disk-from``: a number of rows (``1000000``, ``1e6``, ``1_000_000``)."""
    try:
        n = float(value.replace("_", ""))
    except ValueError:
        raise InputError(f"index: --on-disk-from: not a number of rows: {value!r} (or 'never')") from None
    if not 0 <= n < 1e15 or n != int(n):
        raise InputError(f"index: --on-disk-from: not a number of rows: {value!r} (or 'never')")
    return int(n)


def cmd_search(args: argparse.Namespace) -> int:
    from curate.explore_cli import format_table, write_csv, write_json
    from curate.search import search

    table = search(args.output, text=args.text, image=args.image, uid=args.uid, k=args.k, where=args.where,
                   view=args.view, modality=args.modality, nprobe=args.nprobe)
    cols = [c.strip() for c in args.columns.split(",") if c.strip()]
    missing = [c for c in cols if c not in table.column_names]
    if missing and table.num_rows:
        raise InputError(f"search: no column {missing[0]!r} (have: {', '.join(table.column_names)})")
    cols = [c for c in cols if c in table.column_names] or ["uid", "score"]
    rows = list(zip(*[table.column(c).to_pylist() for c in cols])) if table.num_rows else []
    if args.format == "table":
        sys.stdout.write(format_table(cols, rows) + "\n")
    else:
        (write_csv if args.format == "csv" else write_json)(cols, rows, sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from curate.serve.app import serve

    serve(args.output, host=args.host, port=args.port, subsets_dir=args.subsets_dir)
    return 0
