"""Live progress of a run while it executes: a bar per task label on a terminal, a plain line every
so often anywhere else (a pipe, ``nohup``, a batch script, CI), so no run is ever silent.

The words are the report's (succeeded, failed, running, pending, unready, cancelled) so the bar, the
line, ``report``, ``runs`` and the dashboard say the same thing. Colours tell the truth: red only once a
job failed, yellow for jobs that cannot run because of that, green only when everything succeeded.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TextColumn, TimeElapsedColumn

from batchprod._time import iso_now
from batchprod.report.report import COLUMNS, column_counts

DONE = ("succeeded", "failed", "unready", "cancelled")
#: seconds between plain progress lines off a terminal ($BATCHPROD_PROGRESS_INTERVAL)
DEFAULT_INTERVAL = 30.0


def style_for(cols: dict[str, int]) -> str:
    """Bar colour of a set of jobs: red once one failed, yellow if some cannot run, else green."""
    if cols.get("failed"):
        return "red"
    if cols.get("unready") or cols.get("cancelled"):
        return "yellow"
    return "green"


def words(cols: dict[str, int]) -> str:
    """'succeeded 40, failed 2, running 3' in the report's order, zeros left out."""
    return ", ".join(f"{c} {cols[c]:,}" for c in COLUMNS[1:] if cols.get(c))


class _Bar(BarColumn):
    """A bar whose colour is the task's own (its jobs' truth), not one style for every row."""

    def render(self, task: Task) -> Any:
        style = task.fields.get("style", "green")
        self.complete_style = self.finished_style = style
        return super().render(task)


class _Rate:
    """Jobs finished per second over the last minute (a whole-run average hides a stall)."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.points: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float | None:
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[0][0] > self.window:
            self.points.popleft()
        t0, d0 = self.points[0]
        return (done - d0) / (now - t0) if now - t0 >= 1.0 else None


def duration(seconds: float) -> str:
    """'2h03m04s', '5m02s', '7s'."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def stdout_gone() -> None:
    """Whoever read our standard output went away (``batchprod restart RUN | head -1``): the run goes
    on, and what it prints from now on goes nowhere (not a BrokenPipeError that ends the engine)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class ProgressView:
    """The orchestrator's progress callback for the command line; use as a context manager."""

    def __init__(self, name: str, total: int, console: Console, interval: float | None = None) -> None:
        self.name = name
        self.total = total
        self.console = console
        self.live = console.is_terminal
        env = os.environ.get("BATCHPROD_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env) if env else DEFAULT_INTERVAL
        self.rate = _Rate()
        self._last_line = 0.0
        self._last_cols: dict[str, int] = {}
        self._printed: dict[str, int] = {}
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressView:
        if self.live:
            self._bar = Progress(TextColumn("[bold]{task.description}"), _Bar(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self.console)
            self._bar.start()
            self._tasks["*"] = self._bar.add_task(self.name, total=self.total, detail="", style="green")
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._last_cols and self._last_cols != self._printed:  # (not the same line twice)
            self._line(time.monotonic(), self._last_cols, final=True)

    def __call__(self, counts: dict[str, int], by_label: dict[str, dict[str, int]]) -> None:
        cols = column_counts(counts)
        self._last_cols = cols
        now = time.monotonic()
        if self._bar is not None:
            self._update_bar(cols, by_label)
        elif now - self._last_line >= self.interval:
            self._line(now, cols)

    def _update_bar(self, cols: dict[str, int], by_label: dict[str, dict[str, int]]) -> None:
        assert self._bar is not None
        bar = self._bar
        bar.update(self._tasks["*"], completed=sum(cols.get(c, 0) for c in DONE), detail=words(cols),
                   style=style_for(cols))
        for label, counts in by_label.items():
            lc = column_counts(counts)
            n = sum(lc.values())
            if label not in self._tasks:
                self._tasks[label] = bar.add_task(f"  {label}", total=n, detail="", style="green")
            bar.update(self._tasks[label], total=n, completed=sum(lc.get(c, 0) for c in DONE), detail=words(lc),
                       style=style_for(lc))

    def _line(self, now: float, cols: dict[str, int], final: bool = False) -> None:
        self._last_line = now
        self._printed = dict(cols)
        done = sum(cols.get(c, 0) for c in DONE)
        rate = self.rate.add(now, done)
        pace = ""
        if rate is not None and not final:
            left = self.total - done
            eta = f", ETA {duration(left / rate)}" if rate > 0 and left else ""
            pace = f"; {rate:,.1f} jobs/s{eta}"
        stamp = iso_now()
        self.console.print(f"{stamp} {self.name}: {done:,} of {self.total:,} jobs done "
                           f"({words(cols) or 'nothing yet'}){pace}", highlight=False, markup=False, soft_wrap=True)
