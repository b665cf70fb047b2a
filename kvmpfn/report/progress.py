"""Progress on long work: a rich bar on stderr when it is a terminal, nothing otherwise. It appears only once
the work has run for ``DELAY`` seconds, so short runs print nothing extra."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

DELAY = 1.0

Advance = Callable[[int, str], None]


@contextmanager
def progress(label: str, total: int | None = None, unit: str = "", stream: IO[str] | None = None) -> Iterator[Advance]:
    """Yields ``update(done, description)``: ``done`` units of ``total`` (``None``: unknown, then a count and a
    rate are shown). No refresh thread: the bar redraws only when updated."""
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        yield lambda done, description="": None
        return
    start = time.monotonic()
    state: dict[str, Any] = {}

    def update(done: int, description: str = "") -> None:
        now = time.monotonic()
        if "bar" not in state:
            if now - start < DELAY:
                return
            columns: list[Any] = [TextColumn(label)]
            if total is None:
                columns.append(TextColumn("{task.completed:,} " + unit))
                columns.append(TextColumn("{task.fields[rate]}"))
            else:
                columns += [BarColumn(), MofNCompleteColumn()]
            columns += [TimeElapsedColumn(), TextColumn("{task.description}")]
            bar = Progress(*columns, console=Console(file=stream), auto_refresh=False, transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task("", total=total, rate="")
        rate = f"{done / max(now - start, 1e-9):,.0f} {unit}/s" if unit else ""
        state["bar"].update(state["task"], completed=done, description=description, rate=rate, refresh=True)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()
