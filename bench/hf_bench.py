"""Shared by bench/perplexity.py and bench/recaption.py: common flags, a saved random model, interleaved timing."""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Callable

import numpy as np


def add_common_args(ap: argparse.ArgumentParser, size_help: str) -> None:
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny", help=size_help)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (medians are reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--dtype", default="auto", help="auto: the stage's default for the device")


def with_saved_model(build: Callable[[], tuple[Any, Any]], load: Callable[[str], Any]) -> Any:
    """``load(dir)`` on a random model saved to a temporary directory: the stage's real from_pretrained path."""
    with tempfile.TemporaryDirectory() as d:
        model, preprocessor = build()
        model.save_pretrained(d)
        preprocessor.save_pretrained(d)
        del model
        return load(d)


def interleaved(runs: dict[str, Callable[[], Any]], repeat: int, device: str) -> tuple[dict[str, float], dict]:
    """Median seconds per run name (runs alternate, as the machine may be shared) and each run's last result."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in runs}
    results: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            results[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, results
