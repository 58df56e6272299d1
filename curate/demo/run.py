"""``curate demo``: build the offline corpus, serve it on 127.0.0.1 and run ``configs/demo.yaml`` on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from curate.config import load_config

log = logging.getLogger(__name__)

DEMO_DIR = "_demo"  # inside the output directory: the generated site and input


def demo_config_path() -> Path:
    """configs/demo.yaml: the checkout's, or the copy installed as curate/configs/demo.yaml."""
    from curate.pipelines import CONFIG_DIR

    return CONFIG_DIR / "demo.yaml"


def prepare_corpus(root: Path, rows: int = 600, seed: int = 0) -> Path:
    """Build the site once per (rows, seed); returns the site directory."""
    from curate.demo.corpus import build_site

    site = root / "site"
    stamp = site / "build.json"
    want = {"rows": rows, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return site
    info = build_site(site, n_rows=rows, seed=seed)
    stamp.write_text(json.dumps(want))
    log.info("demo corpus: %d rows (%s)", rows, ", ".join(f"{k}={v}" for k, v in sorted(info["kinds"].items())))
    return site


def run_demo(output: Path, runner: str | None = None, rows: int = 600, seed: int = 0,
             extra: dict[str, Any] | None = None, config: Path | None = None):
    from curate.demo.server import DemoServer
    from curate.demo.corpus import write_input
    from curate.pipeline import execute

    output = Path(output).resolve()
    root = output / DEMO_DIR
    site = prepare_corpus(root, rows, seed)
    overrides: dict[str, Any] = {"input.path": str(root / "input.parquet"), "input.uid_col": "uid",
                                 "output.path": str(output), "output.overwrite": True}
    if runner:
        overrides["runner.kind"] = runner
    overrides.update(extra or {})
    cfg = load_config(config or demo_config_path(), overrides)
    timeout = next((p.timeout for p in cfg.stages if p.stage == "download"), 10.0)
    with DemoServer(site, slow_seconds=timeout + 2.0) as server:
        write_input(site, server.base_url, root / "input.parquet")
        log.info("demo corpus served at %s", server.base_url)
        return execute(cfg)
