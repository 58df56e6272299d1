"""Ready-made pipelines: the YAML configs of ``configs/`` by name, with your input and output.

    import curate
    from curate import pipelines
    cfg = pipelines.load("demo", input="urls.parquet", output="out/")
    curate.run(cfg)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# configs/ is this package's sibling both in a checkout (configs/) and installed (curate/configs/)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load(name: str, input: str | None = None, output: str | None = None, **overrides: Any):
    """The validated config ``configs/NAME.yaml`` with input/output paths and dotted overrides."""
    from curate.config import ConfigError, load_config

    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no pipeline {name!r}; available: {', '.join(available())}")
    over = {k.replace("__", "."): v for k, v in overrides.items()}
    if input is not None:
        over["input.path"] = str(input)
    if output is not None:
        over["output.path"] = str(output)
    return load_config(path, over)
