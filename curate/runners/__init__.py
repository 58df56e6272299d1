"""Runners differ only in scheduling: both call the same stage code."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from curate.config import Config
    from curate.runners.base import Runner


def make_runner(config: "Config") -> "Runner":
    if config.runner.kind == "ray":
        from curate.runners.ray_runner import RayRunner

        return RayRunner(config.runner)
    from curate.runners.local import LocalRunner

    return LocalRunner(config.runner)
