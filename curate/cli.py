"""The ``curate`` command line (see CONTRACT.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from curate.config import ConfigError, load_config, parse_overrides
from curate.io.files import InputError

log = logging.getLogger("curate")

EXIT_USER = 2
EXIT_FAILED = 1


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _env() -> None:
    from curate.raycluster import SAFE_ENV

    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, parse_overrides(args.set))
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from curate.pipeline import execute
    from curate.stats import format_stats

    cfg = load_config(args.config, parse_overrides(args.set))
    retry = None
    if args.retry_failed is not None:
        retry = [t.strip() for t in args.retry_failed.split(",") if t.strip()] or None
        retry = retry if retry is not None else []  # [] = the stages' default transient error types
    result = execute(cfg, append=args.append, retry_failed=retry)
    sys.stdout.write(format_stats(result.stats) + "\n")
    sys.stdout.write(f"output: {result.output}\n")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Counts recomputed from the Parquet output through DuckDB (order, seconds, info from stats.json)."""
    from curate.query import output_stats
    from curate.stats import format_stats

    sys.stdout.write(format_stats(output_stats(args.output)) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from curate.demo.run import run_demo

    t0 = time.time()
    result = run_demo(Path(args.output), runner=args.runner, rows=args.rows, extra=parse_overrides(args.set))
    from curate.stats import format_stats

    sys.stdout.write(format_stats(result.stats) + "\n")
    sys.stdout.write(f"output: {result.output}/data (kept), {result.output}/rejected, {result.output}/stats.json\n")
    report = result.output / "report.html"
    if report.exists():
        sys.stdout.write(f"report: {report}\n")
    sys.stdout.write(f"demo finished in {time.time() - t0:.1f}s\n")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "validate": cmd_validate,
    "demo": cmd_demo,
    "stats": cmd_stats,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="Curate web image-text pairs into a training corpus.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug logging and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run the pipeline a config describes"),
                        ("validate", "validate a config and print it resolved; does no work")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted path)")
        if name == "run":
            s.add_argument("--append", action="store_true",
                           help="the input gained files: process their rows, re-fit the global stages over all "
                                "rows, reuse every row's finished work")
            s.add_argument("--retry-failed", nargs="?", const="", default=None, metavar="TYPES",
                           help="fetch again the rows the download rejected with these error types (comma-"
                                "separated, * matches; default: timeout, connection errors, DNS, TLS, "
                                "http_429, http_5*)")
    s = sub.add_parser("demo", help="generate, serve and curate a small offline corpus")
    s.add_argument("output", nargs="?", default="demo-output", help="output directory (default: demo-output)")
    s.add_argument("--runner", choices=["local", "ray"], default=None, help="override runner.kind")
    s.add_argument("--rows", type=int, default=600, help="rows in the generated corpus (default 600)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted path)")
    s = sub.add_parser("stats", help="print per-stage counts and rejection reasons of an output")
    s.add_argument("output")
    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands() -> list[Callable]:
    """Commands defined in other modules register a (parser-adder) here."""
    out = []
    try:
        from curate.explore_cli import add_commands

        out.append(add_commands)
    except ImportError:
        pass
    from curate.search_cli import add_commands as search_commands

    out.append(search_commands)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    _env()
    fn = COMMANDS.get(args.command) or getattr(args, "func", None)
    try:
        return fn(args)
    except (ConfigError, InputError) as e:
        sys.stderr.write(f"curate: error: {e}\n")
        return EXIT_USER
    except KeyboardInterrupt:
        sys.stderr.write("curate: interrupted\n")
        return 130
    except OSError as e:  # disk full, file too large, permission denied: the message names the file
        if args.verbose:
            log.exception("failed")
        msg = e.strerror if e.strerror and e.filename is None else (str(e).splitlines() or [type(e).__name__])[0]
        sys.stderr.write(f"curate: failed: {msg}\n")
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with -v
        if args.verbose:
            log.exception("failed")
        msg = str(e).splitlines()[0] if str(e) else ""
        sys.stderr.write(f"curate: failed: {type(e).__name__}: {msg}\n")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
