"""curate: turn raw web image-text pairs into a clean training corpus.

``curate.run(config_or_path, **overrides)`` runs a pipeline; every stage can
also be called on a ``pyarrow.Table`` (``curate.create_stage("download", image_size=128)(table)``).
Importing curate is cheap: torch, ray and faiss are imported only by the code that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from curate._version import __version__


def _checkout_layout() -> None:
    """A source checkout put on ``PYTHONPATH`` without installing it (e.g. the lent GPU machine, see
    bench/gpu_device.sh): ``filters/`` and ``pipelines/`` stand beside this package, where an install
    maps them to ``curate.filters`` and ``curate.pipelines`` (pyproject's package-dir).  Adding the
    checkout's root to this package's search path gives them the same names; installed, nothing changes."""
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isfile(os.path.join(root, "filters", "__init__.py")) and \
            os.path.isfile(os.path.join(root, "pyproject.toml")) and importlib.util.find_spec("curate.filters") is None:
        __path__.append(root)  # noqa: F821 - the package's own search path


_checkout_layout()

if TYPE_CHECKING:  # pragma: no cover
    from curate.pipeline import RunResult
    from curate.stage import Stage


def run(config: Any, **overrides: Any) -> "RunResult":
    """Run the pipeline a config (path, dict or Config) describes; see ``curate.pipeline.run``."""
    from curate.pipeline import run as _run

    return _run(config, **overrides)


def load_config(config: Any, **overrides: Any):
    from curate.config import load_config as _load

    return _load(config, overrides or None)


def create_stage(name: str, **params: Any) -> "Stage":
    """A configured stage, ready to be called on a ``pyarrow.Table``."""
    from curate import registry

    return registry.create({"stage": name, **params})


__all__ = ["run", "load_config", "create_stage", "__version__"]
