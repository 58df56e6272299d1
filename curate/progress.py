"""Progress bars for long work (rich), quiet when not on a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, prog, task) -> None:
        self._prog, self._task = prog, task

    def advance(self, n: float = 1) -> None:
        if self._prog is not None:
            self._prog.advance(self._task, n)


@contextmanager
def progress(description: str, total: float | None, unit: str = "") -> Iterator[_Bar]:
    if not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield _Bar(prog, task)
